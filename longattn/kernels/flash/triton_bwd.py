"""Backward flash attention in Triton (FlashAttention-2's split into two kernels).

With P = softmax(S), S = scale·QKᵀ + mask, and the upstream gradients dO (of out) and dlse (of lse):
  dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − Δ),   Δ_i = rowsum(dO ∘ O)_i − dlse_i,
  dQ = scale · dS K,   dK = scale · dSᵀ Q.
(d lse_i / d S_ij = P_ij, so the lse gradient only shifts Δ.) P is recomputed from the saved lse.

  _bwd_preprocess: Δ and lse in base 2 (rows that saw no key get +inf so that P = 0 there);
  _bwd_dkdv:       one program per (key block, batch·kv head): K, V stay in registers, the program
                   walks the query tiles of every query head of its GQA group, accumulating dK, dV
                   in fp32 (no atomics, no repeated K/V);
  _bwd_dq:         one program per (query block, batch·query head), walking the key tiles.
Causal tiles are split into a masked part (crossing the diagonal) and an unmasked part, as in the forward.
"""
from __future__ import annotations

import torch

from .triton_fwd import (LOG2E, ChosenConfigs, _load_2d, _score_bias, autotuning, dot_precision,
                         fallback_configs, interpreting, launch_first_that_fits, last_dim_contiguous, mask_as_4d,
                         padded_dim, triton)

# Register spill that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90: none in the
# preprocessing; no bound on dK/dV and dQ, whose configs the autotuner times on the GPU (a spilling one loses; the
# tuned ones spill up to ~1.6 KB at d128 on Triton 3.6 and 3.9).
SPILL_LIMITS = {"_bwd_preprocess": 0}

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _bwd_preprocess(Out, dOut, dLse, Lse, Delta, Lse2, stride_ob, stride_oh, stride_om,
                        stride_gb, stride_gh, stride_gm, Hq, Sq,
                        DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr):
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_dv = tl.arange(0, DV_PAD)
        ok = (rows < Sq)[:, None] & (offs_dv < DV)[None, :]
        o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om
                    + offs_dv[None, :], mask=ok, other=0.0).to(tl.float32)
        do = tl.load(dOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + rows[:, None] * stride_gm
                     + offs_dv[None, :], mask=ok, other=0.0).to(tl.float32)
        row_ptr = pid_bh.to(tl.int64) * Sq + rows
        dlse = tl.load(dLse + row_ptr, mask=rows < Sq, other=0.0)
        lse = tl.load(Lse + row_ptr, mask=rows < Sq, other=0.0)
        tl.store(Delta + row_ptr, tl.sum(o * do, 1) - dlse, mask=rows < Sq)
        # A row masked throughout at a float mask's dtype minimum has lse near -3e38, where float32 holds neither
        # log(keys) nor the exact base-2 product: p = 2^(s - lse2) can round far above 1. A probability is at most
        # 1, and the kernels clamp its exponent at 0 so such a row stays finite (its p is 1 instead of 1 / keys;
        # such rows are padding, whose output gradient is zero).
        tl.store(Lse2 + row_ptr, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634),
                 mask=rows < Sq)

    @triton.jit
    def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, mask_base, cols, lo, hi,
                    stride_qm, stride_gm, stride_mask_m, qk_scale, Sq, Sk, causal_offset,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
                    MASK_IS_BOOL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        cols_ok = cols < Sk
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            rows_ok = rows < Sq
            qt = _load_2d(q_base + rows[None, :] * stride_qm + offs_d[:, None], offs_d < HEAD_DIM, rows_ok,
                          HEAD_DIM != HEAD_DIM_PAD, not EVEN_M)
            st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M): scores transposed
            if HAS_MASK:
                st = _score_bias(st, mask_base + rows[None, :] * stride_mask_m, cols_ok, rows_ok,
                                 not EVEN_N, not EVEN_M, MASK_IS_BOOL)
            # rows past Sq read lse2 = +inf, so their P is 0 and they contribute nothing
            lse2 = tl.load(lse2_base + rows, mask=rows_ok, other=float("inf"))
            pt = tl.math.exp2(tl.minimum(st - lse2[None, :], 0.0))  # p <= 1 (see _bwd_preprocess)
            if MASKED:
                pt = tl.where(cols[:, None] <= rows[None, :] + causal_offset, pt, 0.0)
            do = _load_2d(do_base + rows[:, None] * stride_gm + offs_dv[None, :], rows_ok, offs_dv < DV,
                          not EVEN_M, DV != DV_PAD)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, Mask, dOut, Lse2, Delta, dK, dV,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh, stride_gm,
        stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
        Hq, Hkv, Sq, Sk, GROUP, scale, qk_scale, causal_offset, SQ_BUCKET, SK_BUCKET,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        n0 = tl.program_id(0) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        cols_ok = cols < Sk
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        k = _load_2d(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kn
                     + offs_d[None, :], cols_ok, offs_d < HEAD_DIM, not EVEN_N, HEAD_DIM != HEAD_DIM_PAD)
        v = _load_2d(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vn
                     + offs_dv[None, :], cols_ok, offs_dv < DV, not EVEN_N, DV != DV_PAD)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
        # query tiles: [lo, full) cross the diagonal of this key block, [full, Sq) see all its keys
        if CAUSAL:
            lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M
            full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
            full = tl.maximum(tl.minimum(full, tl.cdiv(Sq, BLOCK_M) * BLOCK_M), lo)
        else:
            lo = 0
            full = 0
        for g in range(GROUP):
            h = hk * GROUP + g
            q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            do_base = dOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
            row_base = (b * Hq + h).to(tl.int64) * Sq
            mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + cols[:, None] * stride_mn
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base, mask_base,
                                 cols, lo, full, stride_qm, stride_gm, stride_mm, qk_scale, Sq, Sk, causal_offset,
                                 HEAD_DIM, HEAD_DIM_PAD, DV, DV_PAD, BLOCK_M, True, HAS_MASK, MASK_IS_BOOL,
                                 EVEN_M, EVEN_N, DOT_PRECISION)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse2 + row_base, Delta + row_base, mask_base,
                                 cols, full, Sq, stride_qm, stride_gm, stride_mm, qk_scale, Sq, Sk, causal_offset,
                                 HEAD_DIM, HEAD_DIM_PAD, DV, DV_PAD, BLOCK_M, False, HAS_MASK, MASK_IS_BOOL,
                                 EVEN_M, EVEN_N, DOT_PRECISION)
        dk = dk * scale
        dk_ptrs = dK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkn \
            + offs_d[None, :]
        dv_ptrs = dV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvn \
            + offs_dv[None, :]
        tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=cols_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
        tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=cols_ok[:, None] & (offs_dv < DV)[None, :])

    @triton.jit
    def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, lo, hi,
                  stride_kn, stride_vn, stride_mask_n, qk_scale, Sq, Sk, causal_offset,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  MASK_IS_BOOL: tl.constexpr, EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        rows_ok = offs_m < Sq
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            cols_ok = cols < Sk
            kt = _load_2d(k_base + offs_d[:, None] + cols[None, :] * stride_kn, offs_d < HEAD_DIM, cols_ok,
                          HEAD_DIM != HEAD_DIM_PAD, MASKED)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            if HAS_MASK:
                s = _score_bias(s, mask_base + cols[None, :] * stride_mask_n, rows_ok, cols_ok,
                                not EVEN_M, MASKED, MASK_IS_BOOL)
            p = tl.math.exp2(tl.minimum(s - lse2[:, None], 0.0))  # p <= 1 (see _bwd_preprocess)
            if MASKED:
                keep = cols_ok[None, :]
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + causal_offset)
                p = tl.where(keep, p, 0.0)
            vt = _load_2d(v_base + offs_dv[:, None] + cols[None, :] * stride_vn, offs_dv < DV, cols_ok,
                          DV != DV_PAD, MASKED)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, Mask, dOut, Lse2, Delta, dQ,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh, stride_gm,
        stride_dqb, stride_dqh, stride_dqm,
        Hq, Sq, Sk, GROUP, scale, qk_scale, causal_offset, SQ_BUCKET, SK_BUCKET,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        num_m = tl.cdiv(Sq, BLOCK_M)
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = num_m - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < Sq
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        q = _load_2d(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                     + offs_d[None, :], rows_ok, offs_d < HEAD_DIM, not EVEN_M, HEAD_DIM != HEAD_DIM_PAD)
        do = _load_2d(dOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + offs_m[:, None] * stride_gm
                      + offs_dv[None, :], rows_ok, offs_dv < DV, not EVEN_M, DV != DV_PAD)
        row_ptr = pid_bh.to(tl.int64) * Sq + offs_m
        lse2 = tl.load(Lse2 + row_ptr, mask=rows_ok, other=float("inf"))
        delta = tl.load(Delta + row_ptr, mask=rows_ok, other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + offs_m[:, None] * stride_mm
        if CAUSAL:
            hi = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), Sk)
            full = tl.minimum(tl.maximum(m0 + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
        else:
            hi = Sk
            full = Sk
        if not EVEN_N:
            full = tl.minimum(full, Sk // BLOCK_N * BLOCK_N)
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, 0, full,
                       stride_kn, stride_vn, stride_mn, qk_scale, Sq, Sk, causal_offset,
                       HEAD_DIM, HEAD_DIM_PAD, DV, DV_PAD, BLOCK_N, False, CAUSAL, HAS_MASK, MASK_IS_BOOL, EVEN_M, DOT_PRECISION)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, full, hi,
                       stride_kn, stride_vn, stride_mn, qk_scale, Sq, Sk, causal_offset,
                       HEAD_DIM, HEAD_DIM_PAD, DV, DV_PAD, BLOCK_N, True, CAUSAL, HAS_MASK, MASK_IS_BOOL, EVEN_M, DOT_PRECISION)
        dq = dq * scale
        tl.store(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
                 + offs_d[None, :], dq.to(dQ.dtype.element_ty),
                 mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :])

    def _heuristics(kernel):
        return triton.heuristics({
            "EVEN_M": lambda a: a["Sq"] % a["BLOCK_M"] == 0,
            "EVEN_N": lambda a: a["Sk"] % a["BLOCK_N"] == 0,
        })(kernel)

    def _prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d = max(args["HEAD_DIM_PAD"], args["DV_PAD"])
        kept = [c for c in configs if d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return kept or configs[-1:]

    def _configs(shapes):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]

    _KEY = ["SQ_BUCKET", "SK_BUCKET", "HEAD_DIM_PAD", "DV_PAD", "CAUSAL", "HAS_MASK", "MASK_IS_BOOL"]
    # dK/dV: wide key blocks stay resident while narrow query tiles stream past; dQ the transpose.
    DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 4, 3), (64, 128, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2)])
    DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2)])
    _dkdv_heuristic = _heuristics(_bwd_dkdv_kernel)
    _dkdv_tuned = triton.autotune(configs=DKDV_CONFIGS, key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune})(_dkdv_heuristic)
    _dq_heuristic = _heuristics(_bwd_dq_kernel)
    _dq_tuned = triton.autotune(configs=DQ_CONFIGS, key=_KEY,
                                prune_configs_by={"early_config_prune": _prune})(_dq_heuristic)
    _dkdv_chosen = ChosenConfigs(_dkdv_tuned, _bwd_dkdv_kernel)
    _dq_chosen = ChosenConfigs(_dq_tuned, _bwd_dq_kernel)
    INTERPRETER_BWD_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def default_bwd_configs(head_dim_pad: int, element_size: int = 2) -> tuple[dict, dict]:
    """The (dK/dV, dQ) configs used without autotuning; `fallback_configs` shrinks each where it does not fit."""
    if interpreting():
        return INTERPRETER_BWD_CONFIG, INTERPRETER_BWD_CONFIG
    big = head_dim_pad * element_size > 256  # wide operands (d > 128 or fp32) take half the tiles
    return ({"BLOCK_M": 32, "BLOCK_N": 64 if big else 128, "num_warps": 4, "num_stages": 2},
            {"BLOCK_M": 64 if big else 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})


def flash_backward(dout, dlse, q, k, v, out, lse, scale: float, causal: bool, attn_mask=None):
    """Gradients (dq, dk, dv) of `flash_forward`'s (out, lse) for upstream grads dout (B, Hq, Sq, Dv)
    and dlse (B, Hq, Sq) (either may be None = zero). Shapes and dtypes as the inputs."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v, out = (last_dim_contiguous(t) for t in (q, k, v, out))
    dout = torch.zeros_like(out) if dout is None else last_dim_contiguous(dout.to(out.dtype))
    dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * Hq * Sq == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    dv_pad = padded_dim(Dv)
    _bwd_preprocess[(triton.cdiv(Sq, 64), B * Hq)](out, dout, dlse, lse, delta, lse2, *out.stride()[:3],
                                                    *dout.stride()[:3], Hq, Sq, DV=Dv, DV_PAD=dv_pad, BLOCK=64)
    mask = mask_as_4d(attn_mask, B, Hq, Sq, Sk, "flash_attention")
    mask_arg = mask if mask is not None else q
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *dout.stride()[:3])
    buckets = (triton.next_power_of_2(Sq), triton.next_power_of_2(Sk))
    meta = dict(HEAD_DIM=D, HEAD_DIM_PAD=padded_dim(D), DV=Dv, DV_PAD=dv_pad, CAUSAL=bool(causal),
                HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.uint8,
                DOT_PRECISION=dot_precision(q.dtype))
    dkdv_args = (q, k, v, mask_arg, dout, lse2, delta, dk, dv, *common, *dk.stride()[:3], *dv.stride()[:3],
                 Hq, Hkv, Sq, Sk, Hq // Hkv, scale, scale * LOG2E, Sk - Sq, *buckets)
    dq_args = (q, k, v, mask_arg, dout, lse2, delta, dq, *common, *dq.stride()[:3],
               Hq, Sq, Sk, Hq // Hkv, scale, scale * LOG2E, Sk - Sq, *buckets)
    dkdv_grid = lambda c: (triton.cdiv(Sk, c["BLOCK_N"]), B * Hkv)
    dq_grid = lambda c: (triton.cdiv(Sq, c["BLOCK_M"]), B * Hq)
    dkdv_cfg, dq_cfg = default_bwd_configs(max(meta["HEAD_DIM_PAD"], dv_pad), q.element_size())
    shrink_dkdv = lambda: launch_first_that_fits(_dkdv_heuristic, dkdv_grid, dkdv_args, meta,
                                                 fallback_configs(dkdv_cfg))
    shrink_dq = lambda: launch_first_that_fits(_dq_heuristic, dq_grid, dq_args, meta, fallback_configs(dq_cfg))
    if autotuning():  # where no tuned config fits the GPU, each kernel shrinks its tiles on its own
        key = (q.device.index, q.dtype, *buckets, *meta.values())
        _dkdv_chosen.launch(key, dkdv_grid, lambda cfg: dkdv_args, meta, (Sq, Sk), fallback=shrink_dkdv)
        _dq_chosen.launch(key, dq_grid, lambda cfg: dq_args, meta, (Sq, Sk), fallback=shrink_dq)
    else:
        shrink_dkdv()
        shrink_dq()
    return dq, dk, dv
