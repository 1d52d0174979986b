"""HyperAttention over a sharded sequence: the simplest design that reproduces single-device results.

Every rank all-gathers q, k and v (differentiable: the backward reduce-scatters their gradients),
runs single-device `hyper_attention` on the full sequence with the policy's seed (so the hyperplanes,
hashes, sorts and samples are exactly those of one device) and keeps its own query rows.

Cost per layer: one all-gather of q, k, v (each rank receives (W - 1)/W of the full q/k/v), memory of
the full q/k/v/out on every rank, and W-fold redundant compute: this buys exactness of the pattern,
not speed. Computing only the local query rows from a pattern built with gathered *hash ranks* (int64,
no q copy) is the next step (not done).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..hyper import hyper_attention
from .comm import gather_many, resolve_group, shard_sequence, unshard_sequence


def hyper_attention_cp(q, k, v, *, scale=None, causal=False, group=None, load_balance="contiguous", **params):
    """Rows of single-device `hyper_attention(full q, full k, full v)` for this rank's shard:
    (out (B, Hq, s, Dv), lse (B, Hq, s) float32). Differentiable."""
    group = resolve_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # one collective for q, k and v; every rank then holds the global sequence in global order
    qf, kf, vf = (unshard_sequence(torch.cat(g.unbind(0), 2), world, 2, load_balance)
                  for g in gather_many([q, k, v], group))
    out, lse = hyper_attention(qf, kf, vf, scale=scale, causal=causal, **params)
    return (shard_sequence(out, rank, world, 2, load_balance).contiguous(),
            shard_sequence(lse, rank, world, 2, load_balance).contiguous())
