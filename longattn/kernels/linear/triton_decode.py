"""One fused Triton kernel per decoded token for additive linear attention with an elementwise map.

Each program serves one key head and its whole query group (the group's rows are one tile, so the cached keys
are read once for all of them): it folds the key that leaves the window into the far state (far_in +
φ(k_old)[v_old, 1]ᵀ, in registers, written to far_out), reads the far part φ(q)ᵀ far, runs an online softmax
over the cached sink and window keys and the new key, and combines both under the shared normaliser, as
`decode.py` does with a dozen PyTorch ops. Once the window is full the kernel also writes the next window:
the same slots with the leaving key's slot holding the new key (a ring: `LinearAttentionState.window_start`
is its oldest slot), so a step is one launch and the given state is left as it was. Before that (the first
sinks + window tokens) the caches grow by PyTorch concatenation. Work per token is O(F·Dv + (sinks +
window)·D) per head, independent of the context length.
"""
from __future__ import annotations

import math

import torch

from .decode import LinearAttentionState
from .feature_maps import feature_dtype
from .reference import beta_per_key, check_options, far_scale_per_head
from .triton_additive import FUSED_MAPS

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from .triton_additive import _phi

    @triton.jit
    def _exact_block(q, K, V, n, skip, KO, VO, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc,
                     BN: tl.constexpr, COPY: tl.constexpr):
        """Online softmax of the group's rows q (BG, BD) against n cached keys (K: (n, D), V: (n, Dv), contiguous),
        leaving out slot `skip` (-1: none). COPY: write each key tile to KO / VO as well (the next window)."""
        for n0 in range(0, n, BN):
            rows = n0 + offs_n
            mask_n = rows < n
            kmask = mask_n[:, None] & (offs_d[None, :] < D)
            vmask = mask_n[:, None] & (offs_v[None, :] < Dv)
            kt = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=kmask, other=0.0).to(tl.float32)
            vt = tl.load(V + rows[:, None] * Dv + offs_v[None, :], mask=vmask, other=0.0).to(tl.float32)
            if COPY:
                tl.store(KO + rows[:, None] * D + offs_d[None, :], kt, mask=kmask)
                tl.store(VO + rows[:, None] * Dv + offs_v[None, :], vt, mask=vmask)
            s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
            s = tl.where((mask_n & (rows != skip))[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            m = m_new
        return m, l, acc

    @triton.jit
    def _decode_kernel(Q, FAR_IN, FAR_OUT, KOLD, VOLD, KNEW, VNEW, SK, SV, WK, WV, WKO, WVO, CFAR, O, Hq, G,
                       n_sink, n_win, slot, D, Dv, W, scale, eps, c_all, FMAP: tl.constexpr, HAS_FAR: tl.constexpr,
                       FOLD: tl.constexpr, RING: tl.constexpr, NORMALIZE: tl.constexpr, PER_HEAD_C: tl.constexpr,
                       BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr):
        """Program bkv = b·Hkv + key head. RING: the window is full; slot `slot` holds the leaving key (folded,
        then replaced by KNEW / VNEW in the copy WKO / WVO); otherwise KOLD / VOLD hold the leaving key (FOLD)
        and the window already holds the new one. c_all: the far part's factor when it is one number
        (PER_HEAD_C False), else CFAR (Hq,) holds it."""
        bkv = tl.program_id(0).to(tl.int64)
        Hkv = Hq // G
        b = bkv // Hkv
        offs_g = tl.arange(0, BG)
        mask_g = offs_g < G
        hq = (bkv % Hkv) * G + offs_g
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        mask_d, mask_v = offs_d < D, offs_v < Dv
        q = tl.load(Q + (b * Hq + hq)[:, None] * D + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        m = tl.full((BG,), float("-inf"), tl.float32)
        l = tl.zeros((BG,), dtype=tl.float32)
        acc = tl.zeros((BG, BDV), dtype=tl.float32)
        offs_n = tl.arange(0, BN)
        m, l, acc = _exact_block(q, SK + bkv * n_sink * D, SV + bkv * n_sink * Dv, n_sink, -1, SK, SV, offs_n, offs_d,
                                 offs_v, D, Dv, scale, m, l, acc, BN, False)
        m, l, acc = _exact_block(q, WK + bkv * n_win * D, WV + bkv * n_win * Dv, n_win, slot if RING else -1,
                                 WKO + bkv * n_win * D, WVO + bkv * n_win * Dv, offs_n, offs_d, offs_v, D, Dv, scale,
                                 m, l, acc, BN, RING)
        if RING:  # the new key: not in the window buffer it reads
            kn = tl.load(KNEW + bkv * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            vn = tl.load(VNEW + bkv * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            s = tl.sum(q * kn[None, :], 1) * scale
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vn[None, :]
            m = m_new
        num = tl.zeros((BG, BDV), dtype=tl.float32)
        den = tl.zeros((BG,), dtype=tl.float32)
        if HAS_FAR:  # far rows hold [Σφ(k)vᵀ | Σφ(k)], W = Dv (+ 1 when normalised) floats
            f_ptrs = FAR_IN + bkv * D * W + offs_d[:, None] * W + offs_v[None, :]
            fmask = mask_d[:, None] & mask_v[None, :]
            far = tl.load(f_ptrs, mask=fmask, other=0.0)
            if NORMALIZE:
                z = tl.load(FAR_IN + bkv * D * W + offs_d * W + Dv, mask=mask_d, other=0.0)
            if FOLD:
                if RING:
                    ko = tl.load(WK + (bkv * n_win + slot) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    vo = tl.load(WV + (bkv * n_win + slot) * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                else:
                    ko = tl.load(KOLD + bkv * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    vo = tl.load(VOLD + bkv * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                ko = tl.where(mask_d, _phi(ko, FMAP), 0.0)
                far = far + ko[:, None] * vo[None, :]
                tl.store(FAR_OUT + bkv * D * W + offs_d[:, None] * W + offs_v[None, :], far, mask=fmask)
                if NORMALIZE:
                    z = z + ko
                    tl.store(FAR_OUT + bkv * D * W + offs_d * W + Dv, z, mask=mask_d)
            fq = tl.where(mask_d[None, :], _phi(q, FMAP), 0.0)
            num = tl.dot(fq, far, input_precision="ieee")
            if NORMALIZE:
                den = tl.sum(fq * z[None, :], 1)
        if RING:  # the next window: the leaving key's slot takes the new key (every other slot was copied above)
            tl.store(WKO + (bkv * n_win + slot) * D + offs_d, kn, mask=mask_d)
            tl.store(WVO + (bkv * n_win + slot) * Dv + offs_v, vn, mask=mask_v)
        if PER_HEAD_C:
            c = tl.load(CFAR + hq, mask=mask_g, other=1.0)
        else:
            c = tl.full((BG,), 1.0, tl.float32) * c_all
        if NORMALIZE:
            M = tl.maximum(m, 0.0)
            we = tl.exp(m - M)  # 0 when there is no exact key (m = −inf)
            wf = c * tl.exp(-M)
            out = (we[:, None] * acc + wf[:, None] * num) / (we * l + wf * den + eps * tl.exp(-M))[:, None]
        else:
            out = c[:, None] * num
        tl.store(O + (b * Hq + hq)[:, None] * Dv + offs_v[None, :], out.to(O.dtype.element_ty),
                 mask=mask_g[:, None] & mask_v[None, :])


def supports(q, feature_map: str, update_rule: str) -> bool:
    import os
    if triton is None or q.dtype == torch.float64 or feature_map not in FUSED_MAPS or update_rule != "add":
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def linear_attention_step_triton(q, k, v, state, *, scale=None, causal=True, feature_map="elu", num_features=256,
                                 seed=0, sink_tokens=0, local_window=0, normalize=True, eps=1e-6,
                                 update_rule="add", beta=None, chunk_size=64, feature_params=None):
    """`linear_attention_step` (same arguments, state and result) for the additive rule with elu/relu/identity."""
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule=update_rule, chunk_size=chunk_size,
                  where="linear_attention_step")
    if not causal:
        raise ValueError("linear_attention_step: decoding is causal; got causal=False")
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = feature_dtype(q.dtype)
    state = LinearAttentionState.empty(k.to(dt), v.to(dt)) if state is None else state
    betas = None  # carried in the window for the delta path's sake, made when a key enters the window
    c_value = (feature_params or {}).get("far_scale", 1.0)
    per_head_c = not isinstance(c_value, (int, float))  # one number: a kernel argument, no tensor per step
    c = far_scale_per_head(feature_params, Hq, q.device, torch.float32).contiguous() if per_head_c else None
    width = Dv + int(normalize)
    # the group's rows are a tile of at least 16 (tl.dot's least); 32 keys per step and 8 warps build for sm_90
    # without register spills at d64 (tests/kernels/test_linear_compile.py); d128 takes 16 warps and still spills
    # ~1.1 KB (the 128 x 128 far state is live across the product)
    blocks = dict(BG=max(16, triton.next_power_of_2(G)), BD=max(16, triton.next_power_of_2(D)),
                  BDV=max(16, triton.next_power_of_2(Dv)), BN=32)
    outs = []
    for t in range(S):
        p = state.position
        sk, sv = state.sink_k, state.sink_v
        wk, wv, wb, start = state.window_k, state.window_v, state.window_beta, state.window_start
        kt, vt = k[:, :, t], v[:, :, t]  # (B, Hkv, D): read where they lie unless a cache takes them
        k_old = v_old = k_new = v_new = None
        wk_out, wv_out = wk, wv
        ring = p >= sink_tokens and 0 < local_window == wk.shape[2]
        if ring:  # a full window: the kernel folds its oldest slot and writes the next window with the new key there
            k_new, v_new = (x if x.is_contiguous() else x.contiguous() for x in (kt, vt))
            wk_out, wv_out = torch.empty_like(wk), torch.empty_like(wv)
            fold = True
        elif p >= sink_tokens and local_window == 0:
            # no window: the new key folds into the far state at once, read where it lies (the kernel converts)
            k_old, v_old = (x if x.is_contiguous() else x.contiguous() for x in (kt, vt))
            fold = True
        else:  # the caches are still filling: the new key joins the sinks or the window
            kt, vt = kt[:, :, None].to(dt), vt[:, :, None].to(dt)
            if p < sink_tokens:
                sk, sv = torch.cat([sk, kt], 2), torch.cat([sv, vt], 2)
            else:
                betas = beta_per_key(beta, B, Hkv, S, q.device, dt) if betas is None else betas
                wk, wv, wb = torch.cat([wk, kt], 2), torch.cat([wv, vt], 2), torch.cat([wb, betas[:, :, t:t + 1]], 2)
            wk_out, wv_out = wk, wv
            fold = False
        far_in = state.far
        if fold and far_in is None:
            far_in = torch.zeros(B, Hkv, D, width, dtype=dt, device=q.device)
        far_out = torch.empty_like(far_in) if fold else far_in
        sk, sv, wk, wv = (x if x.is_contiguous() else x.contiguous() for x in (sk, sv, wk, wv))
        out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
        qt = q[:, :, t:t + 1]
        some = out  # any tensor, for pointer arguments a launch does not read
        _decode_kernel[(B * Hkv,)](
            qt if qt.is_contiguous() else qt.contiguous(), some if far_in is None else far_in,
            some if far_out is None else far_out, some if k_old is None else k_old, some if v_old is None else v_old,
            some if k_new is None else k_new, some if v_new is None else v_new, sk, sv, wk, wv, wk_out, wv_out,
            some if c is None else c, out, Hq, G, sk.shape[2], wk.shape[2], start, D, Dv, width, scale, float(eps),
            1.0 if per_head_c else float(c_value), FMAP=FUSED_MAPS[feature_map], HAS_FAR=far_in is not None,
            FOLD=fold, RING=ring, NORMALIZE=normalize, PER_HEAD_C=per_head_c, **blocks,
            num_warps=16 if D * Dv > 64 * 64 else 8)
        outs.append(out)
        # a ring step's window keeps its slots, so its oldest slot moves on by one (window_beta keeps its values:
        # the additive rule, the only one here, never reads them)
        state = LinearAttentionState(p + 1, far_out, sk, sv, wk_out, wv_out, wb,
                                     (start + 1) % local_window if ring else start)
    return torch.cat(outs, dim=2) if S > 1 else outs[0], state
