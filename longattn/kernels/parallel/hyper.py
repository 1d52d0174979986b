"""HyperAttention over a sharded sequence: this rank's query rows of the single-device result, computed here only.

Communicated per layer: one all-gather of k and v (differentiable: the backward reduce-scatters dk and dv)
and one of the queries' LSH ranks, (B, Hq, S) int32, instead of q: the hash is per row, so every rank
hashes its own rows with the seed's hyperplanes. Importance sampling (the default) also needs each rectangle's
mean query: its 256 rows are summed over the ranks (one all-reduce per level, each row from the rank that holds
it), so every rank computes the one device's mean. Every rank then builds the pattern one device would
build (same hyperplanes, hashes, sorts, blocks, samples) and restricts it to its rows (`local_pattern`):
the forward and backward kernels run over those rows only, against the keys at their global positions.
dq stays local.

Memory per rank: the full k and v (and, in the backward, their float32 gradients), the pattern's index
tensors for the whole sequence (per level an int64 (B, Hq, S) query and (B, Hkv, S) key order) plus the
local query order; q, out, lse and dq of the local rows only.
Compute per rank: the attention of its S / W rows; causally a later row lies in more rectangles, which
zigzag sharding evens out. Hashing k and sorting the gathered ranks is repeated on every rank (integer
work of order S log S, small next to the attention).

Below `min_seq_len` keys HyperAttention is exact attention: ring attention here.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.distributed as dist

from ..hyper import _use_triton, hyper_attention
from ..hyper.pattern import (build_pattern, check_params, hyperplanes, local_pattern, lsh_rank, mean_of_rows,
                             mean_query_rows)
from ..hyper.reference import hyper_attention_from_pattern
from ..masks import check_qkv
from .comm import all_gather, gather_many, resolve_group, shard_sequence, unshard_sequence
from .ring import ring_flash_attention

# `build_pattern`'s keyword arguments with `hyper_attention`'s defaults
_DEFAULTS = {n: p.default for n, p in inspect.signature(hyper_attention).parameters.items()
             if p.kind is p.KEYWORD_ONLY and n not in ("scale", "causal", "return_lse")}


def _gathered_mean_rows(rects, *, q, rows, S, group):
    """The full q's `mean_query_rows`, float32, from the shards: each row comes from the one rank holding it
    and the others add zeros, so the sum is exact and the mean then taken is the one device's, bit for bit."""
    local = torch.full((S,), -1, dtype=torch.int64, device=q.device)
    local[rows] = torch.arange(rows.numel(), device=q.device)
    at = local[mean_query_rows(rects).flatten()]
    picked = q.detach()[:, :, at.clamp(min=0)].float() * (at >= 0)[:, None]
    dist.all_reduce(picked, group=group)
    return picked


def _global_pattern(q, k, *, causal, rank_fn, group, load_balance, rows, params):
    """The single-device pattern, from this rank's rows of q hashed here and every rank's ranks gathered."""
    Hkv, S, D = k.shape[1:]
    planes = hyperplanes(Hkv, D, params["lsh_bits"], params["seed"], str(k.device))
    mine = rank_fn(q, planes, q.shape[1] // Hkv).to(torch.int32)  # ranks fit 16 bits
    got = all_gather(mine, group)  # (W, B, Hq, s); integers, no gradient
    world = got.shape[0]
    q_rank = unshard_sequence(torch.cat(got.unbind(0), -1), world, -1, load_balance).long()
    means = lambda rects: mean_of_rows(_gathered_mean_rows(rects, q=q, rows=rows, S=S, group=group), q.shape[1] // Hkv)
    return build_pattern(None, k, causal=causal, rank_fn=rank_fn, q_rank=q_rank, q_means=means, **params)


def hyper_attention_cp(q, k, v, *, scale=None, causal=False, group=None, load_balance="contiguous", **params):
    """Rows of single-device `hyper_attention(full q, full k, full v, **params)` for this rank's shard:
    (out (B, Hq, s, Dv), lse (B, Hq, s) float32). q/k/v: this rank's shards (`shard_sequence`) of one
    self-attention sequence of length s x W. Differentiable."""
    check_qkv(q, k, v, "hyper_attention_cp")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"hyper_attention_cp: self-attention shards need Sq == Sk, got {q.shape[2]} and {k.shape[2]}")
    params = {**_DEFAULTS, **params}
    params.pop("return_lse", None)
    check_params(**{n: p for n, p in params.items() if n != "seed"})
    group = resolve_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    S = k.shape[2] * world
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if S < params["min_seq_len"] or S == 0:
        return ring_flash_attention(q, k, v, scale=scale, causal=causal, group=group, load_balance=load_balance)

    kf, vf = (unshard_sequence(torch.cat(g.unbind(0), 2), world, 2, load_balance) for g in gather_many([k, v], group))
    rows = shard_sequence(torch.arange(S, device=q.device), rank, world, 0, load_balance)  # increasing
    pattern_of = functools.partial(_global_pattern, causal=causal, group=group, load_balance=load_balance,
                                   rows=rows, params=dict(params, scale=scale))
    if _use_triton(q, v) and k.dtype == v.dtype == q.dtype:
        from ..hyper.triton_attention import hyper_attention_triton
        from ..hyper.triton_hash import lsh_rank_triton
        make = lambda q_, k_: local_pattern(pattern_of(q_, k_, rank_fn=lsh_rank_triton), rows)
        return hyper_attention_triton(q, kf, vf, scale=scale, causal=causal, make_pattern=make)
    # the PyTorch reference computes every row of a pattern: give it q with zeros in the other ranks' rows
    # (their outputs are dropped, so nothing flows back through them) and keep ours
    pattern = pattern_of(q, kf, rank_fn=lsh_rank)
    qf = q.new_zeros(*q.shape[:2], S, q.shape[3]).index_copy(2, rows, q)
    out, lse = hyper_attention_from_pattern(qf, kf, vf, pattern, scale=scale, causal=causal)
    return out.index_select(2, rows), lse.index_select(2, rows)
