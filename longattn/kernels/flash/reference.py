"""Exact attention, tiled over keys with an online softmax: O(S) extra memory, plain PyTorch.

This is the thing the tests trust and the path every device without a fast kernel runs.
Accumulation is in float32 (float64 inputs stay float64) whatever the input dtype, because
the running max / denominator lose digits quickly in half precision.
"""
from __future__ import annotations

import math

import torch

from ..masks import as_additive, check_qkv


def flash_attention_reference(q, k, v, *, scale=None, causal=False, attn_mask=None, dropout_p=0.0,
                              generator=None, key_block: int = 1024):
    """softmax(q kᵀ·scale + mask) v, never materialising more than (Sq × key_block) scores per head.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), Hq a multiple of Hkv (query head h uses
    key head h // (Hq // Hkv)); attn_mask bool (True = attend) or additive float, broadcastable to
    (B, Hq, Sq, Sk); causal is bottom-right aligned. Rows that see no key give 0 and lse = -inf.
    Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32).
    """
    group = check_qkv(q, k, v, "flash_attention_reference")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = as_additive(attn_mask, acc_dtype)
    if mask is not None:
        mask = mask.expand(B, Hq, Sq, Sk)
    # group query heads with their key head instead of repeating K/V: (B, Hkv, group*Sq, D)
    qg = q.to(acc_dtype).reshape(B, Hkv, group * Sq, D)
    row = torch.arange(Sq, device=q.device).repeat(group)  # query position of each grouped row
    m = torch.full((B, Hkv, group * Sq), float("-inf"), dtype=acc_dtype, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, Hkv, group * Sq, v.shape[-1], dtype=acc_dtype, device=q.device)
    for start in range(0, Sk, key_block):
        stop = min(start + key_block, Sk)
        kb = k[:, :, start:stop].to(acc_dtype)
        vb = v[:, :, start:stop].to(acc_dtype)
        s = torch.matmul(qg, kb.transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask[..., start:stop].reshape(B, Hkv, group * Sq, stop - start)
        if causal:
            cols = torch.arange(start, stop, device=q.device)
            s = s.masked_fill(cols[None, :] > (row[:, None] + (Sk - Sq)), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_safe.unsqueeze(-1))
        correction = torch.exp(m - m_safe)
        l = l * correction + p.sum(-1)
        if dropout_p >= 1.0:  # every probability dropped: zeros, as F.dropout gives (not 0 / 0)
            p = torch.zeros_like(p)
        elif dropout_p > 0.0:
            keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= dropout_p
            p = p * keep / (1.0 - dropout_p)
        acc = acc * correction.unsqueeze(-1) + torch.matmul(p, vb)
        m = m_new
    out = acc / torch.where(l > 0, l, torch.ones_like(l)).unsqueeze(-1)
    # log of a safe denominator: log(0) in the untaken branch would make the gradient nan
    lse = torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))), torch.full_like(l, float("-inf")))
    out = out.reshape(B, Hq, Sq, -1).to(q.dtype)
    return out, lse.reshape(B, Hq, Sq).float()
