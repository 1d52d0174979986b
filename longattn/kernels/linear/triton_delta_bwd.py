"""Backward of the delta-rule chunked forward (`triton_delta.py`), in Triton.

Per key chunk t (unit keys Kn, T = M diag(β), M = (I + A)⁻¹, A = tril(diag(β) Kn Knᵀ, −1), corrected values
u = U − W S_t, states S_{t+1} = S_t + Knᵀ u) and the query chunk c = t − shift that reads it
(O_c = Qn S_t + tril(Qn Knᵀ) u):
    du   = tril(Qn Knᵀ)ᵀ dO + Kn dS_{t+1}
    dS_t = dS_{t+1} + Qnᵀ dO − Wᵀ du                  (queries past the last chunk feed dS_N)
    dQn  = dO S_tᵀ + (dO uᵀ ⊙ tril) Kn
    dKn  = u dS_{t+1}ᵀ + (dO uᵀ ⊙ tril)ᵀ Qn + Tᵀ dW,   dW = −du S_tᵀ,   dV = Tᵀ du
    dT   = dW Knᵀ + du Vᵀ;  dβ_j += Σ_i dT_ij M_ij;  dA = −Mᵀ (dT diag(β)) Mᵀ (strictly lower)
    dβ_i += Σ_j dA_ij (Kn Knᵀ)_ij;  dKn += (G + Gᵀ) Kn,  G = diag(β) dA
then through the unit rows (dφ = (dx − x (x·dx)) / |φ|) and φ. Kernels:
1. `_walk_kernel` (V block, key head): the reverse walk, storing du and dS_{t+1} per chunk;
2. `_dq_kernel` (query chunk, query head): dQn and its chain to dq;
3. `_dkn_kernel` then `_dkv_kernel` (key chunk, key head): dKn's state and query parts; dV, dT and Tᵀ dW
   (two kernels: one would spill registers);
4. `_dk_kernel` (key chunk, key head): M again (`unit_lower_inverse`), dβ, A's part of dKn, its chain to dk.
The forward's intermediates (Kn, T, u, S) are recomputed by `triton_delta.delta_states`.
"""
from __future__ import annotations

import torch

from ..triton_version import triton_older_than
from .triton_additive import FUSED_MAPS, chunk_geometry, rows_addressable, with_grad_buffer

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from .triton_additive import _phi
    from .triton_additive_bwd import _dphi
    from .triton_chunk import unit_lower_inverse
    from .triton_delta import _chunk_coords

    @triton.jit
    def _mm(a, b, BF16: tl.constexpr, PRECISION: tl.constexpr):
        if BF16:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)

    @triton.jit
    def _unit_rows(ptrs, mask, FMAP: tl.constexpr):
        """(φ(x) / |φ(x)|, |φ(x)|, x) of a tile holding whole rows, float32, zero where masked."""
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        f = tl.where(mask, _phi(x, FMAP), 0.0)
        nrm = tl.maximum(tl.sqrt(tl.sum(f * f, 1)), 1e-12)
        return f / nrm[:, None], nrm, x

    @triton.jit
    def _unit_rows_grad(dxn, xn, nrm, x, mask, FMAP: tl.constexpr):
        """The gradient of the raw rows x from that of their unit feature rows xn = φ(x) / |φ(x)|."""
        df = (dxn - xn * tl.sum(xn * dxn, 1)[:, None]) / nrm[:, None]
        return tl.where(mask, df * _dphi(x, FMAP), 0.0)

    @triton.jit
    def _query_tile(Q, DO, b, hq, i, mask_i, offs_f, mask_f, offs_v, mask_v, sq_b, sq_h, sq_s, sd_b, sd_h, sd_s,
                    FMAP: tl.constexpr):
        """Rows i of query head hq: unit feature rows φ(q) / |φ(q)| (float32) and their dO tile (value block offs_v)."""
        qn, _, _ = _unit_rows(Q + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + i[:, None] * sq_s + offs_f[None, :],
                              mask_i[:, None] & mask_f[None, :], FMAP)
        do = tl.load(DO + b.to(tl.int64) * sd_b + hq.to(tl.int64) * sd_h + i[:, None] * sd_s + offs_v[None, :],
                     mask=mask_i[:, None] & mask_v[None, :], other=0.0)
        return qn, do

    @triton.jit
    def _value_tile_coords(iv, bkv, Hq, G, F, Dv, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr):
        """A (value tile iv, key head bkv) program's coordinates: batch b, key head hk, chunk rows, features, and
        the value columns of its tile, with their validity."""
        Hkv = Hq // G
        offs_f = tl.arange(0, BF)
        offs_v = iv * BV + tl.arange(0, BV)
        return bkv // Hkv, bkv % Hkv, tl.arange(0, C), offs_f, offs_v, offs_f < F, offs_v < Dv

    @triton.jit
    def _local_kernel(Q, DO, KN, DU, DS, sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, Hq, G, Sq, N, NQ, F, Dv, shift,
                      FMAP: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, C: tl.constexpr,
                      BF: tl.constexpr, BV: tl.constexpr):
        """The reverse walk's terms that do not depend on dS, for every chunk at once (the walk itself is
        sequential): du_local = Σ_g (tril(qn knᵀ))ᵀ do into DU, and dS_local = Σ_g qnᵀ do into the chunk's slot
        of DS, which the walk reads before it writes the chunk's dS there."""
        t, iv, bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, hk, offs_c, offs_f, offs_v, mask_f, mask_v = _value_tile_coords(iv, bkv, Hq, G, F, Dv, C, BF, BV)
        rows = bkv.to(tl.int64) * N * C + t * C + offs_c
        du = tl.zeros((C, BV), dtype=tl.float32)
        dsl = tl.zeros((BF, BV), dtype=tl.float32)
        c = t - shift
        if (c >= 0) & (c < NQ):
            kn = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
            i = c * C + offs_c
            for g in range(G):
                qn, do = _query_tile(Q, DO, b, hk * G + g, i, i < Sq, offs_f, mask_f, offs_v, mask_v,
                                     sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, FMAP)
                a = _mm(qn, tl.trans(kn), BF16, PRECISION)
                a = tl.where(offs_c[:, None] >= offs_c[None, :], a, 0.0)
                du += _mm(tl.trans(a), do, BF16, PRECISION)
                dsl += _mm(tl.trans(qn), do, BF16, PRECISION)
        tl.store(DU + rows[:, None] * Dv + offs_v[None, :], du, mask=mask_v[None, :])
        tl.store(DS + (bkv.to(tl.int64) * (N + 1) + t) * F * Dv + offs_f[:, None] * Dv + offs_v[None, :],
                 dsl.to(DS.dtype.element_ty), mask=mask_f[:, None] & mask_v[None, :])

    @triton.jit
    def _walk_kernel(Q, DO, KN, TT, DU, DS, sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, Hq, G, Sq, N, NQ, F, Dv,
                     shift, FMAP: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, C: tl.constexpr,
                     BF: tl.constexpr, BV: tl.constexpr):
        """dS backwards through the chunks (DS[t]: the state gradient after chunk t) and du = kn dS + du_local."""
        iv, bkv = tl.program_id(0), tl.program_id(1)
        b, hk, offs_c, offs_f, offs_v, mask_f, mask_v = _value_tile_coords(iv, bkv, Hq, G, F, Dv, C, BF, BV)
        ds_ptrs = DS + bkv.to(tl.int64) * (N + 1) * F * Dv + offs_f[:, None] * Dv + offs_v[None, :]
        ds_mask = mask_f[:, None] & mask_v[None, :]
        dS = tl.zeros((BF, BV), dtype=tl.float32)
        # queries past the last key chunk read the final state S_N
        for g in range(G):
            for c in range(tl.maximum(N - shift, 0), NQ):
                i = c * C + offs_c
                qn, do = _query_tile(Q, DO, b, hk * G + g, i, i < Sq, offs_f, mask_f, offs_v, mask_v,
                                     sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, FMAP)
                dS += _mm(tl.trans(qn), do, BF16, PRECISION)
        tl.store(ds_ptrs + N * F * Dv, dS.to(DS.dtype.element_ty), mask=ds_mask)
        for tt in range(N):
            t = N - 1 - tt
            rows = bkv.to(tl.int64) * N * C + t * C + offs_c
            du_ptrs = DU + rows[:, None] * Dv + offs_v[None, :]
            kn = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
            du = _mm(kn, dS, BF16, PRECISION) + tl.load(du_ptrs, mask=mask_v[None, :], other=0.0)
            tl.store(du_ptrs, du, mask=mask_v[None, :])
            dsl = tl.load(ds_ptrs + t * F * Dv, mask=ds_mask, other=0.0).to(tl.float32)
            # W = T Kn: Wᵀ du = Knᵀ (Tᵀ du)
            tm = tl.load(TT + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
            dS += dsl - _mm(tl.trans(kn), _mm(tl.trans(tm), du, BF16, PRECISION), BF16, PRECISION)
            tl.store(ds_ptrs + t * F * Dv, dS.to(DS.dtype.element_ty), mask=ds_mask)

    @triton.jit
    def _dq_kernel(Q, DO, KN, UNEW, H, DQ, sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, Hq, G, Sq, N, F, Dv, shift,
                   FMAP: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, C: tl.constexpr,
                   BF: tl.constexpr, BV: tl.constexpr):
        c, bhq = tl.program_id(0), tl.program_id(1)
        b, hq = bhq // Hq, bhq % Hq
        bkv = b * (Hq // G) + hq // G
        offs_c = tl.arange(0, C)
        offs_f = tl.arange(0, BF)
        mask_f = offs_f < F
        i = c * C + offs_c
        qmask = (i < Sq)[:, None] & mask_f[None, :]
        q_off = b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + i[:, None] * sq_s + offs_f[None, :]
        t = c + shift
        dqn = tl.zeros((C, BF), dtype=tl.float32)
        if t >= 0:
            tt = tl.minimum(t, N)
            rows = bkv.to(tl.int64) * N * C + t * C + offs_c
            kn = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=((t * C + offs_c) < N * C)[:, None] & mask_f[None, :], other=0.0)  # none past the last chunk
            for v0 in range(0, Dv, BV):
                offs_v = v0 + tl.arange(0, BV)
                mask_v = offs_v < Dv
                do = tl.load(DO + b.to(tl.int64) * sd_b + hq.to(tl.int64) * sd_h + i[:, None] * sd_s + offs_v[None, :],
                             mask=(i < Sq)[:, None] & mask_v[None, :], other=0.0)
                h = tl.load(H + (bkv.to(tl.int64) * (N + 1) + tt) * F * Dv + offs_f[:, None] * Dv + offs_v[None, :],
                            mask=mask_f[:, None] & mask_v[None, :], other=0.0)
                dqn += _mm(do, tl.trans(h), BF16, PRECISION)
                if t < N:
                    u = tl.load(UNEW + rows[:, None] * Dv + offs_v[None, :], mask=mask_v[None, :], other=0.0)
                    da = _mm(do, tl.trans(u), BF16, PRECISION)
                    da = tl.where(offs_c[:, None] >= offs_c[None, :], da, 0.0)
                    dqn += _mm(da, kn, BF16, PRECISION)
        qn, nrm, x = _unit_rows(Q + q_off, qmask, FMAP)
        tl.store(DQ + q_off, _unit_rows_grad(dqn, qn, nrm, x, qmask, FMAP).to(DQ.dtype.element_ty), mask=qmask)

    @triton.jit
    def _dkn_kernel(Q, DO, UNEW, DS, DKN, sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, Hq, G, Sq, N, NQ, F, Dv, shift,
                    FMAP: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, C: tl.constexpr,
                    BF: tl.constexpr, BV: tl.constexpr):
        """The part of dKn from the state update and the queries: u dS_{t+1}ᵀ + (dO uᵀ ⊙ tril)ᵀ Qn, float32."""
        t, bkv = tl.program_id(0), tl.program_id(1)
        Hkv = Hq // G
        b, hk = bkv // Hkv, bkv % Hkv
        offs_c = tl.arange(0, C)
        offs_f = tl.arange(0, BF)
        mask_f = offs_f < F
        rows = bkv.to(tl.int64) * N * C + t * C + offs_c
        c = t - shift
        has_q = (c >= 0) & (c < NQ)
        i = c * C + offs_c
        mask_i = (i >= 0) & (i < Sq)
        dkn = tl.zeros((C, BF), dtype=tl.float32)
        for v0 in range(0, Dv, BV):
            offs_v = v0 + tl.arange(0, BV)
            mask_v = offs_v < Dv
            u = tl.load(UNEW + rows[:, None] * Dv + offs_v[None, :], mask=mask_v[None, :], other=0.0)
            ds1 = tl.load(DS + (bkv.to(tl.int64) * (N + 1) + t + 1) * F * Dv + offs_f[:, None] * Dv + offs_v[None, :],
                          mask=mask_f[:, None] & mask_v[None, :], other=0.0)
            dkn += _mm(u, tl.trans(ds1), BF16, PRECISION)
            if has_q:
                for g in range(G):
                    qn, do = _query_tile(Q, DO, b, hk * G + g, i, mask_i, offs_f, mask_f, offs_v, mask_v,
                                         sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, FMAP)
                    da = _mm(do, tl.trans(u), BF16, PRECISION)  # (query, key), linear in each value block
                    da = tl.where(offs_c[:, None] >= offs_c[None, :], da, 0.0)
                    dkn += _mm(tl.trans(da), qn, BF16, PRECISION)
        tl.store(DKN + rows[:, None] * F + offs_f[None, :], dkn, mask=mask_f[None, :])

    @triton.jit
    def _dkv_kernel(V, KN, TT, H, DU, DV, DKN, DT, sv_b, sv_h, sv_s, Hkv, L, P, N, F, Dv,
                    BF16: tl.constexpr, PRECISION: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr):
        """dV = Tᵀ du (stored), dW = −du S_tᵀ, then dKn += Tᵀ dW and dT = dW Knᵀ + du Vᵀ (float32)."""
        t, bkv, b, hk, offs_c, offs_f, mask_f, r, mask_r = _chunk_coords(Hkv, L, P, F, C, BF)
        rows = bkv.to(tl.int64) * N * C + t * C + offs_c
        tm = tl.load(TT + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
        dt = tl.zeros((C, C), dtype=tl.float32)
        dw = tl.zeros((C, BF), dtype=tl.float32)
        for v0 in range(0, Dv, BV):
            offs_v = v0 + tl.arange(0, BV)
            mask_v = offs_v < Dv
            vmask = mask_r[:, None] & mask_v[None, :]
            v_off = b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h + r[:, None] * sv_s + offs_v[None, :]
            du = tl.load(DU + rows[:, None] * Dv + offs_v[None, :], mask=mask_v[None, :], other=0.0)
            h = tl.load(H + (bkv.to(tl.int64) * (N + 1) + t) * F * Dv + offs_f[:, None] * Dv + offs_v[None, :],
                        mask=mask_f[:, None] & mask_v[None, :], other=0.0)
            vt = tl.load(V + v_off, mask=vmask, other=0.0)
            dw -= _mm(du, tl.trans(h), BF16, PRECISION)
            dt += _mm(du, tl.trans(vt), BF16, PRECISION)
            tl.store(DV + v_off, _mm(tl.trans(tm), du, BF16, PRECISION).to(DV.dtype.element_ty), mask=vmask)
        kn = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
        dt += _mm(dw, tl.trans(kn), BF16, PRECISION)
        dkn = tl.load(DKN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
        dkn += _mm(tl.trans(tm), dw, BF16, PRECISION)
        tl.store(DKN + rows[:, None] * F + offs_f[None, :], dkn, mask=mask_f[None, :])
        tl.store(DT + rows[:, None] * C + offs_c[None, :], dt)

    @triton.jit
    def _dk_kernel(K, BETA, KN, DKN, DT, DK, DBETA, sk_b, sk_h, sk_s, sb_b, sb_h, sb_s, Hkv, L, P, N, F,
                   FMAP: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, PRECISION: tl.constexpr):
        """T = M diag(β) and A's part of dKn, dβ; dk through the unit rows and φ."""
        t, bkv, b, h, offs_c, offs_f, mask_f, r, mask_r = _chunk_coords(Hkv, L, P, F, C, BF)
        rows = bkv.to(tl.int64) * N * C + t * C + offs_c
        kmask = mask_r[:, None] & mask_f[None, :]
        k_off = b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h + r[:, None] * sk_s + offs_f[None, :]
        kn, _, _ = _unit_rows(K + k_off, kmask, FMAP)
        beta = tl.load(BETA + b.to(tl.int64) * sb_b + h.to(tl.int64) * sb_h + r.to(tl.int64) * sb_s,
                       mask=mask_r, other=0.0).to(tl.float32)
        kk = tl.dot(kn, tl.trans(kn), input_precision=PRECISION)
        lower = offs_c[:, None] > offs_c[None, :]
        m = unit_lower_inverse(tl.where(lower, kk * beta[:, None], 0.0), C, PRECISION)
        dt = tl.load(DT + rows[:, None] * C + offs_c[None, :])
        dbeta = tl.sum(dt * m, 0)  # T = M diag(β)
        dm = dt * beta[None, :]
        da = -tl.dot(tl.trans(m), tl.dot(dm, tl.trans(m), input_precision=PRECISION), input_precision=PRECISION)
        da = tl.where(lower, da, 0.0)
        # Kn again, as stored (bfloat16 in bfloat16 runs): no feature tile stays live across the inverse
        kn = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0).to(tl.float32)
        dbeta += tl.sum(da * tl.dot(kn, tl.trans(kn), input_precision=PRECISION), 1)
        g = da * beta[:, None]
        dkn = tl.load(DKN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
        dkn += tl.dot(g, kn, input_precision=PRECISION) + tl.dot(tl.trans(g), kn, input_precision=PRECISION)
        kn, nrm, x = _unit_rows(K + k_off, kmask, FMAP)  # loaded again: fewer tiles live across the inverse
        tl.store(DK + k_off, _unit_rows_grad(dkn, kn, nrm, x, kmask, FMAP).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DBETA + bkv.to(tl.int64) * L + r, dbeta, mask=mask_r)


# (value tile, warps). Triton 3.6 (the GPU image): swept on an H200 (forward+backward at 32K, each config checked
# against the first; benchmarks/sweep_delta_bwd.py, results/2026-12-01-h200-delta-bwd-sweep.md): 7.89 ms at the
# 8-warp settings, 6.16 ms at these, mostly `_dk_kernel` at 4 warps (its UT inverse, like the forward's, runs
# faster at 4); value tiles of 16 or 64 for dKn / dV were no faster. Newer Tritons build those 4-warp kernels
# with 48-590 bytes of register spills for sm_90, so they take the 8-warp settings, which build without
# (`_dk_kernel`: ~130 bytes; SPILL_LIMITS below).
if triton_older_than(3, 7):
    WALK_TILE, DQ_TILE, DKV_TILE, DK_WARPS = (32, 4), (64, 4), (32, 4), 4
else:
    WALK_TILE, DQ_TILE, DKV_TILE, DK_WARPS = (32, 8), (64, 8), (32, 8), 8  # DKV_TILE: `_dkn_kernel`, `_dkv_kernel`
# Register spill (bytes) that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90, bounded
# so that it cannot grow unnoticed: `_dk_kernel` (T = M diag(β): M rebuilt, then dβ, dA = −Mᵀ dM Mᵀ and A's part of
# dk) keeps several C × F float32 tiles live at once: 168-200 bytes at d64, 352 (Triton 3.9) to 752 (3.6, 4 warps)
# at d128; at d128 Triton 3.6's 4-warp `_local_kernel` and `_dkn_kernel` spill 192 and 56 bytes.
SPILL_LIMITS = {"*": 0, "_dk_kernel": 256, "_dk_kernel BF=128": 752, "_local_kernel BF=128": 192,
                "_dkn_kernel BF=128": 56}
LOCAL_TILE = DQ_TILE  # `_local_kernel`: dq's work (products with every query tile of the chunk), chosen without a sweep


def far_delta_backward(grad, fq, fk, v, beta, *, fmap: str, causal: bool, offset, chunk: int, out_dtype, pure: bool,
                       states=None):
    """(dfq, dfk, dv, dbeta) of `triton_delta.far_delta_triton` for the upstream gradient of its output; states: the
    forward's (KN, TT, UNEW, H) (`keep_states`), else recomputed."""
    from .triton_delta import delta_states, products_precision
    B, Hq, Sq, Fd = fq.shape
    Hkv, L, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    G = Hq // Hkv
    P, shift, N, nq = chunk_geometry(Sq, L, causal, offset, chunk)
    (fq, dq), (fk, dk), (v, dv) = (with_grad_buffer(x, n) for x, n in ((fq, "q"), (fk, "k"), (v, "v")))
    do = rows_addressable(grad, "grad_out")
    bf16 = out_dtype == torch.bfloat16
    fmap_id = FUSED_MAPS.get(fmap, 0)
    dev = fq.device
    if states:
        KN, TT, UNEW, H = states
    else:
        KN, TT, UNEW, H = delta_states(fk, v, beta, fmap_id=fmap_id, P=P, N=N, chunk=chunk, bf16=bf16)
    BF = max(16, triton.next_power_of_2(Fd))
    BV = min(64, max(16, triton.next_power_of_2(Dv)))
    precision = products_precision(bf16)
    flags = dict(FMAP=fmap_id, BF16=bf16, PRECISION=precision, C=chunk, BF=BF)
    DU = torch.empty(B * Hkv, N * chunk, Dv, dtype=torch.float32, device=dev)
    DS = torch.empty(B * Hkv, N + 1, Fd, Dv, dtype=H.dtype, device=dev)
    WV = min(WALK_TILE[0], BV)
    qs, ds = (fq.stride(0), fq.stride(1), fq.stride(2)), (do.stride(0), do.stride(1), do.stride(2))
    LV = min(LOCAL_TILE[0], BV)
    _local_kernel[(N, triton.cdiv(Dv, LV), B * Hkv)](fq, do, KN, DU, DS, *qs, *ds, Hq, G, Sq, N, nq, Fd, Dv, shift,
                                                     **flags, BV=LV, num_warps=LOCAL_TILE[1])
    _walk_kernel[(triton.cdiv(Dv, WV), B * Hkv)](fq, do, KN, TT, DU, DS, *qs, *ds, Hq, G, Sq, N, nq, Fd, Dv,
                                                  shift, **flags, BV=WV, num_warps=WALK_TILE[1])
    _dq_kernel[(nq, B * Hq)](fq, do, KN, UNEW, H, dq, *qs, *ds, Hq, G, Sq, N, Fd, Dv, shift, **flags,
                             BV=min(DQ_TILE[0], BV), num_warps=DQ_TILE[1])
    DKN = torch.empty(B * Hkv, N * chunk, Fd, dtype=torch.float32, device=dev)
    DT = torch.empty(B * Hkv, N * chunk, chunk, dtype=torch.float32, device=dev)
    KV = min(DKV_TILE[0], BV)
    _dkn_kernel[(N, B * Hkv)](fq, do, UNEW, DS, DKN, *qs, *ds, Hq, G, Sq, N, nq, Fd, Dv, shift, **flags, BV=KV,
                              num_warps=DKV_TILE[1])
    flags.pop("FMAP")
    _dkv_kernel[(N, B * Hkv)](v, KN, TT, H, DU, dv, DKN, DT, v.stride(0), v.stride(1), v.stride(2), Hkv, L, P, N, Fd, Dv,
                              **flags, BV=KV, num_warps=DKV_TILE[1])
    dbeta = torch.empty(B, Hkv, L, dtype=torch.float32, device=dev)
    _dk_kernel[(N, B * Hkv)](fk, beta, KN, DKN, DT, dk, dbeta, fk.stride(0), fk.stride(1), fk.stride(2), beta.stride(0),
                             beta.stride(1), beta.stride(2), Hkv, L, P, N, Fd, FMAP=fmap_id, C=chunk, BF=BF,
                             PRECISION=precision, num_warps=DK_WARPS)
    return dq, dk, dv, dbeta.to(beta.dtype)
