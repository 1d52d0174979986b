"""How far an approximate attention is from exact attention on a model's real activations.

Capture: run the model once under `capture_attention()`; every call of
`torch.nn.functional.scaled_dot_product_attention` (what most PyTorch and Hugging Face models call)
and of `torch.ops.longattn.attention` (a rewritten model) is recorded as a `CapturedSite` with its
q/k/v, causal flag and scale, in call order (for a decoder, layer order).

Measure: `site_errors(site, approx)` compares `approx(q, k, v, scale=, causal=) -> (out, lse)` with
exact attention, per head:
- out_rel_err: ||o - o*|| / ||o*|| over the head's rows and channels;
- rowsum_rel_err: mean over rows of |Z/Z* - 1| = |exp(lse - lse*) - 1|, where Z = sum_j w_ij exp(s_ij)
  is the approximation's softmax normaliser (the paper's diagonal D) and Z* the exact one.
Real activations matter: trained models concentrate attention on a few sink tokens and on
neighbours, which random Gaussian inputs never show.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .kernels.flash import flash_attention_reference


@dataclass
class CapturedSite:
    """One attention call: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D|Dv), detached copies on the CPU."""
    index: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float
    skipped: Optional[str] = None  # why the site cannot be compared (e.g. an arbitrary mask)


def _sdpa_site(index, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    causal = bool(bound.get("is_causal", False))
    mask = bound.get("attn_mask")
    skipped = None
    if mask is not None:
        from .kernels.masks import as_additive, causal_keep
        keep = causal_keep(q.shape[-2], k.shape[-2], mask.device)
        additive = as_additive(mask, torch.float32).expand(*q.shape[:-1], k.shape[-2])
        if torch.all(additive[..., keep] == 0) and torch.all(torch.isinf(additive[..., ~keep])):
            causal = True  # a materialised causal mask, as some models build it
        else:
            skipped = "attn_mask is not the causal pattern"
    scale = bound.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    return CapturedSite(index, q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), causal, float(scale), skipped)


class _Capture(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sites: list[CapturedSite] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.sites.append(_sdpa_site(len(self.sites), args, kwargs))
        elif getattr(func, "_name", None) == "longattn::attention" or func is getattr(
                getattr(torch.ops, "longattn", None), "attention", None):
            q, k, v, mask, scale, causal = args[:6]
            self.sites.append(CapturedSite(len(self.sites), q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                                           bool(causal), float(scale),
                                           None if mask is None else "site has an attn_mask"))
        return func(*args, **kwargs)


@contextmanager
def capture_attention():
    """with capture_attention() as sites: model(...)  -> sites is a list of CapturedSite."""
    mode = _Capture()
    with mode:
        yield mode.sites


def site_errors(site: CapturedSite, approx: Callable, dtype=torch.float32) -> dict:
    """Per-head errors of `approx(q, k, v, scale=, causal=) -> (out, lse)` against exact attention.
    Returns {"out_rel_err": [Hq floats], "rowsum_rel_err": [Hq floats]} (batch pooled)."""
    if site.skipped:
        raise ValueError(f"site {site.index}: cannot compare, {site.skipped}")
    q, k, v = (t.to(dtype) for t in (site.q, site.k, site.v))
    exact, exact_lse = flash_attention_reference(q, k, v, scale=site.scale, causal=site.causal)
    out, lse = approx(q, k, v, scale=site.scale, causal=site.causal)
    diff = (out.double() - exact.double()).pow(2).sum(dim=(0, 2, 3))
    ref = exact.double().pow(2).sum(dim=(0, 2, 3))
    seen = torch.isfinite(exact_lse)
    ratio = torch.where(seen, torch.exp(lse.double() - exact_lse.double()) - 1, torch.zeros_like(exact_lse.double()))
    rowsum = ratio.abs().sum(dim=(0, 2)) / seen.sum(dim=(0, 2)).clamp(min=1)
    return {"out_rel_err": (diff / ref).sqrt().tolist(), "rowsum_rel_err": rowsum.tolist()}


def error_table(sites: list[CapturedSite], approx: Callable, layers=None) -> list[dict]:
    """One record per compared site: index, per-head errors, and their head means."""
    rows = []
    for site in sites:
        if site.skipped or (layers is not None and site.index not in layers):
            continue
        err = site_errors(site, approx)
        rows.append({"site": site.index, "causal": site.causal, "seq": site.k.shape[-2], **err,
                     "out_rel_err_mean": sum(err["out_rel_err"]) / len(err["out_rel_err"]),
                     "rowsum_rel_err_mean": sum(err["rowsum_rel_err"]) / len(err["rowsum_rel_err"])})
    return rows


__all__ = ["CapturedSite", "capture_attention", "site_errors", "error_table"]
