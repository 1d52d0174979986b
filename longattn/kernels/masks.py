"""Mask conventions shared by every kernel.

Layout is (batch, heads, seq, dim) everywhere. `attn_mask` follows torch SDPA: a bool
tensor (True = the key takes part) or a float tensor added to the scores, broadcastable
to (B, Hq, Sq, Sk). `causal` is aligned bottom-right, as in FlashAttention-2 and KV-cache
decoding: query i sees key j iff j <= i + (Sk - Sq). For Sq == Sk this is the usual tril.
"""
from __future__ import annotations

import torch


def causal_keep(sq: int, sk: int, device=None) -> torch.Tensor:
    """Bool (sq, sk) bottom-right causal pattern: query i sees key j iff j <= i + sk - sq."""
    rows = torch.arange(sq, device=device).unsqueeze(-1)
    cols = torch.arange(sk, device=device).unsqueeze(0)
    return cols <= rows + (sk - sq)


def as_additive(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool mask -> additive float mask (0 / -inf); float masks pass through in `dtype`."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.full((), float("-inf"), dtype=dtype, device=attn_mask.device))
    return attn_mask.to(dtype)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> int:
    """Validate (B, H, S, D) inputs with GQA grouping; return the group size Hq // Hkv."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D (batch, heads, seq, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating tensor, got {t.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in batch/heads/seq")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{where}: {q.shape[1]} query heads is not a multiple of {k.shape[1]} key/value heads")
    return q.shape[1] // k.shape[1]
