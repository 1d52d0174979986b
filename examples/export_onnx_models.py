"""Export a few transformers models (small configs, random weights, nothing downloaded) to ONNX,
as a folder for `longattn convert` to work on:

    python examples/export_onnx_models.py onnx-models/
    longattn convert onnx-models/ --out onnx-converted/ --policy examples/policies/all-flash.yaml --check

Exported by torch's dynamo exporter at opset 18; decoders with a dynamic sequence length, so their
causal masks are built from the runtime length; encoders with fixed shapes. Each model's single
output is its last hidden state.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128)

MODELS = {  # name: (config class, model class, extra config, causal decoder?)
    "llama": ("LlamaConfig", "LlamaModel", dict(num_key_value_heads=2, max_position_embeddings=256), True),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(num_key_value_heads=2, max_position_embeddings=256), True),
    "gpt2": ("GPT2Config", "GPT2Model", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=128), True),
    "bert": ("BertConfig", "BertModel", dict(max_position_embeddings=256), False),
    "vit": ("ViTConfig", "ViTModel", dict(image_size=32, patch_size=8, num_channels=3), False),
}


class LastHiddenState(torch.nn.Module):
    def __init__(self, model, **call_kwargs):
        super().__init__()
        self.model, self.call_kwargs = model, call_kwargs

    def forward(self, x):
        return self.model(x, **self.call_kwargs).last_hidden_state


def build(name: str):
    import transformers
    config_name, model_name, extra, causal = MODELS[name]
    kwargs = {k: v for k, v in SMALL.items() if not (name == "gpt2" and k != "vocab_size")}
    kwargs.update(extra)
    config = getattr(transformers, config_name)(**kwargs, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    example = torch.randn(1, 3, 32, 32) if name == "vit" else torch.randint(0, 128, (1, 48))
    wrapped = LastHiddenState(model, use_cache=False) if causal else LastHiddenState(model)  # no KV cache out
    return wrapped.eval(), example, causal


def export(name: str, path: str) -> None:
    model, example, causal = build(name)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        shapes = ({1: torch.export.Dim("seq", min=2, max=256)},) if causal else None
        torch.onnx.export(model, (example,), path, dynamo=True, opset_version=18, input_names=["input"],
                          output_names=["out"], dynamic_shapes=shapes, verbose=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the .onnx files")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models.split(","):
        path = os.path.join(args.out, f"{name}.onnx")
        export(name, path)
        print(f"exported {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
