"""Exact attention on the CPU through ATen's fused kernel, where it computes exactly what `flash_attention` means.

On a CPU without Triton, `flash_attention_reference` (plain PyTorch, tiles of 1024 keys, every tile masked
elementwise) ran 19x slower than torch's own SDPA at 8K tokens (9/3 heads, d64, causal, 2 cores: 13.7 s against
0.73 s), so a rewritten model was slower than the model it came from. ATen ships a tiled online-softmax CPU
kernel that returns the log-sum-exp too (`_scaled_dot_product_flash_attention_for_cpu`, fp16/bf16/fp32/fp64).
It differs from our semantics in three places, each handled or avoided here:
  - causal is aligned top-left; ours bottom-right. They agree when Sq == Sk, and one query sees every key
    bottom-right, so it runs non-causal; other causal shapes are left to the reference.
  - masks must be additive in the query's dtype (bool masks become 0 / -inf), and a row whose keys are all
    masked gets lse 0 where ours is -inf (the output is 0 in both): such rows get -inf back. A float mask
    in half precision would lose its digits and send the dtype minimum (HF's fill) to -inf, which turns a
    fully masked row from the uniform mean into 0: half-precision inputs with a float mask take the reference.
  - its log-sum-exp output carries no gradient, so this runs only where no gradient is wanted (inference, and
    the op's forward); training takes the reference, which differentiates out and lse.
K/V heads are repeated for GQA (ATen wants Hq heads): a copy of K and V, small beside the scores.
"""
from __future__ import annotations

import os

import torch

from ..masks import as_additive

ATEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def aten_cpu_applies(q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0) -> bool:
    """True where `aten_cpu_attention` gives exactly `flash_attention_reference`'s (out, lse), without a gradient.
    LONGATTN_FLASH_CPU=reference turns it off."""
    if os.environ.get("LONGATTN_FLASH_CPU") == "reference":
        return False
    if q.device.type != "cpu" or dropout_p > 0.0 or q.dtype not in ATEN_DTYPES:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, attn_mask) if t is not None):
        return False
    if causal and q.shape[-2] not in (1, k.shape[-2]):
        return False
    if v.shape[-1] != q.shape[-1]:  # ATen's kernel takes one head size for q, k and v
        return False
    if attn_mask is None:
        return True
    half_mask = attn_mask.is_floating_point() and q.element_size() < 4
    return attn_mask.device == q.device and attn_mask.dim() <= 4 and not half_mask


def aten_cpu_attention(q, k, v, scale: float, causal: bool, attn_mask=None):
    """(out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32) as `flash_attention_reference` gives them,
    for inputs where `aten_cpu_applies`. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    causal = causal and q.shape[-2] > 1  # bottom-right, one query sees every key
    mask = as_additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() != 4:  # ATen takes 2-D or 4-D masks; missing leading dims broadcast
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    lse = lse.float()
    if mask is not None:  # rows with every key at -inf: ATen says lse 0, the reference -inf
        dead = torch.isneginf(mask).all(-1).expand(lse.shape)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse
