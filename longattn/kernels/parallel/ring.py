"""Exact attention over a sharded sequence: ring attention with log-sum-exp merging.

Forward: W steps; at step s a rank holds the K/V shard of rank (r - s) mod W, computes its queries'
partial (out, lse) against it with `flash_attention` (pairs of chunks by global position: earlier key
chunk = full block, same chunk = causal diagonal, later chunk = skipped) and merges by log-sum-exp,
while the next shard is already in flight (batch_isend_irecv to rank r+1, from rank r-1).
Communication per layer: (W-1) x the local K/V shard sent and received by every rank.

Backward: the ring runs again. Each block's contribution to dQ/dK/dV is the flash backward of the
block given the *global* out and lse (P = exp(S - lse) is then the block's slice of the global
probabilities), so no partial forward is recomputed. dK/dV accumulators (float32) travel with their
K/V shard and reach home after one extra shift: (W-1) x K/V + W x float32 dK/dV per rank.
Memory: two K/V shards (current and in flight) plus, in backward, their dK/dV accumulators.

Both directions are `torch.library` custom ops called from an `autograd.Function` with setup_context,
so plain autograd and torch.func (the dispatcher's recomputing backward) both reach them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..flash import flash_attention, triton_supports
from ..lse import merge_by_lse
from .comm import _group, chunk_ids, group_name, ring_shift, wait


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pairs(rank, src, world, load_balance, causal, n_rows):
    """(query rows slice, key rows slice, causal) of the blocks of query shard `rank` vs key shard `src`."""
    if not causal:
        return [(slice(0, n_rows), slice(0, n_rows), False)]
    qids, kids = chunk_ids(rank, world, load_balance), chunk_ids(src, world, load_balance)
    c = n_rows // len(qids)
    out = []
    for i, qc in enumerate(qids):
        for j, kc in enumerate(kids):
            if kc <= qc:  # an earlier chunk is seen whole; the same chunk through the causal diagonal
                out.append((slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c), kc == qc))
    return out


def _block_forward(q, k, v, scale, causal, row_block=1024):
    """(out, lse) of one block: the flash kernels where they run, else plain PyTorch in the accumulator dtype
    (float64 stays float64: the reference's float32 lse would cost the merge its digits)."""
    if triton_supports(q, k, v):
        return flash_attention(q, k, v, scale=scale, causal=causal)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dt = _acc_dtype(q.dtype)
    kf, vf = k.to(dt), v.to(dt)
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=dt, device=q.device)
    for r0 in range(0, Sq, row_block):
        r1 = min(r0 + row_block, Sq)
        s = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, r0:r1].to(dt).reshape(B, Hkv, G, r1 - r0, D), kf) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device)[:, None] + (Sk - Sq)
            s = s.masked_fill(torch.arange(Sk, device=q.device)[None, :] > rows, float("-inf"))
        l = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isfinite(l), l, torch.zeros_like(l)).unsqueeze(-1))
        out[:, :, r0:r1] = torch.einsum("bhgqk,bhkv->bhgqv", p, vf).reshape(B, Hq, r1 - r0, -1)
        lse[:, :, r0:r1] = l.reshape(B, Hq, r1 - r0)
    return out, lse


def _block_backward_reference(dout, dlse, q, k, v, out, lse, scale, causal, row_block=1024):
    """(dq, dk, dv) of one block given the global out/lse of its rows, in plain PyTorch (accumulator dtype)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dt = _acc_dtype(q.dtype)
    kf, vf = k.to(dt), v.to(dt)
    dq = torch.zeros(B, Hq, Sq, D, dtype=dt, device=q.device)
    dk, dv = torch.zeros(k.shape, dtype=dt, device=q.device), torch.zeros(v.shape, dtype=dt, device=q.device)
    delta = (dout.to(dt) * out.to(dt)).sum(-1) - dlse.to(dt)  # rowsum(dO * O) - dlse
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).to(dt)
    for r0 in range(0, Sq, row_block):
        r1 = min(r0 + row_block, Sq)
        qb = q[:, :, r0:r1].to(dt).reshape(B, Hkv, G, r1 - r0, D)
        dob = dout[:, :, r0:r1].to(dt).reshape(B, Hkv, G, r1 - r0, -1)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qb, kf) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device)[:, None] + (Sk - Sq)
            s = s.masked_fill(torch.arange(Sk, device=q.device)[None, :] > rows, float("-inf"))
        p = torch.exp(s - lse_safe[:, :, r0:r1].reshape(B, Hkv, G, r1 - r0, 1))
        dp = torch.einsum("bhgqv,bhkv->bhgqk", dob, vf)
        ds = p * (dp - delta[:, :, r0:r1].reshape(B, Hkv, G, r1 - r0, 1))
        dq[:, :, r0:r1] = (torch.einsum("bhgqk,bhkd->bhgqd", ds, kf) * scale).reshape(B, Hq, r1 - r0, D)
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, qb) * scale
        dv += torch.einsum("bhgqk,bhgqv->bhkv", p, dob)
    return dq, dk, dv


def _block_backward(dout, dlse, q, k, v, out, lse, scale, causal):
    if triton_supports(q, k, v):
        from ..flash.triton_bwd import flash_backward
        return flash_backward(dout, dlse, q, k, v, out, lse, scale, causal)
    return _block_backward_reference(dout, dlse, q, k, v, out, lse, scale, causal)


@torch.library.custom_op("longattn_cp::ring_attention", mutates_args=())
def ring_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, group: str,
                       load_balance: str) -> tuple[torch.Tensor, torch.Tensor]:
    pg = _group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    B, Hq, S, _ = q.shape
    dt = _acc_dtype(q.dtype)
    out = torch.zeros(B, Hq, S, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.full((B, Hq, S), float("-inf"), dtype=dt, device=q.device)
    kv, reqs = [k, v], None
    for step in range(world):
        wait(reqs)
        src = (rank - step) % world
        nxt, reqs = ring_shift(kv, pg) if step < world - 1 else (None, None)  # overlap: next shard in flight
        for rows, cols, diag in _pairs(rank, src, world, load_balance, causal, S):
            o, l = _block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], scale, diag)
            out[:, :, rows], lse[:, :, rows] = merge_by_lse(out[:, :, rows], lse[:, :, rows], o, l.to(dt))
        kv = nxt
    return out.to(q.dtype), lse  # lse float64 for float64 inputs: the backward reads it


@ring_attention_fwd.register_fake
def _(q, k, v, scale, causal, group, load_balance):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("longattn_cp::ring_attention_backward", mutates_args=())
def ring_attention_bwd(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool, group: str,
                       load_balance: str) -> list[torch.Tensor]:
    pg = _group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    S = q.shape[2]
    dt = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    kv = [k, v]
    dkv = [torch.zeros(k.shape, dtype=dt, device=q.device), torch.zeros(v.shape, dtype=dt, device=q.device)]
    reqs = None
    for step in range(world):
        wait(reqs)
        src = (rank - step) % world
        nxt, reqs = ring_shift(kv, pg) if step < world - 1 else (None, None)
        for rows, cols, diag in _pairs(rank, src, world, load_balance, causal, S):
            gq, gk, gv = _block_backward(dout[:, :, rows], dlse[:, :, rows], q[:, :, rows], kv[0][:, :, cols],
                                         kv[1][:, :, cols], out[:, :, rows], lse[:, :, rows], scale, diag)
            dq[:, :, rows] += gq.to(dt)
            dkv[0][:, :, cols] += gk.to(dt)
            dkv[1][:, :, cols] += gv.to(dt)
        # the accumulators follow their shard one step behind K/V; after the last step they go home
        dkv, dreqs = ring_shift(dkv, pg)
        wait(dreqs)
        kv = nxt
    return [dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)]


@ring_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, scale, causal, group, load_balance):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


class _RingAttention(torch.autograd.Function):
    """Autograd for the ring (custom ops inside, setup_context for torch.func, as `flash/autograd.py`)."""

    @staticmethod
    def forward(q, k, v, scale, causal, group, load_balance):
        return ring_attention_fwd(q, k, v, scale, causal, group, load_balance)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal, group, load_balance = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, group, load_balance)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse.to(lse.dtype)
        dq, dk, dv = ring_attention_bwd(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def ring_flash_attention(q, k, v, *, scale=None, causal=False, group=None, load_balance="contiguous"):
    """Exact attention of local query shards against the whole (sharded) sequence.

    q (B, Hq, s, D), k (B, Hkv, s, D), v (B, Hkv, s, Dv): this rank's shard (see `comm.shard_sequence`) of
    a self-attention sequence of length s x W. Returns this rank's (out (B, Hq, s, Dv), lse (B, Hq, s)
    float32), equal to the corresponding rows of single-device `flash_attention`. Differentiable.
    """
    from .comm import resolve_group
    group = resolve_group(group)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"ring_flash_attention: self-attention shards need Sq == Sk, got {q.shape[2]} and {k.shape[2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, bool(causal),
                                  group_name(group), load_balance)
    return out, lse.float()
