"""Split-K decode ("flash-decoding"): a few queries (Sq <= 16) against long K/V.

Decoding is bound by reading K and V once. The tiled forward gives one program per 128 query rows,
so with one query it would run B·Hq programs, each streaming all keys: far too few to fill the GPU,
and with GQA every query head of a group would read the same K/V again. Here:
  _decode_split_kernel: one program per (key split, batch·kv head). Its query tile holds every
      (query head of the group, query position) row, group·Sq rows padded to >= 16 for tl.dot,
      so each KV head is read exactly once for its whole group. It writes a partial output
      (normalised over its keys) with its running max m_c (base 2) and sum l_c. A split's keys are either one
      contiguous chunk or, INTERLEAVED, every num_splits-th tile, so that the splits of a head stream
      neighbouring tiles at the same time (the order of the keys does not matter to the softmax).
  _decode_merge_kernel: one program per output row merges the splits, each weighted by w_c = 2^(m_c − m)·l_c
      (out = Σ_c w_c out_c / Σ_c w_c). Not by lse: a row masked throughout at the dtype minimum has
      m ≈ -3e38, where an lse cannot hold log2 l_c and splits of unequal size would weigh alike.
      On Hopper and newer it is launched
      as a programmatic dependent launch: its programs start while the split kernel finishes and wait
      for its writes (griddepcontrol), which hides the launch gap between the two.
The number of splits is chosen so that about PROGRAMS_PER_SM programs run per SM.
"""
from __future__ import annotations

import functools

import torch

from .triton_fwd import (LOG2E, ChosenConfigs, OutOfResources, _compute_capability, _load_2d, additive_mask_base2,
                         autotuning, dot_precision, interpreting, last_dim_contiguous, launch_first_that_fits,
                         mask_as_4d, padded_dim, triton)

DECODE_MAX_QUERIES = 16
MAX_GROUP_ROWS = 128  # group·Sq rows per program; beyond that the tiled forward is as good
MAX_SPLITS = 128
MIN_KEYS_PER_SPLIT = 128
# Measured on an H100 (benchmarks/results/2026-12-06-h100-flash-decode.md): with 4 programs per SM, splits that
# take every num_splits-th tile and 64-key tiles in 2 stages, one query against 8K-131K keys ran at 0.99-1.02x
# cuDNN with 32/32 heads (contiguous chunks at 3 per SM, the earlier default: 0.96-0.97x); with the merge as a
# programmatic dependent launch on top, 0.98-1.03x with 32/32 and 1.02-1.24x with 9/3.
PROGRAMS_PER_SM = 4  # the keys are split so that about this many split programs run per SM
INTERLEAVED = True  # a split takes every num_splits-th tile instead of one contiguous chunk
DECODE_FALLBACK_TILES = [(64, 2), (32, 2), (16, 1)]  # (BLOCK_N, num_stages), first that fits
# Register spill that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90: none in the
# merge; no bound on the split kernel, whose configs the autotuner times (128 query rows spill up to ~700 bytes).
SPILL_LIMITS = {"_decode_merge_kernel": 0}
DECODE_TUNED_TILES = [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3), (32, 4, 4)]  # (BLOCK_N, warps, stages)


def decode_fallback_configs() -> list[dict]:
    """The split kernel's configs without the autotuner, largest first: the first that fits the GPU runs."""
    return [dict(BLOCK_N=bn, num_warps=4, num_stages=st) for bn, st in DECODE_FALLBACK_TILES]

if triton is not None:
    import triton.language as tl
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # an older Triton: programmatic_launch() is False and these are never reached
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, Mask, PartOut, PartStats,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_mb, stride_mh, stride_mm, stride_mn,
        Hkv, Sq, Sk, GROUP, qk_scale, causal_offset, keys_per_split, num_splits, SK_BUCKET,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        ROWS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        if PDL:  # the merge kernel may be scheduled now; it waits for this grid's writes
            gdc_launch_dependents()
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        r = tl.arange(0, ROWS)
        n_rows = GROUP * Sq
        rows_ok = r < n_rows
        qi = r % Sq  # query position of the row
        hq = hk * GROUP + r // Sq  # query head of the row
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + hq[:, None].to(tl.int64) * stride_qh + qi[:, None] * stride_qm
                    + offs_d[None, :], mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        mask_rows = Mask + b.to(tl.int64) * stride_mb + hq[:, None].to(tl.int64) * stride_mh + qi[:, None] * stride_mm
        if INTERLEAVED:
            start, end, step = pid_s * BLOCK_N, Sk, num_splits * BLOCK_N
        else:
            start, step = pid_s * keys_per_split, BLOCK_N
            end = tl.minimum(start + keys_per_split, Sk)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DV_PAD], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(start, end, step):
            cols = start_n + offs_n
            cols_ok = cols < end
            kt = _load_2d(k_base + offs_d[:, None] + cols[None, :] * stride_kn, offs_d < HEAD_DIM, cols_ok,
                          HEAD_DIM != HEAD_DIM_PAD, True)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            keep = cols_ok[None, :] & rows_ok[:, None]
            if HAS_MASK:
                mv = tl.load(mask_rows + cols[None, :] * stride_mn, mask=keep, other=0)
                if MASK_IS_BOOL:
                    keep = keep & (mv != 0)
                else:
                    s = s + additive_mask_base2(mv)
            if CAUSAL:
                keep = keep & (cols[None, :] <= qi[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_2d(v_base + cols[:, None] * stride_vn + offs_dv[None, :], cols_ok, offs_dv < DV,
                         True, DV != DV_PAD)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        part = (pid_bh.to(tl.int64) * num_splits + pid_s) * n_rows + r
        tl.store(PartOut + part[:, None] * DV + offs_dv[None, :], out,
                 mask=rows_ok[:, None] & (offs_dv < DV)[None, :])
        # the running max and sum, not their lse: at a mask's dtype minimum (-3e38) the lse could not hold log2 l
        tl.store(PartStats + 2 * part, tl.where(seen, m_i, float("-inf")), mask=rows_ok)
        tl.store(PartStats + 2 * part + 1, l_i, mask=rows_ok)

    @triton.jit
    def _decode_merge_kernel(PartOut, PartStats, Out, Lse, stride_ob, stride_oh, stride_om,
                             Hkv, Hq, Sq, GROUP, num_splits,
                             DV: tl.constexpr, DV_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()
        pid = tl.program_id(0)
        n_rows = GROUP * Sq
        bh = pid // n_rows
        r = pid % n_rows
        s = tl.arange(0, SPLITS_PAD)
        s_ok = s < num_splits
        offs_dv = tl.arange(0, DV_PAD)
        part = (bh.to(tl.int64) * num_splits + s) * n_rows + r
        m_s = tl.load(PartStats + 2 * part, mask=s_ok, other=float("-inf"))  # base 2
        l_s = tl.load(PartStats + 2 * part + 1, mask=s_ok, other=0.0)
        m = tl.max(m_s, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(m_s - m_safe) * l_s  # each split's sum of exp2(score - m)
        total = tl.sum(w, 0)
        o = tl.load(PartOut + part[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & (offs_dv < DV)[None, :],
                    other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
        lse = tl.where(total > 0.0, (m_safe + tl.math.log2(tl.where(total > 0.0, total, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        b = bh // Hkv
        hq = (bh % Hkv) * GROUP + r // Sq
        qi = r % Sq
        tl.store(Out + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + qi * stride_om + offs_dv,
                 out.to(Out.dtype.element_ty), mask=offs_dv < DV)
        tl.store(Lse + (b * Hq + hq).to(tl.int64) * Sq + qi, lse)

    DECODE_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in DECODE_TUNED_TILES]
    _decode_tuned = triton.autotune(
        configs=DECODE_CONFIGS,
        key=["SK_BUCKET", "ROWS", "HEAD_DIM_PAD", "DV_PAD", "CAUSAL", "HAS_MASK", "INTERLEAVED", "PDL"],
    )(_decode_split_kernel)
    _decode_chosen = ChosenConfigs(_decode_tuned, _decode_split_kernel)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def triton_launches_pdl() -> bool:
    """Whether this Triton can build and launch a programmatic dependent launch (`launch_pdl`, griddepcontrol)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and gdc_wait is not None


@functools.lru_cache(maxsize=8)
def programmatic_launch(device_index: int) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that can launch it."""
    return triton_launches_pdl() and _compute_capability(device_index) >= 9


def decode_splits(batch_kv_heads: int, Sk: int, num_sms: int) -> tuple[int, int]:
    """(number of key chunks, keys per chunk): about PROGRAMS_PER_SM programs per SM, chunks of >= 128 keys
    (a multiple of 128, so every chunk starts on an aligned tile)."""
    wanted = max(1, triton.cdiv(PROGRAMS_PER_SM * num_sms, batch_kv_heads))
    splits = max(1, min(wanted, triton.cdiv(Sk, MIN_KEYS_PER_SPLIT), MAX_SPLITS))
    keys = triton.cdiv(triton.cdiv(Sk, splits), MIN_KEYS_PER_SPLIT) * MIN_KEYS_PER_SPLIT
    return triton.cdiv(Sk, keys), keys


def decode_forward(q, k, v, scale: float, causal: bool, attn_mask=None, config: dict | None = None):
    """(out, lse) like `flash_forward`, for Sq <= 16. Falls back to the tiled forward when the
    query group is too tall for one tile (group·Sq > 128). `config` (BLOCK_N, num_warps, num_stages)
    bypasses the autotuner."""
    from .triton_fwd import flash_forward
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    if Sq > DECODE_MAX_QUERIES or group * Sq > MAX_GROUP_ROWS or Sq == 0 or Sk == 0 or B * Hq == 0:
        return flash_forward(q, k, v, scale, causal, attn_mask)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    device_index = q.device.index if q.device.index is not None else 0
    num_sms = 2 if interpreting() else _num_sms(device_index)
    pdl = not interpreting() and programmatic_launch(device_index)
    splits, keys_per_split = decode_splits(B * Hkv, Sk, num_sms)
    if interpreting():  # several chunks and several tiles per chunk even on tiny test shapes
        keys_per_split = 32
        splits = triton.cdiv(Sk, keys_per_split)
    n_rows = group * Sq
    part_out = torch.empty(B * Hkv, splits, n_rows, Dv, dtype=torch.float32, device=q.device)
    part_stats = torch.empty(B * Hkv, splits, n_rows, 2, dtype=torch.float32, device=q.device)  # (max, sum)
    mask = mask_as_4d(attn_mask, B, Hq, Sq, Sk, "flash_attention")
    mask_arg = mask if mask is not None else q
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    args = (q, k, v, mask_arg, part_out, part_stats, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *mask_strides, Hkv, Sq, Sk, group, scale * LOG2E, Sk - Sq, keys_per_split, splits,
            triton.next_power_of_2(Sk))
    meta = dict(HEAD_DIM=D, HEAD_DIM_PAD=padded_dim(D), DV=Dv, DV_PAD=padded_dim(Dv),
                ROWS=max(16, triton.next_power_of_2(n_rows)), CAUSAL=bool(causal), HAS_MASK=mask is not None,
                MASK_IS_BOOL=mask is not None and mask.dtype == torch.uint8, DOT_PRECISION=dot_precision(q.dtype),
                INTERLEAVED=INTERLEAVED, PDL=pdl)
    grid = lambda cfg: (splits, B * Hkv)
    # tall query groups with wide heads outgrow shared memory at 64 keys x 2 stages: step down
    shrink = lambda: launch_first_that_fits(_decode_split_kernel, grid, args, meta, decode_fallback_configs())
    try:
        if config is not None or interpreting():
            _decode_split_kernel[grid(None)](*args, **meta, **(config or dict(BLOCK_N=16, num_warps=4, num_stages=1)))
        elif autotuning():
            _decode_chosen.launch((q.device.index, q.dtype, args[-1], *meta.values()), grid, lambda cfg: args, meta,
                                  fallback=shrink)
        else:
            shrink()
    except OutOfResources:  # no decode tile fits (fp32 with 128 query rows of d > 128): the tiled forward does
        if config is not None:
            raise
        return flash_forward(q, k, v, scale, causal, attn_mask)
    out = torch.empty(B, Hq, Sq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(B * Hkv * n_rows,)](part_out, part_stats, out, lse, *out.stride()[:3], Hkv, Hq, Sq, group,
                                              splits, DV=Dv, DV_PAD=padded_dim(Dv),
                                              SPLITS_PAD=max(2, triton.next_power_of_2(splits)), PDL=pdl,
                                              **({"launch_pdl": True} if pdl else {}))
    return out, lse
