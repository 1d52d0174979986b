"""Linear attention, hybrid with exact sinks + sliding window, additive or delta-rule state. Plain PyTorch.

What a query sees (causal is bottom-right aligned: query i stands at key position p_i = i + Sk − Sq;
non-causal queries all stand at p = Sk − 1 and see every key):

- exact keys: the first `sink_tokens` keys and the `local_window` most recent ones, j ∈ (p − W, p];
  weight exp(scale·q·k_j), as in softmax attention;
- far keys: every other visible key, j ∈ [sink_tokens, p − W]; weight c_h · exp(q_log_scale) · φ(q)·φ(k_j),
  where c_h is the per-head far-part factor (`feature_params["far_scale"]`, default 1; calibration fits it);
- one shared normaliser: out = Σ_j w_j v_j / (Σ_j w_j + eps). With no exact keys this is plain normalised
  linear attention φ(q)ᵀ(Σφ(k)vᵀ) / (φ(q)·Σφ(k) + eps) (Katharopoulos et al. 2020).

With `update_rule="delta"` the far keys instead build a state by the delta rule (DeltaNet, Yang et al. 2024)
S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ over φ(k) normalised to unit length (the Householder factors
are then contractions for 0 < β ≤ 2), read as Sᵀφ(q) with φ(q) unit-length too. The normaliser is the same
recurrence run on a column of ones appended to v (for the additive rule that column is exactly Σφ(k)).

Three forms of the far part, which the tests check against each other in float64:
- `linear_attention_quadratic`: the dense (Sq × Sk) weight matrix built from the definition above (additive only);
- recurrent: one key at a time (`form="recurrent"`), the form decoding runs;
- chunked: chunks of `chunk_size` keys, quadratic inside a chunk and a carried state across chunks; the delta
  rule keeps each chunk's product of Householder factors in the UT form T = (I + tril(diag(β)KKᵀ, −1))⁻¹ diag(β)
  (Yang et al. 2024, §3), so the chunk's corrected values are U − W S with U = T V, W = T K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from ..masks import check_qkv
from .feature_maps import FEATURE_MAPS, Features, apply_feature_map, feature_dtype

UPDATE_RULES = ("add", "delta")
DEFAULT_BETA = 0.5  # delta-rule learning rate when none is given: halfway between keeping and replacing


# ----------------------------------------------------------------------------------------------- arguments

def check_options(*, causal, feature_map, sink_tokens, local_window, normalize, eps, update_rule, chunk_size,
                  where="linear_attention"):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{where}: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"{where}: update_rule must be 'add' or 'delta', got {update_rule!r}")
    for name, value in (("sink_tokens", sink_tokens), ("local_window", local_window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: {name} must be a non-negative integer, got {value!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"{where}: chunk_size must be a positive integer, got {chunk_size!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{where}: eps must be a non-negative number, got {eps!r}")
    hybrid = sink_tokens > 0 or local_window > 0
    if not normalize and hybrid:
        raise ValueError(f"{where}: normalize=False has no shared normaliser for the exact sink/window keys; "
                         f"use sink_tokens=0 and local_window=0 (got {sink_tokens} and {local_window})")
    if feature_map == "none" and not hybrid:
        raise ValueError(f"{where}: feature_map='none' keeps only sinks and the local window, "
                         "so sink_tokens or local_window must be positive")


def far_scale_per_head(feature_params: Optional[Mapping[str, Any]], heads: int, device, dtype) -> torch.Tensor:
    """The per-query-head factor c_h of the far part, (heads,); feature_params["far_scale"] (scalar or (heads,))."""
    value = (feature_params or {}).get("far_scale", 1.0)
    # python numbers are filled on the device (no host copy: decode steps must stay CUDA-graph capturable)
    c = (torch.full((1,), float(value), dtype=dtype, device=device) if isinstance(value, (int, float))
         else torch.as_tensor(value, dtype=dtype).to(device).reshape(-1))
    if c.numel() not in (1, heads):
        raise ValueError(f"linear_attention: feature_params['far_scale'] must be a scalar or have {heads} entries "
                         f"(one per query head), got {c.numel()}")
    return c.expand(heads)


def beta_per_key(beta, B: int, Hkv: int, Sk: int, device, dtype) -> torch.Tensor:
    """β as (B, Hkv, Sk) from None (DEFAULT_BETA), a scalar, a per-head (Hkv,) or a per-token (B, Hkv, Sk) value."""
    if beta is None:
        beta = DEFAULT_BETA
    if isinstance(beta, (int, float)):
        if not 0.0 <= beta <= 2.0:
            raise ValueError(f"linear_attention: beta must lie in [0, 2] for a stable delta rule, got {beta!r}")
    b = (torch.full((), float(beta), dtype=dtype, device=device) if isinstance(beta, (int, float))
         else torch.as_tensor(beta, dtype=dtype).to(device))
    if b.dim() == 0:
        return b.expand(B, Hkv, Sk)
    if b.dim() == 1 and b.shape[0] == Hkv:
        return b[None, :, None].expand(B, Hkv, Sk)
    if b.shape == (B, Hkv, Sk):
        return b
    raise ValueError(f"linear_attention: beta must be a scalar, ({Hkv},) or ({B}, {Hkv}, {Sk}), got {tuple(b.shape)}")


@dataclass(frozen=True)
class FarKeys:
    """Far keys are k[start:stop]; causal query i sees far key j' (relative to start) iff j' <= i + offset."""
    start: int
    stop: int
    offset: Optional[int]  # None for non-causal: every query sees every far key


def far_keys(Sq: int, Sk: int, causal: bool, sink_tokens: int, local_window: int) -> FarKeys:
    start = min(sink_tokens, Sk)
    stop = max(start, Sk - local_window)  # no query ever sees a key of the last window as a far key
    return FarKeys(start, stop, (Sk - Sq - local_window - start) if causal else None)


def prepare_features(q, k, *, feature_map, scale, num_features, seed, feature_params, update_rule) -> Features:
    feats = apply_feature_map(q, k, feature_map=feature_map, scale=scale, num_features=num_features, seed=seed,
                              feature_params=feature_params)
    if update_rule == "delta" and feature_map != "none":
        # unit-length keys keep I − β k kᵀ a contraction; unit queries make the read-out scale-free
        feats = Features(F.normalize(feats.q, dim=-1), F.normalize(feats.k, dim=-1), None)
    return feats


# ----------------------------------------------------------------------------------------------- exact part

def _partial_softmax(scores: torch.Tensor, values: torch.Tensor, value_eq: str):
    """(max, Σexp, Σexp·v) of masked scores (−inf = absent); rows with no key give (−inf, 0, 0)."""
    # the max is only a reference point (l and acc are relative to it), so it carries no gradient
    m = scores.amax(-1).detach()
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    return m, p.sum(-1), torch.einsum(value_eq, p, values)


def _merge_partials(a, b):
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    w1, w2 = torch.exp(m1 - m_safe), torch.exp(m2 - m_safe)
    return m, l1 * w1 + l2 * w2, acc1 * w1.unsqueeze(-1) + acc2 * w2.unsqueeze(-1)


def exact_part(q, k, v, *, scale: float, causal: bool, sink_tokens: int, local_window: int,
               max_scores: int = 1 << 25):
    """Softmax pieces over the exact keys (sinks and local window) without an (Sq × Sk) matrix.

    Returns m (B, Hq, Sq) (−inf where a row has no exact key), l = Σ exp(s − m) (B, Hq, Sq) and
    acc = Σ exp(s − m) v (B, Hq, Sq, Dv), in float32 (float64 for float64 inputs); None if there are no exact keys.
    The window is computed in blocks of `block` queries against `block + W − 1` keys, a few blocks at a time.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    sink, W = min(sink_tokens, Sk), local_window
    if sink == 0 and W == 0:
        return None
    dt = feature_dtype(q.dtype)
    qg = (q.to(dt) * scale).view(B, Hkv, G, Sq, D)
    k, v = k.to(dt), v.to(dt)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=q.device)
    if not causal:
        # every query stands at Sk − 1: one shared key set
        idx = torch.cat([torch.arange(sink), torch.arange(max(sink, Sk - W), Sk)]).to(q.device)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k[:, :, idx])
        m, l, acc = _partial_softmax(scores, v[:, :, idx], "bhgqk,bhkv->bhgqv")
        return m.reshape(B, Hq, Sq), l.reshape(B, Hq, Sq), acc.reshape(B, Hq, Sq, Dv)
    delta = Sk - Sq
    pos = torch.arange(Sq, device=q.device) + delta  # key position of each query
    parts = None
    if sink > 0:
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k[:, :, :sink])
        visible = torch.arange(sink, device=q.device)[None, :] <= pos[:, None]
        parts = _partial_softmax(torch.where(visible, scores, neg_inf), v[:, :, :sink], "bhgqk,bhkv->bhgqv")
    if W > 0:
        block = max(16, min(W, 256))
        span = block + W - 1
        nb = -(-Sq // block)
        first = delta - W + 1  # key index of slot 0 of block 0
        left = max(0, -first)
        right = max(0, first + (nb - 1) * block + span - Sk)
        kp = F.pad(k, (0, 0, left, right))[:, :, first + left: first + left + (nb - 1) * block + span]
        vp = F.pad(v, (0, 0, left, right))[:, :, first + left: first + left + (nb - 1) * block + span]
        kw, vw = kp.unfold(2, span, block), vp.unfold(2, span, block)  # (B, Hkv, nb, D, span): views, no copies
        qb = F.pad(qg, (0, 0, 0, nb * block - Sq)).view(B, Hkv, G, nb, block, D)
        row = torch.arange(block, device=q.device)[:, None]
        slot = torch.arange(span, device=q.device)[None, :]
        per_block = max(1, max_scores // max(1, B * Hq * block * span))
        pieces = []
        for n0 in range(0, nb, per_block):
            n = torch.arange(n0, min(nb, n0 + per_block), device=q.device)[:, None, None]
            j = first + n * block + slot                      # key index (nblk, 1, span)
            p = n * block + row + delta                       # query position (nblk, block, 1)
            keep = (j > p - W) & (j <= p) & (j >= sink) & (j >= 0) & (j < Sk)
            s = torch.einsum("bhgnqd,bhnds->bhgnqs", qb[:, :, :, n0:n0 + n.shape[0]], kw[:, :, n0:n0 + n.shape[0]])
            pieces.append(_partial_softmax(torch.where(keep, s, neg_inf), vw[:, :, n0:n0 + n.shape[0]],
                                           "bhgnqs,bhnvs->bhgnqv"))
        m, l, acc = (torch.cat([pc[i] for pc in pieces], dim=3) for i in range(3))
        window = (m.flatten(3, 4)[..., :Sq], l.flatten(3, 4)[..., :Sq], acc.flatten(3, 4)[..., :Sq, :])
        parts = window if parts is None else _merge_partials(parts, window)
    m, l, acc = parts
    return m.reshape(B, Hq, Sq), l.reshape(B, Hq, Sq), acc.reshape(B, Hq, Sq, Dv)


def combine(exact, far_num, q_log_scale, far_scale, *, normalize: bool, eps: float, Dv: int):
    """Exact and far parts under one normaliser.

    exact: (m, l, acc) or None; far_num: (B, Hq, Sq, Dv + 1) (last column = the normaliser's far part) when
    normalising, (B, Hq, Sq, Dv) otherwise, or None; q_log_scale (B, Hq, Sq) or None; far_scale (Hq,).
    out = (e^m acc + c e^lq far[:Dv]) / (e^m l + c e^lq far[Dv] + eps), evaluated relative to M = max(m, lq).
    """
    c = far_scale[None, :, None]
    if not normalize:
        out = far_num * c.unsqueeze(-1)
        return out if q_log_scale is None else out * torch.exp(q_log_scale).unsqueeze(-1)
    ref = exact[2] if exact is not None else far_num
    lq = torch.zeros(ref.shape[:-1], dtype=ref.dtype, device=ref.device) if q_log_scale is None else q_log_scale
    M = lq if exact is None else torch.maximum(exact[0], lq)
    M = M.detach()  # the output does not depend on M; it only keeps the exponentials in range
    num = torch.zeros(*lq.shape, Dv, dtype=lq.dtype, device=lq.device)
    den = eps * torch.exp(-M)
    if exact is not None:
        m, l, acc = exact
        we = torch.exp(m - M)  # 0 where the row has no exact key (m = −inf)
        num = num + we.unsqueeze(-1) * acc
        den = den + we * l
    if far_num is not None:
        wf = c * torch.exp(lq - M)
        num = num + wf.unsqueeze(-1) * far_num[..., :Dv]
        den = den + wf * far_num[..., Dv]
    return num / den.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------- far part

def far_recurrent(fq, fk, vals, beta, *, causal: bool, offset: Optional[int], update_rule: str):
    """One key at a time. fq (B, Hq, Sq, F), fk (B, Hkv, L, F), vals (B, Hkv, L, V), beta (B, Hkv, L) or None.
    Returns (B, Hq, Sq, V): each query's read-out Sᵀφ(q) of the state after the far keys it sees."""
    B, Hq, Sq, Fd = fq.shape
    Hkv, L, V = fk.shape[1], fk.shape[2], vals.shape[-1]
    G = Hq // Hkv
    qg = fq.view(B, Hkv, G, Sq, Fd)
    S = fq.new_zeros(B, Hkv, Fd, V)
    outs = [None] * Sq
    for t in range(L):
        kt, vt = fk[:, :, t], vals[:, :, t]
        if update_rule == "add":
            S = S + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        else:
            residual = vt - torch.einsum("bhf,bhfv->bhv", kt, S)
            S = S + beta[:, :, t, None, None] * kt.unsqueeze(-1) * residual.unsqueeze(-2)
        i = t - offset if causal else None
        if causal and 0 <= i < Sq:
            outs[i] = torch.einsum("bhgf,bhfv->bhgv", qg[:, :, :, i], S)
    if not causal:
        return torch.einsum("bhgqf,bhfv->bhgqv", qg, S).reshape(B, Hq, Sq, V)
    zero = fq.new_zeros(B, Hkv, G, V)
    return torch.stack([zero if o is None else o for o in outs], dim=3).reshape(B, Hq, Sq, V)


def pad_for_chunks(fk, vals, beta, *, causal: bool, offset: Optional[int], chunk: int):
    """Zero keys in front so the causal offset becomes a multiple of the chunk, and at the end to whole chunks.

    A zero key adds nothing to an additive state and is the identity for the delta rule (I − β·0·0ᵀ, update 0).
    Returns (fk, vals, beta, shift): query chunk c then reads key chunk c + shift with an inclusive causal mask.
    """
    L = fk.shape[2]
    front = (-offset) % chunk if causal else 0
    shift = (offset + front) // chunk if causal else None
    back = -(-(front + L) // chunk) * chunk - front - L
    fk = F.pad(fk, (0, 0, front, back))
    vals = F.pad(vals, (0, 0, front, back))
    beta = None if beta is None else F.pad(beta, (front, back))
    return fk, vals, beta, shift


def delta_chunk_ut(kc, vc, bc):
    """UT form of one chunk of the delta rule: (W, U) = T (K, V), T = (I + tril(diag(β) K Kᵀ, −1))⁻¹ diag(β).
    kc (..., C, F), vc (..., C, V), bc (..., C)."""
    C = kc.shape[-2]
    A = torch.tril(bc.unsqueeze(-1) * (kc @ kc.transpose(-1, -2)), diagonal=-1)
    L = A + torch.eye(C, dtype=kc.dtype, device=kc.device)
    W = torch.linalg.solve_triangular(L, bc.unsqueeze(-1) * kc, upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(L, bc.unsqueeze(-1) * vc, upper=False, unitriangular=True)
    return W, U


def chunk_states(kc, vc, bc, update_rule: str, initial: Optional[torch.Tensor] = None):
    """States before each chunk, H (B, Hkv, N + 1, F, V) (H[:, :, t] = state over chunks < t, starting from
    `initial` (B, Hkv, F, V), zero by default), and the values each chunk's intra-chunk part uses (V itself,
    or the delta rule's corrected values U − W S)."""
    if update_rule == "add":
        H = torch.cumsum(kc.transpose(-1, -2) @ vc, dim=2)
        if initial is None:
            return torch.cat([torch.zeros_like(H[:, :, :1]), H], dim=2), vc
        return torch.cat([initial.unsqueeze(2), initial.unsqueeze(2) + H], dim=2), vc
    W, U = delta_chunk_ut(kc, vc, bc)
    S = kc.new_zeros(*kc.shape[:2], kc.shape[-1], vc.shape[-1]) if initial is None else initial
    states, corrected = [S], []
    for t in range(kc.shape[2]):
        u = U[:, :, t] - W[:, :, t] @ S
        S = S + kc[:, :, t].transpose(-1, -2) @ u
        states.append(S)
        corrected.append(u)
    return torch.stack(states, dim=2), torch.stack(corrected, dim=2)


def far_chunked(fq, fk, vals, beta, *, causal: bool, offset: Optional[int], update_rule: str, chunk: int):
    """Chunkwise form; same contract as `far_recurrent`."""
    B, Hq, Sq, Fd = fq.shape
    Hkv, V = fk.shape[1], vals.shape[-1]
    G = Hq // Hkv
    fk, vals, beta, shift = pad_for_chunks(fk, vals, beta, causal=causal, offset=offset, chunk=chunk)
    N = fk.shape[2] // chunk
    kc = fk.view(B, Hkv, N, chunk, Fd)
    vc = vals.view(B, Hkv, N, chunk, V)
    bc = None if beta is None else beta.reshape(B, Hkv, N, chunk)
    H, vn = chunk_states(kc, vc, bc, update_rule)
    if not causal:
        return torch.einsum("bhgqf,bhfv->bhgqv", fq.view(B, Hkv, G, Sq, Fd), H[:, :, N]).reshape(B, Hq, Sq, V)
    return chunk_readout(fq, kc, vn, H, shift, reads_initial_state=False)


def chunk_readout(fq, kc, vn, H, shift: int, reads_initial_state: bool):
    """Causal outputs from the chunk states: query chunk i reads key chunk t = i + shift, through the
    state before it (H[:, :, t]) plus its causal intra-chunk part. Query chunks before the first key
    chunk (t < 0) read H[:, :, 0] when it holds an incoming state (`reads_initial_state`), else nothing.
    fq (B, Hq, Sq, F); kc (B, Hkv, N, C, F); vn (B, Hkv, N, C, V); H (B, Hkv, N + 1, F, V)."""
    B, Hq, Sq, Fd = fq.shape
    Hkv, N, chunk, V = kc.shape[1], kc.shape[2], kc.shape[3], vn.shape[-1]
    G = Hq // Hkv
    nq = -(-Sq // chunk)
    qc = F.pad(fq, (0, 0, 0, nq * chunk - Sq)).view(B, Hkv, G, nq, chunk, Fd)
    t = torch.arange(nq, device=fq.device) + shift  # the key chunk each query chunk reads
    inter = torch.einsum("bhgncf,bhnfv->bhgncv", qc, H[:, :, t.clamp(0, N)])
    if not reads_initial_state:
        inter = inter * (t >= 0).to(fq.dtype)[:, None, None]
    has_intra = (t >= 0) & (t < N)
    tc = t.clamp(0, N - 1)
    scores = torch.einsum("bhgncf,bhndf->bhgncd", qc, kc[:, :, tc])
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    scores = scores * (tril & has_intra[:, None, None]).to(fq.dtype)
    out = inter + torch.einsum("bhgncd,bhndv->bhgncv", scores, vn[:, :, tc])
    return out.reshape(B, Hq, nq * chunk, V)[:, :, :Sq]


# ----------------------------------------------------------------------------------------------- public forms

def linear_attention_reference(q, k, v, *, scale=None, causal=False, feature_map="elu", num_features=256, seed=0,
                               sink_tokens=0, local_window=0, normalize=True, eps=1e-6, update_rule="add",
                               beta=None, chunk_size=64, feature_params=None, form="chunked", far_fn=None,
                               exact_fn=None):
    """Hybrid linear attention (see the module docstring), far part in `form` "chunked" or "recurrent".

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), Hq a multiple of Hkv (never repeated);
    accumulation in float32 (float64 for float64 inputs). Returns (B, Hq, Sq, Dv) in q's dtype.
    `far_fn` replaces the far part's computation (the Triton path plugs in here): `far_chunked`'s contract plus
    an `input_dtype` keyword (q's dtype). `exact_fn` replaces `exact_part` (same contract) likewise.
    """
    check_qkv(q, k, v, "linear_attention")
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule=update_rule, chunk_size=chunk_size)
    if form not in ("chunked", "recurrent"):
        raise ValueError(f"linear_attention_reference: form must be 'chunked' or 'recurrent', got {form!r}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = feature_dtype(q.dtype)
    exact = (exact_fn or exact_part)(q, k, v, scale=scale, causal=causal, sink_tokens=sink_tokens,
                                     local_window=local_window)
    fr = far_keys(Sq, Sk, causal, sink_tokens, local_window)
    far_num, lq = None, None
    if feature_map != "none" and fr.stop > fr.start:
        feats = prepare_features(q, k[:, :, fr.start:fr.stop], feature_map=feature_map, scale=scale,
                                 num_features=num_features, seed=seed, feature_params=feature_params,
                                 update_rule=update_rule)
        vals = v[:, :, fr.start:fr.stop].to(dt)
        if normalize:
            vals = torch.cat([vals, torch.ones_like(vals[..., :1])], dim=-1)
        b = beta_per_key(beta, B, Hkv, Sk, q.device, dt)[:, :, fr.start:fr.stop] if update_rule == "delta" else None
        if far_fn is not None:
            far_num = far_fn(feats.q, feats.k, vals, b, causal=causal, offset=fr.offset, update_rule=update_rule,
                             chunk=chunk_size, input_dtype=q.dtype)
        elif form == "chunked":
            far_num = far_chunked(feats.q, feats.k, vals, b, causal=causal, offset=fr.offset,
                                  update_rule=update_rule, chunk=chunk_size)
        else:
            far_num = far_recurrent(feats.q, feats.k, vals, b, causal=causal, offset=fr.offset,
                                    update_rule=update_rule)
        lq = feats.q_log_scale
    elif not normalize:
        return q.new_zeros(B, Hq, Sq, Dv)
    c = far_scale_per_head(feature_params, Hq, q.device, dt)
    if exact is None and far_num is None:  # no key is visible to anyone (e.g. Sk == 0)
        return q.new_zeros(B, Hq, Sq, Dv)
    out = combine(exact, far_num, lq, c, normalize=normalize, eps=eps, Dv=Dv)
    return out.to(q.dtype)


def linear_attention_quadratic(q, k, v, *, scale=None, causal=False, feature_map="elu", num_features=256, seed=0,
                               sink_tokens=0, local_window=0, normalize=True, eps=1e-6, feature_params=None):
    """The additive rule from its definition: the dense (Sq × Sk) weight matrix, every key classified as
    exact, far or invisible. Slow and memory-hungry; what the other forms are tested against."""
    check_qkv(q, k, v, "linear_attention_quadratic")
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule="add", chunk_size=1)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = feature_dtype(q.dtype)
    feats = apply_feature_map(q, k, feature_map=feature_map, scale=scale, num_features=num_features, seed=seed,
                              feature_params=feature_params)
    pos = (torch.arange(Sq) + Sk - Sq) if causal else torch.full((Sq,), Sk - 1)
    j = torch.arange(Sk)[None, :]
    p = pos[:, None]
    visible = (j <= p) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    exact = visible & ((j < sink_tokens) | (j > p - local_window))
    far = visible & ~exact
    exact, far = exact.to(q.device), far.to(q.device)
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.to(dt).view(B, Hkv, G, Sq, D), k.to(dt)) * scale
    phi = torch.einsum("bhgqf,bhkf->bhgqk", feats.q.view(B, Hkv, G, Sq, -1), feats.k)
    lq = torch.zeros(B, Hq, Sq, dtype=dt, device=q.device) if feats.q_log_scale is None else feats.q_log_scale
    lq = lq.view(B, Hkv, G, Sq, 1)
    c = far_scale_per_head(feature_params, Hq, q.device, dt).view(1, Hkv, G, 1, 1)
    M = torch.where(exact, s, torch.tensor(float("-inf"), dtype=dt)).amax(-1, keepdim=True)
    M = torch.maximum(M, lq).detach()
    w = torch.where(exact, torch.exp(s - M), torch.zeros_like(s)) + torch.where(far, c * torch.exp(lq - M) * phi,
                                                                                 torch.zeros_like(s))
    if not normalize:
        w = torch.where(far, c * torch.exp(lq) * phi, torch.zeros_like(s))
        out = torch.einsum("bhgqk,bhkv->bhgqv", w, v.to(dt))
    else:
        out = torch.einsum("bhgqk,bhkv->bhgqv", w, v.to(dt)) / (w.sum(-1, keepdim=True) + eps * torch.exp(-M))
    return out.reshape(B, Hq, Sq, -1).to(q.dtype)
