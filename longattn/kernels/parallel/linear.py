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
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..linear.feature_maps import feature_dtype
from ..linear.reference import (beta_per_key, check_options, chunk_readout, combine, delta_chunk_ut, exact_part,
                                far_chunked, far_scale_per_head, pad_for_chunks, prepare_features)
from ..masks import check_qkv
from .comm import all_gather, chunk_ids, keep_in_graph, resolve_group


def _states_from(kc, vc, bc, S0, update_rule):
    """States before each chunk from the initial state S0 (B, Hkv, F, V): (B, Hkv, N + 1, F, V), plus the
    values the intra-chunk part reads (V, or the delta rule's corrected values)."""
    if update_rule == "add":
        H = torch.cumsum(kc.transpose(-1, -2) @ vc, dim=2)
        return torch.cat([S0.unsqueeze(2), S0.unsqueeze(2) + H], dim=2), vc
    Wm, U = delta_chunk_ut(kc, vc, bc)
    S, states, corrected = S0, [S0], []
    for t in range(kc.shape[2]):
        u = U[:, :, t] - Wm[:, :, t] @ S
        S = S + kc[:, :, t].transpose(-1, -2) @ u
        states.append(S)
        corrected.append(u)
    return torch.stack(states, dim=2), torch.stack(corrected, dim=2)


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
    H, _ = _states_from(fk.view(B_, Hkv, N, chunk, Fd), aug.view(B_, Hkv, N, chunk, -1),
                        beta.reshape(B_, Hkv, N, chunk), S0, update_rule)
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
    H, vn = _states_from(kc, vals.view(B_, Hkv, N, chunk, V), beta.reshape(B_, Hkv, N, chunk), S0, update_rule)
    return chunk_readout(fq, kc, vn, H, shift, reads_initial_state=True)  # H[0] = S0


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
        return ctx_k[:, :, idx], ctx_v[:, :, idx]

    c_far = far_scale_per_head(feature_params, Hq, q.device, dt)
    use_far = feature_map != "none"
    if not causal:
        out, gathered = _non_causal(q, k, v, segs, context, group, ids, world, load_balance, c, S, s0, W, scale, dt,
                                    c_far, use_far, got, dict(feature_map=feature_map, num_features=num_features, seed=seed,
                                                         feature_params=feature_params, update_rule=update_rule),
                                    beta, chunk_size, normalize, eps)
        return keep_in_graph(out, got, gathered)

    # ---- per segment: exact part, fold keys, their transform
    pieces = []
    for g0, sl in segs:
        lo = max(s0, g0 - W)
        pre = torch.cat([torch.arange(0, min(s0, g0)), torch.arange(lo, max(lo, g0))])
        kx, vx = k[:, :, sl], v[:, :, sl]
        if pre.numel():
            pk, pv = context(pre)
            kx, vx = torch.cat([pk.to(k.dtype), kx], 2), torch.cat([pv.to(v.dtype), vx], 2)
        ex = exact_part(q[:, :, sl], kx, vx, scale=scale, causal=True, sink_tokens=s0, local_window=W)
        a, b = max(s0, g0 - W), max(s0, g0 + c - W)  # the far keys this segment folds
        start = pre.numel() - (g0 - a)
        piece = dict(sl=sl, g0=g0, ex=ex, a=a)
        if use_far:
            feats = prepare_features(q[:, :, sl], kx[:, :, start:start + (b - a)], feature_map=feature_map,
                                     scale=scale, num_features=num_features, seed=seed,
                                     feature_params=feature_params, update_rule=update_rule)
            vals = vx[:, :, start:start + (b - a)].to(dt)
            if normalize:
                vals = torch.cat([vals, torch.ones_like(vals[..., :1])], dim=-1)
            bk = beta_per_key(beta, B, Hkv, b - a, q.device, dt) if update_rule == "delta" else None
            piece.update(feats=feats, vals=vals, beta=bk, fold=_fold(feats.k, vals, bk, update_rule, chunk_size))
        pieces.append(piece)

    states = [None]
    if use_far:
        states = _incoming_states([p["fold"] for p in pieces], group, ids, world, load_balance, update_rule, got)
    outs = []
    for i, p in enumerate(pieces):
        far_num = lq = None
        if use_far:
            feats = p["feats"]
            far_num = _far_from_state(feats.q, feats.k, p["vals"], p["beta"], states[ids[i]],
                                      p["g0"] - W - p["a"], update_rule, chunk_size)
            lq = feats.q_log_scale
        if p["ex"] is None and far_num is None:
            outs.append(q.new_zeros(B, Hq, c, Dv))
            continue
        outs.append(combine(p["ex"], far_num, lq, c_far, normalize=normalize, eps=eps, Dv=Dv).to(q.dtype))
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


def _non_causal(q, k, v, segs, context, group, ids, world, load_balance, c, S, s0, W, scale, dt, c_far, use_far,
                got, fopts, beta, chunk_size, normalize, eps):
    """Non-causal: the sinks and the last W keys exactly, every other key through the final state."""
    B, Hq, s, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    ex = None
    if s0 + W > 0:
        kx, vx = context(torch.cat([torch.arange(0, s0), torch.arange(max(s0, S - W), S)]))
        ex = exact_part(q, kx.to(k.dtype), vx.to(v.dtype), scale=scale, causal=False, sink_tokens=s0, local_window=W)
    far_num = lq = final = None
    if use_far:
        folds, fq = [], None
        for g0, sl in segs:
            a = max(s0, g0)
            b = max(a, min(g0 + c, S - W))
            feats = prepare_features(q, k[:, :, sl][:, :, a - g0:b - g0], scale=scale, **fopts)
            fq, lq = feats.q, feats.q_log_scale
            vals = v[:, :, sl][:, :, a - g0:b - g0].to(dt)
            if normalize:
                vals = torch.cat([vals, torch.ones_like(vals[..., :1])], dim=-1)
            bk = beta_per_key(beta, B, Hkv, b - a, q.device, dt) if fopts["update_rule"] == "delta" else None
            folds.append(_fold(feats.k, vals, bk, fopts["update_rule"], chunk_size))
        final = _incoming_states(folds, group, ids, world, load_balance, fopts["update_rule"], got)[-1]
        G = Hq // Hkv
        far_num = torch.einsum("bhgqf,bhfv->bhgqv", fq.view(B, Hkv, G, s, -1), final).reshape(B, Hq, s, -1)
    if ex is None and far_num is None:
        return q.new_zeros(B, Hq, s, Dv), final
    return combine(ex, far_num, lq, c_far, normalize=normalize, eps=eps, Dv=Dv).to(q.dtype), final
