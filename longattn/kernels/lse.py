"""Merging partial attention results by their log-sum-exp.

Two attentions over disjoint key sets, each normalised over its own keys, combine into
the attention over the union: weight each by exp(lse_i - lse) where lse = logaddexp(lse_1, lse_2).
Flash-decoding (split keys), HyperAttention (blocks + samples, causal halves) and
context parallelism all reduce to this.
"""
from __future__ import annotations

import torch


def merge_by_lse(out_1: torch.Tensor, lse_1: torch.Tensor, out_2: torch.Tensor, lse_2: torch.Tensor):
    """Merge two partial attention outputs.

    out_i: (..., S, Dv), any float dtype; lse_i: (..., S) float32 (or float64), -inf where a row saw
    no key. Returns (out, lse) with out in out_1's dtype and lse in the lse inputs' dtype. The sum runs
    in float32, or float64 for float64 outputs, so float64 references and gradchecks keep their digits.
    """
    lse = torch.logaddexp(lse_1, lse_2)
    # a row that saw no key in either part keeps lse = -inf; avoid (-inf) - (-inf) = nan
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_1 = torch.exp(lse_1 - safe).unsqueeze(-1)
    w_2 = torch.exp(lse_2 - safe).unsqueeze(-1)
    acc = torch.promote_types(out_1.dtype, torch.float32)
    out = out_1.to(acc) * w_1 + out_2.to(acc) * w_2
    return out.to(out_1.dtype), lse
