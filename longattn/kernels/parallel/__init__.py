"""Context parallelism: the three kinds over a sequence sharded across the ranks of a process group.

Each rank holds the same positions of q, k and v (self-attention, `shard_sequence`), contiguous or
zigzag; every function returns this rank's rows of the single-device result and is differentiable.

* flash (`ring_flash_attention`): ring attention, K/V shards passed around, log-sum-exp merging; exact.
* linear (`linear_attention_cp`): far-part state by an all-gathered prefix scan of per-segment affine
  folds; sinks and window keys all-gathered; exact (same result as one device, to float rounding).
* hyper (`hyper_attention_cp`): k/v and the queries' hash ranks all-gathered, the single-device pattern
  built on every rank, the kernels run over the local query rows only; same result as one device.

`run_sharded` is what the dispatcher calls for a band with a `context_parallel` key.
"""
from __future__ import annotations

import torch

from .comm import (LOAD_BALANCE, chunk_ids, gather_sequence, is_sharded, resolve_group, set_device_mesh,
                   shard_sequence, unshard_sequence)
from .hyper import hyper_attention_cp
from .linear import linear_attention_cp
from .ring import ring_flash_attention


def cp_group(cp: dict):
    """The process group a band's `context_parallel` settings name."""
    return resolve_group(mesh_dim=cp.get("mesh_dim"))


def active(cp) -> bool:
    """True when a band's `context_parallel` settings apply: distributed initialised, more than one rank. Without
    torch.distributed the key is ignored, `mesh_dim` too (no DeviceMesh is looked up)."""
    return cp is not None and torch.distributed.is_available() and torch.distributed.is_initialized() \
        and is_sharded(cp_group(cp))


def run_sharded(kind, q, k, v, *, attn_mask, scale, causal, dropout_p, params: dict, cp: dict):
    """One band of the dispatcher on local shards; returns this rank's output rows."""
    if attn_mask is not None or dropout_p > 0:
        raise ValueError("longattn::attention: context parallel takes no attn_mask or dropout")
    group, lb = cp_group(cp), cp.get("load_balance", "contiguous")
    if kind in ("exact", "flash"):
        return ring_flash_attention(q, k, v, scale=scale, causal=causal, group=group, load_balance=lb)[0]
    if kind == "hyper":
        return hyper_attention_cp(q, k, v, scale=scale, causal=causal, group=group, load_balance=lb, **params)[0]
    return linear_attention_cp(q, k, v, scale=scale, causal=causal, group=group, load_balance=lb, **params)


__all__ = ["ring_flash_attention", "linear_attention_cp", "hyper_attention_cp", "shard_sequence",
           "unshard_sequence", "gather_sequence", "chunk_ids", "set_device_mesh", "resolve_group", "is_sharded",
           "run_sharded", "active", "LOAD_BALANCE"]
