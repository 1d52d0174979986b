"""Tiny random-weight models of real architectures, with inputs and their attention-module count.

Nothing is downloaded: every model is built from a small config. `attention_modules` counts
the modules that compute attention, which is what the front end must find.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SEQ = 12


@dataclass
class ZooModel:
    name: str
    build: Callable[[str], tuple]  # attn_implementation -> (model, kwargs)
    attention_modules: int
    causal_sites: int = 0           # sites whose mask is causal and must be proven so
    implementations: tuple = ("eager", "sdpa")


def _hf(config_cls_name: str, model_cls_name: str, inputs: Callable[[], dict], **config):
    def build(impl: str):
        import transformers
        cfg = getattr(transformers, config_cls_name)(**config)
        cfg._attn_implementation = impl
        torch.manual_seed(0)
        model = getattr(transformers, model_cls_name)(cfg).eval()
        return model, inputs()
    return build


def _ids(vocab=64, batch=2, seq=SEQ):
    return lambda: {"input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))}


def _padded_ids(vocab=64, batch=2, seq=SEQ):
    def make():
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return make


def _seq2seq(vocab=64, batch=2, seq=SEQ, tgt=7):
    def make():
        g = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
                "decoder_input_ids": torch.randint(0, vocab, (batch, tgt), generator=g)}
    return make


def _pixels():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _whisper():
    return {"input_features": torch.randn(1, 16, 60, generator=torch.Generator().manual_seed(1)),
            "decoder_input_ids": torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))}


LAYERS = 2
SMALL = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)

ZOO = [
    ZooModel("llama", _hf("LlamaConfig", "LlamaModel", _ids(), vocab_size=64, num_key_value_heads=2, **SMALL),
             attention_modules=LAYERS, causal_sites=LAYERS),
    ZooModel("qwen2", _hf("Qwen2Config", "Qwen2Model", _ids(), vocab_size=64, num_key_value_heads=1, **SMALL),
             attention_modules=LAYERS, causal_sites=LAYERS),
    ZooModel("mistral", _hf("MistralConfig", "MistralModel", _ids(), vocab_size=64, num_key_value_heads=2,
                            sliding_window=None, **SMALL), attention_modules=LAYERS, causal_sites=LAYERS),
    ZooModel("gpt2", _hf("GPT2Config", "GPT2Model", _ids(), vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4,
                         n_positions=64, bos_token_id=0, eos_token_id=0), attention_modules=LAYERS, causal_sites=LAYERS),
    ZooModel("bert", _hf("BertConfig", "BertModel", _padded_ids(), vocab_size=64, **SMALL),
             attention_modules=LAYERS),
    ZooModel("vit", _hf("ViTConfig", "ViTModel", _pixels, image_size=32, patch_size=8, **SMALL),
             attention_modules=LAYERS),
    ZooModel("t5", _hf("T5Config", "T5Model", _seq2seq(), vocab_size=64, d_model=32, d_kv=8, d_ff=64,
                       num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4),
             attention_modules=3 * LAYERS, causal_sites=LAYERS),
    ZooModel("bart", _hf("BartConfig", "BartModel", _seq2seq(), vocab_size=64, d_model=32, encoder_layers=LAYERS,
                         decoder_layers=LAYERS, encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
             attention_modules=3 * LAYERS, causal_sites=LAYERS),
    ZooModel("whisper", _hf("WhisperConfig", "WhisperModel", _whisper, vocab_size=64, d_model=32, num_mel_bins=16,
                            encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_source_positions=30, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[]),
             attention_modules=3 * LAYERS, causal_sites=LAYERS),
]


class _TorchEncoder(torch.nn.Module):
    """nn.TransformerEncoder (causal) followed by a bare nn.MultiheadAttention (need_weights=False)."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.encoder(x, mask=mask, is_causal=True)
        return self.mha(h, h, h, need_weights=False)[0]


def _torch_encoder(impl: str):
    torch.manual_seed(0)
    return _TorchEncoder().eval(), {"x": torch.randn(2, SEQ, 32, generator=torch.Generator().manual_seed(1))}


ZOO.append(ZooModel("torch-transformer", _torch_encoder, attention_modules=LAYERS + 1, causal_sites=LAYERS,
                    implementations=("native",)))

ZOO_BY_NAME = {m.name: m for m in ZOO}


def dynamo_graph(fn, *args, **compile_kwargs):
    """The FX graph dynamo captures for `fn(*args)` (one graph: a break fails), e.g. dynamic=False for a static one."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True, **compile_kwargs)(*args)
    (gm,) = graphs
    return gm
