"""The "hyper" kind: HyperAttention (Han et al. 2023) with exact attention sinks and local window.

`hyper_attention` runs the Triton kernels on CUDA tensors (or on CPU tensors in the Triton
interpreter) and the plain PyTorch reference elsewhere and for float64; both read the same
`HyperPattern` (see `pattern.py`), so a seed gives the same hashes and samples on every path."""
from __future__ import annotations

import math
import os

import torch

from ..flash import flash_attention
from ..masks import check_qkv
from .pattern import HyperPattern, build_pattern, check_params
from .reference import hyper_attention_from_pattern, hyper_attention_reference
from .triton_hash import HAVE_TRITON


def _use_triton(q, v) -> bool:
    if not HAVE_TRITON or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if max(q.shape[-1], v.shape[-1]) > 256:  # larger heads do not fit the kernel's tiles
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def hyper_attention(q, k, v, *, scale=None, causal=False, block_size=256, sample_size=256, lsh_bits=7,
                    min_seq_len=4096, sink_tokens=64, local_window=256, variant="default", sampling=None,
                    seed=0, return_lse=True):
    """HyperAttention; returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), Hq a multiple of Hkv; causal is
    bottom-right aligned and needs Sq <= Sk. Exact attention below `min_seq_len` keys.
    variant="paper": sortLSH blocks + uniform samples (Han et al.); variant="default" adds exact
    attention to the first `sink_tokens` keys and a `local_window` around each query (causal: the
    window ending at the query), which the blocks and samples then skip. sampling="importance" (the
    default variant's default; "uniform" is the paper's) draws the samples in proportion to the rectangle's
    mean query's attention (mixed with uniform), each weighted by the keys it stands for. See `pattern.py`.
    Differentiable: the backward is exact for the pattern the forward used.
    """
    check_qkv(q, k, v, "hyper_attention")
    params = dict(block_size=block_size, sample_size=sample_size, lsh_bits=lsh_bits, min_seq_len=min_seq_len,
                  sink_tokens=sink_tokens, local_window=local_window, variant=variant, sampling=sampling, seed=seed)
    check_params(**{n: p for n, p in params.items() if n != "seed"})
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    Sq, Sk = q.shape[2], k.shape[2]
    if Sk < min_seq_len or Sk == 0 or Sq == 0:
        return flash_attention(q, k, v, scale=scale, causal=causal)
    if causal and Sq > Sk:
        raise ValueError(f"hyper_attention: causal needs Sq <= Sk (bottom-right aligned), got Sq={Sq}, Sk={Sk}")
    if _use_triton(q, v) and k.dtype == q.dtype and v.dtype == q.dtype:
        from .triton_attention import hyper_attention_triton
        return hyper_attention_triton(q, k, v, scale=scale, causal=causal, **params)
    return hyper_attention_reference(q, k, v, scale=scale, causal=causal, **params)


__all__ = ["hyper_attention", "hyper_attention_reference", "hyper_attention_from_pattern", "HyperPattern",
           "build_pattern"]
