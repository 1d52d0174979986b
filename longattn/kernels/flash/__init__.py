"""The "flash" kind: exact attention. `flash_attention` picks the Triton kernels where they run, else ATen's
fused CPU kernel where it computes the same thing without a gradient (`aten_cpu.py`), else the reference."""
from __future__ import annotations

import math
import os

import torch

from ..masks import check_qkv
from .aten_cpu import aten_cpu_applies, aten_cpu_attention
from .reference import flash_attention_reference
from .triton_fwd import MAX_HEAD_DIM, SUPPORTED_DTYPES, interpreting, triton


def triton_supports(q, k, v, attn_mask=None, dropout_p=0.0) -> bool:
    """True when the Triton kernels compute this call: triton importable, CUDA tensors (or CPU under
    TRITON_INTERPRET=1, unless LONGATTN_FLASH_CPU is reference or aten), no dropout, fp16/bf16/fp32 with one dtype,
    head dims <= 256 and a mask that needs no gradient (a float mask that requires grad takes the
    reference, which gives it). `flash_attention` also sends scale <= 0 to the reference."""
    if triton is None or dropout_p > 0.0:
        return False
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting()
                          and os.environ.get("LONGATTN_FLASH_CPU") not in ("reference", "aten"))):
        return False
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM or k.device != q.device or v.device != q.device:
        return False
    if attn_mask is not None:
        if attn_mask.device != q.device or attn_mask.dim() > 4:
            return False
        if attn_mask.is_floating_point() and attn_mask.requires_grad and torch.is_grad_enabled():
            return False
    return True


def flash_attention(q, k, v, *, scale=None, causal=False, attn_mask=None, dropout_p=0.0, generator=None):
    """Exact attention softmax(q kᵀ·scale + mask) v; returns (out, lse).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); Hq a multiple of Hkv (GQA, no repeat);
    attn_mask bool (True = attend) or additive float broadcastable to (B, Hq, Sq, Sk); causal is
    bottom-right aligned. out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32 (-inf for rows
    that see no key). Differentiable in q, k, v (and lse); see `flash_attention_reference`.
    """
    if not triton_supports(q, k, v, attn_mask, dropout_p):
        if aten_cpu_applies(q, k, v, causal, attn_mask, dropout_p):
            check_qkv(q, k, v, "flash_attention")
            return aten_cpu_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                                      bool(causal), attn_mask)
        return flash_attention_reference(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask,
                                         dropout_p=dropout_p, generator=generator)
    check_qkv(q, k, v, "flash_attention")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0.0:  # the kernels fold the scale into exp2 and take row maxima of unscaled scores
        return flash_attention_reference(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask)
    from .autograd import FlashAttentionFunction, forward_kernels
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad:
        attn_mask = attn_mask.detach()  # grad disabled: nothing will ask for its gradient
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return forward_kernels(q, k, v, scale, bool(causal), attn_mask)  # no autograd bookkeeping (decode)
    return FlashAttentionFunction.apply(q, k, v, attn_mask, scale, bool(causal))


__all__ = ["flash_attention", "flash_attention_reference", "triton_supports"]
