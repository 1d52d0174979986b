"""One fused Triton kernel per decoded token for additive linear attention with an elementwise map.

Each program serves one query head: it folds the key that just left the window into its key head's far
state (far_in + φ(k_old)[v_old, 1]ᵀ, in registers; the group's first query head writes far_out), reads the
far part φ(q)ᵀ far, runs an online softmax over the cached sink and window keys, and combines both under the
shared normaliser, exactly as `decode.py` does with a dozen PyTorch ops. The caches themselves (append the
new key, drop the oldest) stay PyTorch slicing, so the state is the same `LinearAttentionState` either way.
Work per token is O(F·Dv + (sinks + window)·D) per head, independent of the context length.
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
    def _exact_block(q, K, V, n, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc, BN: tl.constexpr):
        """Online softmax of q against n cached keys (K: (n, D), V: (n, Dv), contiguous)."""
        for n0 in range(0, n, BN):
            rows = n0 + offs_n
            mask_n = rows < n
            kt = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < D),
                         other=0.0).to(tl.float32)
            s = tl.where(mask_n, tl.sum(kt * q[None, :], 1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            vt = tl.load(V + rows[:, None] * Dv + offs_v[None, :], mask=mask_n[:, None] & (offs_v[None, :] < Dv),
                         other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
            m = m_new
        return m, l, acc

    @triton.jit
    def _decode_kernel(Q, FAR_IN, FAR_OUT, KOLD, VOLD, SK, SV, WK, WV, CFAR, O, Hq, G, n_sink, n_win, D, Dv, W,
                       scale, eps, c_all, FMAP: tl.constexpr, HAS_FAR: tl.constexpr, FOLD: tl.constexpr,
                       NORMALIZE: tl.constexpr, PER_HEAD_C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                       BN: tl.constexpr):
        """c_all: the far part's factor when it is one number (PER_HEAD_C False), else CFAR (Hq,) holds it."""
        bhq = tl.program_id(0)
        b, hq = bhq // Hq, bhq % Hq
        bkv = b * (Hq // G) + hq // G
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        mask_d, mask_v = offs_d < D, offs_v < Dv
        q = tl.load(Q + bhq.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        # exact part over the sinks and the window (the window already holds this token's key)
        # scalars made by reductions so every loop-carried value has one type on every backend
        m = tl.max(tl.full((BDV,), float("-inf"), tl.float32), 0)
        l = tl.sum(tl.zeros((BDV,), dtype=tl.float32), 0)
        acc = tl.zeros((BDV,), dtype=tl.float32)
        m, l, acc = _exact_block(q, SK + bkv.to(tl.int64) * n_sink * D, SV + bkv.to(tl.int64) * n_sink * Dv, n_sink,
                                 tl.arange(0, BN), offs_d, offs_v, D, Dv, scale, m, l, acc, BN)
        m, l, acc = _exact_block(q, WK + bkv.to(tl.int64) * n_win * D, WV + bkv.to(tl.int64) * n_win * Dv, n_win,
                                 tl.arange(0, BN), offs_d, offs_v, D, Dv, scale, m, l, acc, BN)
        num = tl.zeros((BDV,), dtype=tl.float32)
        den = tl.sum(tl.zeros((BDV,), dtype=tl.float32), 0)
        if HAS_FAR:  # far rows hold [Σφ(k)vᵀ | Σφ(k)], W = Dv (+ 1 when normalised) floats
            f_ptrs = FAR_IN + bkv.to(tl.int64) * D * W + offs_d[:, None] * W + offs_v[None, :]
            fmask = mask_d[:, None] & mask_v[None, :]
            far = tl.load(f_ptrs, mask=fmask, other=0.0)
            if NORMALIZE:
                z = tl.load(FAR_IN + bkv.to(tl.int64) * D * W + offs_d * W + Dv, mask=mask_d, other=0.0)
            if FOLD:
                ko = tl.load(KOLD + bkv.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                ko = tl.where(mask_d, _phi(ko, FMAP), 0.0)
                vo = tl.load(VOLD + bkv.to(tl.int64) * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                far = far + ko[:, None] * vo[None, :]
                if NORMALIZE:
                    z = z + ko
                if hq % G == 0:  # one writer per key head
                    out_ptrs = FAR_OUT + bkv.to(tl.int64) * D * W + offs_d[:, None] * W + offs_v[None, :]
                    tl.store(out_ptrs, far, mask=fmask)
                    if NORMALIZE:
                        tl.store(FAR_OUT + bkv.to(tl.int64) * D * W + offs_d * W + Dv, z, mask=mask_d)
            fq = tl.where(mask_d, _phi(q, FMAP), 0.0)
            num = tl.sum(fq[:, None] * far, 0)
            if NORMALIZE:
                den = tl.sum(fq * z, 0)
        if PER_HEAD_C:
            c = tl.load(CFAR + hq)
        else:
            c = c_all
        if NORMALIZE:
            M = tl.maximum(m, 0.0)
            we = tl.exp(m - M)  # 0 when there is no exact key (m = −inf)
            wf = c * tl.exp(-M)
            out = (we * acc + wf * num) / (we * l + wf * den + eps * tl.exp(-M))
        else:
            out = c * num
        tl.store(O + bhq.to(tl.int64) * Dv + offs_v, out.to(O.dtype.element_ty), mask=mask_v)


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
    outs = []
    for t in range(S):
        p = state.position
        sk, sv = state.sink_k, state.sink_v
        wk, wv, wb = state.window_k, state.window_v, state.window_beta
        fold = False
        if p >= sink_tokens and local_window == 0:
            # no window: the new key folds into the far state at once, read where it lies (the kernel converts)
            fold = True
            k_old, v_old = k[:, :, t], v[:, :, t]
            k_old = k_old if k_old.is_contiguous() else k_old.contiguous()
            v_old = v_old if v_old.is_contiguous() else v_old.contiguous()
        else:
            kt, vt = k[:, :, t:t + 1].to(dt), v[:, :, t:t + 1].to(dt)
            if p < sink_tokens:
                sk, sv = torch.cat([sk, kt], 2), torch.cat([sv, vt], 2)
            else:
                betas = beta_per_key(beta, B, Hkv, S, q.device, dt) if betas is None else betas
                wk, wv, wb = torch.cat([wk, kt], 2), torch.cat([wv, vt], 2), torch.cat([wb, betas[:, :, t:t + 1]], 2)
            fold = wk.shape[2] > local_window
            k_old = v_old = None
            if fold:
                k_old, v_old = wk[:, :, 0].contiguous(), wv[:, :, 0].contiguous()
                wk, wv, wb = wk[:, :, 1:], wv[:, :, 1:], wb[:, :, 1:]
        far_in = state.far
        if fold and far_in is None:
            far_in = torch.zeros(B, Hkv, D, width, dtype=dt, device=q.device)
        far_out = torch.empty_like(far_in) if fold else far_in
        sk, sv, wk, wv = (x if x.is_contiguous() else x.contiguous() for x in (sk, sv, wk, wv))
        out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
        dummy = out
        qt = q[:, :, t:t + 1]
        _decode_kernel[(B * Hq,)](
            qt if qt.is_contiguous() else qt.contiguous(), dummy if far_in is None else far_in,
            dummy if far_out is None else far_out, dummy if k_old is None else k_old,
            dummy if v_old is None else v_old, sk, sv, wk, wv, dummy if c is None else c, out,
            Hq, G, sk.shape[2], wk.shape[2], D, Dv, width, scale, float(eps), 1.0 if per_head_c else float(c_value),
            FMAP=FUSED_MAPS[feature_map], HAS_FAR=far_in is not None, FOLD=fold, NORMALIZE=normalize,
            PER_HEAD_C=per_head_c, BD=max(16, triton.next_power_of_2(D)),
            BDV=max(16, triton.next_power_of_2(Dv)), BN=64, num_warps=8 if D * Dv > 64 * 64 else 4)
        outs.append(out)
        state = LinearAttentionState(p + 1, far_out, sk, sv, wk, wv, wb)
    return torch.cat(outs, dim=2) if S > 1 else outs[0], state
