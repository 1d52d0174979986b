"""`longattn explain MODEL_SPEC [--policy p.yaml] [--seq-len N] [--json report.json]`: every attention site of a
model and what the policy does with it.

MODEL_SPEC is `package.module:factory` (a callable returning (model, example_inputs), the inputs
a tuple or a dict of keyword arguments) or a `transformers` model type such as `llama`, built
from a small config with random weights; nothing is downloaded.
"""
from __future__ import annotations

import importlib
import os
import sys

from ..files import atomic_path
from .errors import CliError

SMALL_CONFIG = {  # enough to show every layer's attention; cheap on a CPU
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 4, "num_heads": 4,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 256,
}


def build_transformers_model(model_type: str, seq_len: int, attn_implementation: str = "eager",
                             causal_lm: bool = False):
    """(model, inputs); with `causal_lm`, a decoder-only type gets its LM head (LlamaForCausalLM, not LlamaModel)."""
    import torch  # here, not at the top: `longattn policy check` and `convert` run without it
    try:
        import transformers
    except ImportError:
        raise CliError("a transformers model type needs `pip install transformers`") from None
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise CliError(f"unknown model spec {model_type!r}: not module:factory and not a transformers model type") from None
    for key, value in SMALL_CONFIG.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (dict, list)):
            setattr(config, key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, 0)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if causal_lm and _decoder_only(model_type) else transformers.AutoModel
    model = auto.from_config(config).eval()
    ids = torch.randint(0, 256, (1, seq_len))
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(1, seq_len // 2)]
    return model, inputs


def _decoder_only(model_type: str) -> bool:
    """A causal LM class that is not also a masked LM's (bert has both: its causal head is a mode, not the model)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model_spec(spec: str, seq_len: int):
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        sys.path.insert(0, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise CliError(f"cannot load {spec!r}: {e}") from None
        built = factory()
        if not (isinstance(built, tuple) and len(built) == 2):
            raise CliError(f"{spec} must return (model, example_inputs)")
        return built
    return build_transformers_model(spec, seq_len)


def _write_atomically(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def cmd_explain(args) -> int:
    from rich.console import Console

    from ..api import explain
    model, inputs = load_model_spec(args.model, args.seq_len)
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    report = explain(model, *inputs, policy=args.policy)
    Console().print(report.table())
    if args.json:
        _write_atomically(args.json, report.to_json())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="report every attention site of a model and the policy's choice")
    p.add_argument("model", help="module:factory or a transformers model type (e.g. llama)")
    p.add_argument("--policy", help="YAML policy (default: the built-in policy)")
    p.add_argument("--seq-len", type=int, default=64, help="example length for transformers models")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(run=cmd_explain)
