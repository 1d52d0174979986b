"""Hybrid linear attention over a sharded sequence: the far part's state is passed by a prefix scan.

Each rank's sequence is one segment (contiguous) or two (zigzag) of equal length c; segment n covers
global positions [g0, g0 + c). For a causal query at p the far keys are [sinks, p - W], so

* far part: segment n folds the keys [g0 - W, g0 + c - W) (clipped at the sinks) into the state it
  hands on. A fold is affine in the incoming state, S_out = P S_in + B (additive rule: P = I;
  delta rule: P = prod (I - beta k k^T), obtained by running the chunked recurrence from [I | 0]).
  Every rank all-gathers the (P, B) of every segment (B x Hkv x F x (F + Dv + 1) numbers each, no
  sequence length in it) and composes them in global order, which gives each segment its incoming
  state S_in; the outputs are then the chunked form started from S_in.
* exact part: the sinks (first `sink_tokens` keys) and the W keys before g0 are all-gathered as the
  heads / tails of every segment (each of at most min(sinks, c) / min(W, c) keys), then
  `exact_part` runs on [sinks | W keys before g0 | segment] whose positions line up with the global
  ones for every window and sink test.
* non-causal: every query sees the last W keys and the sinks exactly and the state over all far keys.

Communication per layer: one all-gather of the heads/tails K/V (W x n x (sinks + W) tokens) and one of the
fold transforms. Every step is differentiable (the all-gathers reduce-scatter their gradients), so the
gradient of a local shard equals the slice of the single-device gradient. The delta rule runs its chunked
recurrence twice (transform, then outputs). Per-token beta is not supported here (scalar or per-head only).

Kernels: where the single-device Triton path runs (CUDA or TRITON_INTERPRET=1, not float64, chunk sizes
16/32/64/128) the exact part is `triton_exact` (the concatenated keys need no offset: their positions
line up) and the additive far part is `triton_additive`: one states walk per segment gives both the fold
(its last state, `fold_additive`) and the states the output kernel reads, which adds S_in to every state
(`far_additive(init=)`); the backward kernels give dS_in (the reverse states' total) and the fold's
dk/dv. The delta rule stays PyTorch here (transform from [I | 0], outputs from S_in, forward and backward):
its Triton kernels start from a zero state and have no backward. float64 takes the PyTorch forms.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..linear.feature_maps import apply_feature_map, feature_dtype
from ..linear.reference import (beta_per_key, check_options, chunk_readout, chunk_states, combine, exact_part,
                                far_chunked, far_scale_per_head, pad_for_chunks, prepare_features)
from ..linear.triton_additive import FUSED_MAPS, far_additive, fold_additive
from ..linear.triton_chunk import runs_on
from ..linear.triton_exact import exact_part_triton
from ..masks import check_qkv
from .comm import all_gather, chunk_ids, keep_in_graph, resolve_group


def _fold(fk, vals, beta, update_rule, chunk):
    """The affine map of the keys on the state: (P (B, Hkv, F, F) or None for the additive rule, B (B, Hkv, F, V))."""
    B_, Hkv, L, Fd = fk.shape
    if update_rule == "add":
        return None, fk.transpose(-1, -2) @ vals
    if L == 0:
        eye = torch.eye(Fd, dtype=fk.dtype, device=fk.device).expand(B_, Hkv, Fd, Fd)
        return eye, vals.new_zeros(B_, Hkv, Fd, vals.shape[-1])
    fk, vals, beta, _ = pad_for_chunks(fk, vals, beta, causal=False, offset=None, chunk=chunk)
    N = fk.shape[2] // chunk
    # state columns [I | 0] with values [0 | v]: the final state is [P | B]
    aug = torch.cat([torch.zeros_like(fk), vals], dim=-1)
    S0 = torch.cat([torch.eye(Fd, dtype=fk.dtype, device=fk.device).expand(B_, Hkv, Fd, Fd),
                    vals.new_zeros(B_, Hkv, Fd, vals.shape[-1])], dim=-1)
    H, _ = chunk_states(fk.view(B_, Hkv, N, chunk, Fd), aug.view(B_, Hkv, N, chunk, -1),
                        beta.reshape(B_, Hkv, N, chunk), update_rule, initial=S0)
    return H[:, :, N, :, :Fd], H[:, :, N, :, Fd:]


def _far_from_state(fq, fk, vals, beta, S0, offset, update_rule, chunk):
    """`far_chunked` (causal) with the state S0 already holding every earlier far key."""
    B_, Hq, Sq, Fd = fq.shape
    Hkv, L, V = fk.shape[1], fk.shape[2], vals.shape[-1]
    G = Hq // Hkv
    if L == 0:
        return torch.einsum("bhgqf,bhfv->bhgqv", fq.view(B_, Hkv, G, Sq, Fd), S0).reshape(B_, Hq, Sq, V)
    if update_rule == "add":  # additive: the state's contribution simply adds
        local = far_chunked(fq, fk, vals, None, causal=True, offset=offset, update_rule="add", chunk=chunk)
        return local + torch.einsum("bhgqf,bhfv->bhgqv", fq.view(B_, Hkv, G, Sq, Fd), S0).reshape(B_, Hq, Sq, V)
    fk, vals, beta, shift = pad_for_chunks(fk, vals, beta, causal=True, offset=offset, chunk=chunk)
    N = fk.shape[2] // chunk
    kc = fk.view(B_, Hkv, N, chunk, Fd)
    H, vn = chunk_states(kc, vals.view(B_, Hkv, N, chunk, V), beta.reshape(B_, Hkv, N, chunk), update_rule,
                         initial=S0)
    return chunk_readout(fq, kc, vn, H, shift, reads_initial_state=True)  # H[0] = S0


class _TorchFar:
    """The far part in PyTorch, both rules: per segment its features and fold, then its outputs from S_in."""

    def __init__(self, q, *, update_rule, beta, chunk, normalize, scale, fopts):
        self.rule, self.beta, self.chunk, self.normalize = update_rule, beta, chunk, normalize
        self.scale, self.fopts, self.dt = scale, fopts, feature_dtype(q.dtype)

    def segment(self, q, k, v, causal, offset):
        feats = prepare_features(q, k, scale=self.scale, update_rule=self.rule, **self.fopts)
        vals = v.to(self.dt)
        if self.normalize:
            vals = torch.cat([vals, torch.ones_like(vals[..., :1])], dim=-1)
        B, Hkv, L = k.shape[:3]
        bk = beta_per_key(self.beta, B, Hkv, L, q.device, self.dt) if self.rule == "delta" else None
        return dict(feats=feats, vals=vals, beta=bk, offset=offset,
                    fold=_fold(feats.k, vals, bk, self.rule, self.chunk))

    def output(self, seg, S_in):
        """(far_num, q_log_scale, divided): causal outputs of the segment's queries starting from S_in."""
        f = seg["feats"]
        return _far_from_state(f.q, f.k, seg["vals"], seg["beta"], S_in, seg["offset"], self.rule, self.chunk), \
            f.q_log_scale, False

    def read(self, seg, state):
        """Non-causal: the segment's queries read `state` alone."""
        f = seg["feats"]
        B, Hq, s, Fd = f.q.shape
        Hkv = state.shape[1]
        out = torch.einsum("bhgqf,bhfv->bhgqv", f.q.view(B, Hkv, Hq // Hkv, s, Fd), state).reshape(B, Hq, s, -1)
        return out, f.q_log_scale, False


class _TritonFar:
    """The additive far part on the Triton kernels (same interface as `_TorchFar`): one states walk per
    segment gives the fold (its last state) and the states its outputs read, offset there by S_in."""

    def __init__(self, q, *, feature_map, chunk, normalize, eps, scale, fopts, exact_free):
        self.kw = dict(fmap=feature_map, chunk=chunk, normalize=normalize, eps=eps, out_dtype=q.dtype)
        self.scale, self.fopts = scale, fopts
        # no exact part and no far_scale: the kernel divides by the normaliser itself (if no log-scale either)
        self.pure = exact_free and normalize and "far_scale" not in (fopts["feature_params"] or {})

    def segment(self, q, k, v, causal, offset):
        if self.kw["fmap"] in FUSED_MAPS:  # raw q/k: the kernels apply the map
            fq, fk, lq = q, k, None
        else:
            f = apply_feature_map(q, k, feature_map=self.kw["fmap"], scale=self.scale, **self.fopts)
            fq, fk, lq = f.q, f.k, f.q_log_scale
        kw = {n: self.kw[n] for n in ("fmap", "chunk", "normalize", "out_dtype")}
        fold, states = fold_additive(fk, v, causal=causal, offset=offset, **kw)
        return dict(fq=fq, fk=fk, v=v, lq=lq, states=states, causal=causal, offset=offset, fold=(None, fold))

    def output(self, seg, S_in):
        divide = self.pure and seg["lq"] is None
        out = far_additive(seg["fq"], seg["fk"], seg["v"], init=S_in, states=seg["states"], causal=seg["causal"],
                           offset=seg["offset"], divide=divide, **self.kw)
        return out, seg["lq"], divide

    def read(self, seg, state):
        empty = dict(seg, fk=seg["fk"][:, :, :0], v=seg["v"][:, :, :0], states=None, causal=False, offset=None)
        return self.output(empty, state)


def linear_attention_cp(q, k, v, *, scale=None, causal=False, group=None, load_balance="contiguous",
                        feature_map="elu", num_features=256, seed=0, sink_tokens=0, local_window=0, normalize=True,
                        eps=1e-6, update_rule="add", beta=None, chunk_size=64, feature_params=None):
    """`linear_attention` of this rank's query shard against the whole sharded sequence (self-attention,
    same shards for q and k). Returns this rank's rows (B, Hq, s, Dv) in q's dtype. Differentiable."""
    check_qkv(q, k, v, "linear_attention")
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule=update_rule, chunk_size=chunk_size)
    if beta is not None and not isinstance(beta, (int, float)) and torch.as_tensor(beta).dim() > 1:
        raise ValueError("linear_attention (context parallel): beta must be a scalar or per key head")
    group = resolve_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ids = chunk_ids(rank, world, load_balance)
    B, Hq, s, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if k.shape[2] != s:
        raise ValueError(f"linear_attention (context parallel): self-attention shards need Sq == Sk, got {s}, {k.shape[2]}")
    c = s // len(ids)  # tokens per chunk: contiguous holds one chunk, zigzag two
    S = s * world
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = feature_dtype(q.dtype)
    s0, W = min(sink_tokens, S), local_window
    segs = [(g * c, slice(i * c, (i + 1) * c)) for i, g in enumerate(ids)]
    # the single-device dispatch's choice (`linear.__init__`): Triton kernels where they run
    fast = runs_on(q) and chunk_size in (16, 32, 64, 128)
    exact_fn = exact_part_triton if fast else exact_part
    fopts = dict(num_features=num_features, seed=seed, feature_params=feature_params)
    far = None
    if feature_map != "none":
        far = _TritonFar(q, feature_map=feature_map, chunk=chunk_size, normalize=normalize, eps=eps, scale=scale,
                         fopts=fopts, exact_free=s0 + W == 0) if fast and update_rule == "add" else \
            _TorchFar(q, update_rule=update_rule, beta=beta, chunk=chunk_size, normalize=normalize, scale=scale,
                      fopts=dict(fopts, feature_map=feature_map))

    # ---- sinks and preceding-window keys: heads and tails of every segment, gathered once
    hs, ts = min(s0, c), min(W, c)
    ctx_k = ctx_v = pos_index = got = None
    if hs + ts > 0:
        kv = torch.cat([k, v], dim=-1)
        mine = torch.cat([part for _, sl in segs
                          for part in (kv[:, :, sl][:, :, :hs], kv[:, :, sl][:, :, c - ts:])], dim=2)
        got = all_gather(mine, group)  # (W, B, Hkv, n(hs+ts), D+Dv)
        got = got.permute(1, 2, 0, 3, 4).reshape(B, Hkv, -1, D + Dv)
        pos = torch.cat([torch.cat([torch.arange(hs), c - ts + torch.arange(ts)]) + g * c
                         for r in range(world) for g in chunk_ids(r, world, load_balance)])
        pos_index = torch.full((S,), -1, dtype=torch.int64)
        pos_index[pos] = torch.arange(pos.numel())
        ctx_k, ctx_v = got[..., :D], got[..., D:]

    def context(positions):
        idx = pos_index[positions].to(q.device)
        return ctx_k[:, :, idx].to(k.dtype), ctx_v[:, :, idx].to(v.dtype)

    def finish(rows, ex, far_num, lq, divided):
        """The output rows from the exact part and the far numerator/denominator (or the divided far part)."""
        if divided:
            return far_num
        if ex is None and far_num is None:
            return q.new_zeros(B, Hq, rows, Dv)
        return combine(ex, far_num, lq, c_far, normalize=normalize, eps=eps, Dv=Dv).to(q.dtype)

    c_far = far_scale_per_head(feature_params, Hq, q.device, dt)
    if not causal:
        # the sinks and the last W keys exactly, every other key through the final state
        ex = None
        if s0 + W > 0:
            kx, vx = context(torch.cat([torch.arange(0, s0), torch.arange(max(s0, S - W), S)]))
            ex = exact_fn(q, kx, vx, scale=scale, causal=False, sink_tokens=s0, local_window=W)
        if far is None:
            return keep_in_graph(finish(s, ex, None, None, False), got)
        parts = []
        for g0, sl in segs:
            a = max(s0, g0)
            b = max(a, min(g0 + c, S - W))
            parts.append(far.segment(q, k[:, :, sl][:, :, a - g0:b - g0], v[:, :, sl][:, :, a - g0:b - g0], False,
                                     None))
        final = _incoming_states([p["fold"] for p in parts], group, ids, world, load_balance, update_rule, got)[-1]
        return keep_in_graph(finish(s, ex, *far.read(parts[0], final)), got, final)

    # ---- per segment: exact part, fold keys, their transform
    pieces = []
    for g0, sl in segs:
        lo = max(s0, g0 - W)
        pre = torch.cat([torch.arange(0, min(s0, g0)), torch.arange(lo, max(lo, g0))])
        kx, vx = k[:, :, sl], v[:, :, sl]
        if pre.numel():
            pk, pv = context(pre)
            kx, vx = torch.cat([pk, kx], 2), torch.cat([pv, vx], 2)
        ex = exact_fn(q[:, :, sl], kx, vx, scale=scale, causal=True, sink_tokens=s0, local_window=W)
        a, b = max(s0, g0 - W), max(s0, g0 + c - W)  # the far keys this segment folds
        start = pre.numel() - (g0 - a)
        seg = None
        if far is not None:  # query i (at g0 + i) sees far key j (at a + j) iff j <= i + g0 - W - a
            seg = far.segment(q[:, :, sl], kx[:, :, start:start + (b - a)], vx[:, :, start:start + (b - a)], True,
                              g0 - W - a)
        pieces.append((ex, seg))

    states = [None]
    if far is not None:
        states = _incoming_states([seg["fold"] for _, seg in pieces], group, ids, world, load_balance, update_rule,
                                  got)
    outs = [finish(c, ex, *(far.output(seg, states[ids[i]]) if far is not None else (None, None, False)))
            for i, (ex, seg) in enumerate(pieces)]
    return keep_in_graph(torch.cat(outs, dim=2), got, states[-1])


def _gathered_folds(folds, group, world, load_balance, update_rule, after=None):
    """Every segment's (P, B) in global segment order (P None for the additive rule). `after`: the
    tensor of an earlier collective, made an input so that every rank's backward runs the two
    reduce-scatters in the same order (autograd otherwise runs whichever is ready first)."""
    mats = [torch.cat([P, Bm], -1) if P is not None else Bm for P, Bm in folds]
    got = all_gather(keep_in_graph(torch.stack(mats), after), group)  # (W, n, B, Hkv, F, *)
    order = {}
    for r in range(world):
        for j, g in enumerate(chunk_ids(r, world, load_balance)):
            order[g] = (r, j)
    Fd = folds[0][1].shape[-2]
    out = []
    for g in range(len(order)):
        m = got[order[g]]
        out.append((None, m) if update_rule == "add" else (m[..., :Fd], m[..., Fd:]))
    return out


def _incoming_states(folds, group, ids, world, load_balance, update_rule, after=None):
    """The state entering each global segment: prefix composition of the gathered folds."""
    allf = _gathered_folds(folds, group, world, load_balance, update_rule, after)
    S = torch.zeros_like(allf[0][1])
    states = []
    for P, Bm in allf:
        states.append(S)
        S = (S if P is None else P @ S) + Bm
    states.append(S)  # the final state (non-causal reads it; it depends on every gathered fold)
    return states
