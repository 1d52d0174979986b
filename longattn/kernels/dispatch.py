"""`torch.ops.longattn.attention`: the one op every rewritten site calls.

It takes the site's q/k/v/mask/scale/causal and a *plan*: a JSON list of length bands, each
naming a kind and its parameters. At run time it reads the key length and runs the band's
implementation, so a graph compiled with dynamic shapes keeps one op for every length and
never recompiles when a length crosses a band boundary. The plan is plain data: this module
knows nothing of policies or graphs.

Backward recomputes the chosen implementation under autograd (the hash / sample / dropout
pattern is replayed from the same seed), so every kind trains exactly through its own output.

A linear band's `feature_params` may be a calibration file reference "FILE#layers.N" (the rewriter writes
it per site); it is loaded here once and passed on as tensors (`linear/params_file.py`).

A band may carry `context_parallel: {mesh_dim, load_balance}`: when torch.distributed is initialised
with more than one rank in that group, q/k/v are this rank's sequence shards and the band runs the
sharded implementation (`parallel/`); otherwise the key is ignored. Bands are then chosen by the
global key length (local length x ranks). The sharded kinds' collectives are custom ops with their own
autograd, so the recomputing backward (torch.func.vjp) runs them too: the backward redoes the forward's
communication before its own.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..plan import KINDS, Band, band_for_length, decode_plan, encode_plan  # noqa: F401  (re-exported)
from .flash import flash_attention, flash_attention_reference
from .masks import check_qkv

def check_devices(q, k, v, attn_mask) -> None:
    """Also in the fake implementation: a call with one tensor on `meta` is dispatched there, not to the op."""
    for name, t in (("k", k), ("v", v), ("attn_mask", attn_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"longattn::attention: {name} is on {t.device}, q on {q.device}")


def check_call(q, k, v, attn_mask, dropout_p: float) -> None:
    """What SDPA refuses, refused here too with the argument named: the op is public and callable directly."""
    check_qkv(q, k, v, "longattn::attention")  # the rewriter trusts sizes that only have to agree at run time
    check_devices(q, k, v, attn_mask)
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"longattn::attention: attn_mask must be bool or floating, got {attn_mask.dtype}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"longattn::attention: dropout_p must be in [0, 1], got {dropout_p}")


def _band_for_keys(plan: str, k) -> Band:
    """The band for the key length: the global one when a context-parallel band is active (k is a shard)."""
    length = k.shape[-2]
    cp = next((b.params["context_parallel"] for b in decode_plan(plan) if "context_parallel" in b.params), None)
    if cp is not None:
        from . import parallel
        if parallel.active(cp):
            length *= torch.distributed.get_world_size(parallel.cp_group(cp))
    return band_for_length(plan, length)


def _generator(seed: Optional[torch.Tensor], device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.item()))
    return g


def run_band(band: Band, q, k, v, attn_mask, scale, causal, dropout_p, seed):
    """Run one band's implementation; differentiable through torch autograd."""
    if band.kind == "linear" and isinstance(band.params.get("feature_params"), str):
        # a calibration file reference "path#layers.N" (see linear/params_file.py): loaded once, cached
        from .linear.params_file import feature_params_from_file
        band = Band(band.kind, band.below,
                    {**band.params, "feature_params": feature_params_from_file(band.params["feature_params"])})
    site = band.params.get("site")  # a linear band that keeps its decode state (linear/incremental.py)
    if site is not None:
        band = Band(band.kind, band.below, {n: p for n, p in band.params.items() if n != "site"})
    if "context_parallel" in band.params:
        params = dict(band.params)
        cp = params.pop("context_parallel")
        from . import parallel
        if parallel.active(cp):
            return parallel.run_sharded(band.kind, q, k, v, attn_mask=attn_mask, scale=scale, causal=causal,
                                        dropout_p=dropout_p, params=params, cp=cp)
        band = Band(band.kind, band.below, params)
    if band.kind in ("hyper", "linear") and (attn_mask is not None or dropout_p > 0):
        raise ValueError(f"longattn::attention: kind {band.kind!r} takes no attn_mask or dropout; "
                         "the rewriter should have chosen flash for this site")
    if band.kind == "exact":
        out, _ = flash_attention_reference(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask,
                                           dropout_p=dropout_p, generator=_generator(seed, q.device))
        return out
    if band.kind == "flash":
        out, _ = flash_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask,
                                 dropout_p=dropout_p, generator=_generator(seed, q.device))
        return out
    if band.kind == "hyper":
        from .hyper import hyper_attention
        out, _ = hyper_attention(q, k, v, scale=scale, causal=causal, **band.params)
        return out
    from .linear import linear_attention
    full = functools.partial(linear_attention, scale=scale, causal=causal, **band.params)
    if site is None:
        return full(q, k, v)
    from .linear import incremental
    return incremental.attend(site, q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, params=band.params,
                              full=full)


@torch.library.custom_op("longattn::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
              scale: float, causal: bool, dropout_p: float, seed: Optional[torch.Tensor], plan: str) -> torch.Tensor:
    """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, Hq, Sq, Dv) in q's dtype."""
    check_call(q, k, v, attn_mask, dropout_p)
    band = _band_for_keys(plan, k)
    with torch.no_grad():
        return run_band(band, q, k, v, attn_mask, scale, causal, dropout_p, seed).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask, scale, causal, dropout_p, seed, plan):
    check_devices(q, k, v, attn_mask)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("longattn::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: Optional[torch.Tensor], scale: float, causal: bool, dropout_p: float,
                       seed: Optional[torch.Tensor], plan: str) -> list[torch.Tensor]:
    """Gradients (dq, dk, dv, dmask) by recomputing the band's forward under autograd.
    dmask is empty when the mask is absent or boolean."""
    band = _band_for_keys(plan, k)
    mask_grad = attn_mask is not None and attn_mask.is_floating_point()
    # torch.func.vjp rather than torch.autograd: inside a custom op the autograd keys are excluded,
    # functorch's transform still differentiates whatever the band runs
    if mask_grad:
        fn = lambda q_, k_, v_, m_: run_band(band, q_, k_, v_, m_, scale, causal, dropout_p, seed)
        _, vjp = torch.func.vjp(fn, q, k, v, attn_mask)
    else:
        fn = lambda q_, k_, v_: run_band(band, q_, k_, v_, attn_mask, scale, causal, dropout_p, seed)
        _, vjp = torch.func.vjp(fn, q, k, v)
    # the fake impl promises contiguous; views (grads of one gathered buffer, context parallel) would alias
    grads = [g.contiguous() if g._base is None else g.clone(memory_format=torch.contiguous_format)
             for g in vjp(grad_out.to(q.dtype))]
    if not mask_grad:
        grads.append(q.new_empty(0))
    return grads


@attention_backward.register_fake
def _(grad_out, q, k, v, attn_mask, scale, causal, dropout_p, seed, plan):
    dmask = attn_mask.new_empty(attn_mask.shape) if attn_mask is not None and attn_mask.is_floating_point() \
        else q.new_empty(0)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask]


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, causal, dropout_p, seed, plan = inputs
    ctx.save_for_backward(q, k, v, attn_mask, seed)
    ctx.scale, ctx.causal, ctx.dropout_p, ctx.plan = scale, causal, dropout_p, plan


def _backward(ctx, grad_out):
    q, k, v, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv, dmask = torch.ops.longattn.attention_backward(
        grad_out.contiguous(), q, k, v, attn_mask, ctx.scale, ctx.causal, ctx.dropout_p, seed, ctx.plan)
    if attn_mask is None or not attn_mask.is_floating_point():
        dmask = None
    return dq, dk, dv, dmask, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
