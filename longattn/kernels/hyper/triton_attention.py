"""HyperAttention forward in Triton: one exact-part launch and one launch per recursion level.

State lives in original row order in two float32 buffers, out (B, Hq, Sq, Dv) and lse (B, Hq, Sq).
`_exact_part_kernel` fills them from the sinks and each row's exact range (window / causal leaf).
`_rectangles_kernel` then runs once per level: a program takes one tile of sorted queries of one
block of one rectangle, reads the rows' state (out, lse) back as an online-softmax state
(m = lse, l = 1, acc = out), runs the block's keys and the rectangle's samples through the same
online softmax, gathering q/k/v rows by index (no permuted copies), and writes the merged state
back to the same rows. Rows of one level belong to one program each, so there is no race, and
every merge is the log-sum-exp merge done in registers. Scores are kept in the log2 domain.

Non-causal attention has one level, which covers every row: it runs first and starts the state
(`INIT`, nothing read), the exact part runs last and merges (`MERGE`), and whichever is last writes
the output in q's dtype directly. Without sinks and window there is no exact part at all, and the
block's key tiles need no mask (`EXCLUDE=False`).

A pattern restricted to some query rows (`pattern.local_pattern`, context parallelism) runs the same
launches over those rows only: q / out / lse / exact ranges hold the local rows, and a rectangle program
takes its block's share of the compacted local sorted order (`LOCAL`, start offsets in `q_start`).

Backward (`triton_backward.py`) differentiates this forward for its own pattern, exactly.
"""
from __future__ import annotations

import functools
import os

import torch

from ..triton_version import triton_older_than
from .pattern import HyperPattern, build_pattern, num_blocks
from .triton_hash import HAVE_TRITON, lsh_rank_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634

if HAVE_TRITON:
    @triton.jit
    def _offset_index(idx, WIDE: tl.constexpr):
        """Row indices for address arithmetic within one head: 32-bit unless a head's rows span 2^31
        elements (64-bit offset tensors cost registers the gathers need)."""
        if WIDE:
            return idx.to(tl.int64)
        else:
            return idx.to(tl.int32)

    @triton.jit
    def _attend(q, m_i, l_i, acc, k_base, v_base, kidx, kvalid, keep, bias, sks, svs,
                scale_log2, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr, WIDE: tl.constexpr, MASKED: tl.constexpr = True):
        """One online-softmax step of rows q (BM, BD) over gathered keys kidx (BN,); keep (BM, BN).
        MASKED=False: every row takes every key (kvalid and keep are not read), the hot path."""
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        kidx = _offset_index(kidx, WIDE)
        if MASKED:
            k = tl.load(k_base + kidx[:, None] * sks + d[None, :], mask=kvalid[:, None] & (d[None, :] < D),
                        other=0.0)
        else:
            k = tl.load(k_base + kidx[:, None] * sks + d[None, :], mask=d[None, :] < D, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias
        if MASKED:
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # rows with nothing seen yet keep m = -inf; shift by 0 so exp2 gives 0, not nan
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_base + kidx[:, None] * svs + dv[None, :], mask=kvalid[:, None] & (dv[None, :] < DV),
                        other=0.0)
        else:
            v = tl.load(v_base + kidx[:, None] * svs + dv[None, :], mask=dv[None, :] < DV, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _key_span(lo, hi, sinks, BLOCK_N: tl.constexpr):
        """Key tiles of a tile of rows with exact ranges [lo, hi) (keys below `sinks` are counted apart):
        (lo_tile, first_full, end_full, hi_tile). The rows span [lo_tile, hi_tile); tiles in
        [first_full, end_full) lie inside every row's range, so they need no mask (for a causal leaf,
        all but the diagonal tiles); the edges before and after need one. Tiles are aligned to lo_tile.
        Rows outside the tile must carry lo = Sk, hi = 0 (no interior then)."""
        lo_tile = tl.maximum(tl.min(lo, axis=0), sinks)
        hi_tile = tl.max(hi, axis=0)
        all_lo = tl.maximum(tl.max(lo, axis=0), sinks)
        all_hi = tl.min(hi, axis=0)
        first_full = lo_tile + tl.cdiv(tl.maximum(all_lo - lo_tile, 0), BLOCK_N) * BLOCK_N
        end_full = first_full + tl.maximum(all_hi - first_full, 0) // BLOCK_N * BLOCK_N
        return lo_tile, first_full, end_full, hi_tile

    @triton.jit
    def _keep_outside(kidx, key_ok, lo, width):
        """(BM, BN) keep mask: key_ok (BN,) and the key outside the row's exact range [lo, lo + width).
        One subtraction and one unsigned compare per element: kidx - lo wraps negative values to large ones."""
        inside = (kidx.to(tl.int32)[None, :] - lo[:, None]).to(tl.uint32) < width[:, None]
        return key_ok[None, :] & ~inside

    @triton.jit
    def _load_state(o_ptrs, lse_ptrs, row_ok, col_ok):
        """Rows' merged result so far (out, natural-log lse) as an online-softmax state (m = lse in log2,
        l = 1, acc = out); rows with nothing yet (lse = -inf) get l = 0."""
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        acc = tl.load(o_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        return lse * 1.4426950408889634, tl.where(lse == float("-inf"), 0.0, 1.0), acc

    @triton.jit
    def _store_state(o_ptrs, lse_ptrs, m_i, l_i, acc, row_ok, col_ok):
        """Normalise an online-softmax state and store out (cast to o_ptrs' dtype) and the natural-log lse."""
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tl.store(lse_ptrs, lse, mask=row_ok)

    # integer sizes may equal 1; Triton would then make them compile-time constants, which some of
    # the arithmetic below does not accept, and which would compile a kernel per such shape
    @triton.jit(do_not_specialize=["Hq", "group", "Sq", "Sk", "sinks"])
    def _exact_part_kernel(Q, K, V, O, OF, LSE, LO, HI,
                           sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                           Hq, group, Sq, Sk, sinks, scale_log2,
                           CAUSAL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
                           MERGE: tl.constexpr = False):
        """Rows' exact part, written to OF (O's strides, any float dtype). MERGE: merged with the result the
        rectangles left in O / LSE (the non-causal order, where this runs last)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // Hq
        h = bh % Hq
        kh = h // group
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Sq
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + b * sqb + h * sqh + _offset_index(rows, WIDE)[:, None] * sqs + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        lo = tl.load(LO + rows, mask=row_ok, other=Sk)
        hi = tl.load(HI + rows, mask=row_ok, other=0)
        # causal: the exact range ends at the row's diagonal (bottom-right aligned), so hi - 1 is the last key
        # the row sees; read from hi, it holds for a local pattern's rows too
        last_key = hi - 1
        k_base = K + b * skb + kh * skh
        v_base = V + b * svb + kh * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for start in range(0, sinks, BLOCK_N):
            kidx = start + cols
            keep = row_ok[:, None] & (kidx[None, :] < sinks)
            if CAUSAL:
                keep = keep & (kidx[None, :] <= last_key[:, None])
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kidx, kidx < sinks, keep, 0.0, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        lo_tile, first_full, end_full, hi_tile = _key_span(lo, hi, sinks, BLOCK_N)
        for start in range(lo_tile, tl.minimum(first_full, hi_tile), BLOCK_N):
            kidx = start + cols
            keep = (kidx[None, :] >= lo[:, None]) & (kidx[None, :] < hi[:, None]) & (kidx[None, :] >= sinks)
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kidx, kidx < hi_tile, keep, 0.0, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        for start in range(first_full, end_full, BLOCK_N):
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, start + cols, cols, cols, 0.0, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE, MASKED=False)
        for start in range(tl.maximum(end_full, first_full), hi_tile, BLOCK_N):
            kidx = start + cols
            keep = (kidx[None, :] >= lo[:, None]) & (kidx[None, :] < hi[:, None]) & (kidx[None, :] >= sinks)
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kidx, kidx < hi_tile, keep, 0.0, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        o_rows = b * sob + h * soh + _offset_index(rows, WIDE)[:, None] * sos + dv[None, :]
        if MERGE:  # at the end, so no state but the online softmax's is live through the key loops (registers)
            m_o, l_o, acc_o = _load_state(O + o_rows, LSE + bh * Sq + rows, row_ok, dv < DV)
            m_new = tl.maximum(m_i, m_o)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha, beta = tl.exp2(m_i - m_safe), tl.exp2(m_o - m_safe)
            m_i, l_i, acc = m_new, l_i * alpha + l_o * beta, acc * alpha[:, None] + acc_o * beta[:, None]
        _store_state(OF + o_rows, LSE + bh * Sq + rows, m_i, l_i, acc, row_ok, dv < DV)

    @triton.jit
    def _block_rows(QORD, QSTART, RECTS, bh, r, blk, tile, nb, Sq, n_rects, nbq,
                    BLOCK_M: tl.constexpr, LOCAL: tl.constexpr):
        """This program's query rows: tile `tile` of block `blk` of rectangle r (sorted order), as
        (rows, row_ok, active); active = 0 when the tile is empty or past the rectangle's last block."""
        if LOCAL:
            # a local pattern: the block's local rows are a slice of the compacted order
            at = QSTART + (bh * n_rects + r) * nbq + blk
            q_lo = tl.load(at)
            q_hi = tl.load(at + 1)
        else:
            qs = tl.load(RECTS + r * 4)
            ql = tl.load(RECTS + r * 4 + 1)
            q_lo = qs + (blk * ql) // nb
            q_hi = qs + ((blk + 1) * ql) // nb
        q_lo += tile * BLOCK_M
        # empty programs get empty ranges (no early return needed)
        active = ((blk < nb) & (q_lo < q_hi)).to(tl.int32)
        ranks = q_lo + tl.arange(0, BLOCK_M)
        row_ok = ranks < q_hi * active
        rows = tl.load(QORD + bh * Sq + ranks, mask=row_ok, other=0)
        return rows, row_ok, active

    @triton.jit(do_not_specialize=["Hq", "Hkv", "group", "Sq", "Sk", "sinks", "n_samples", "block_size",
                                   "tiles_per_block", "n_rects", "nbq"])
    def _rectangles_kernel(Q, K, V, O, OF, LSE, LO, HI, QORD, QSTART, KORD, SAMP, SBLK, SLW, RECTS,
                           sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                           Hq, Hkv, group, Sq, Sk, sinks, n_samples, block_size, tiles_per_block, n_rects, nbq,
                           scale_log2,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                           WIDE: tl.constexpr, LOCAL: tl.constexpr, INIT: tl.constexpr = False,
                           EXCLUDE: tl.constexpr = True):
        """One level's rectangles, merged into the rows' state in O / LSE and written to OF (O's strides, any
        float dtype). INIT: the rows have no state yet (this level is the first to touch them). EXCLUDE: rows
        have exact keys (sinks, ranges) that the blocks and samples must skip."""
        pid = tl.program_id(0)
        r = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        b = bh // Hq
        h = bh % Hq
        kh = h // group
        ks = tl.load(RECTS + r * 4 + 2)
        kl = tl.load(RECTS + r * 4 + 3)
        nb = (kl + block_size - 1) // block_size
        blk = pid // tiles_per_block
        rows, row_ok, active = _block_rows(QORD, QSTART, RECTS, bh, r, blk, pid % tiles_per_block, nb, Sq, n_rects,
                                           nbq, BLOCK_M, LOCAL)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        row_off = _offset_index(rows, WIDE)[:, None]
        q = tl.load(Q + b * sqb + h * sqh + row_off * sqs + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        lo = tl.load(LO + rows, mask=row_ok, other=0).to(tl.int32)
        width = (tl.load(HI + rows, mask=row_ok, other=0).to(tl.int32) - lo).to(tl.uint32)
        if INIT:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        else:
            m_i, l_i, acc = _load_state(O + b * sob + h * soh + row_off * sos + dv[None, :], LSE + bh * Sq + rows,
                                        row_ok, dv < DV)
        k_base = K + b * skb + kh * skh
        v_base = V + b * svb + kh * svh
        cols = tl.arange(0, BLOCK_N)
        k_lo = ks + (blk * kl) // nb
        k_hi = k_lo + (ks + ((blk + 1) * kl) // nb - k_lo) * active
        kord = KORD + (b * Hkv + kh) * Sk
        # without exact keys to skip (no sinks, no window: the paper variant) the block's full key tiles need
        # no mask; otherwise every tile is masked
        k_full = k_lo if EXCLUDE else k_lo + (k_hi - k_lo) // BLOCK_N * BLOCK_N
        for start in range(k_lo, k_full, BLOCK_N):
            kidx = tl.load(kord + start + cols)
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kidx, cols, cols, 0.0, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE, MASKED=False)
        for start in range(k_full, k_hi, BLOCK_N):
            pos = start + cols
            kvalid = pos < k_hi
            kidx = tl.load(kord + pos, mask=kvalid, other=0)
            # rows outside the tile (row_ok false) compute values that are never stored
            keep = _keep_outside(kidx, kvalid & (kidx >= sinks), lo, width)
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kidx, kvalid, keep, 0.0, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        # the rectangle's samples, each standing for exp(log-weight) keys (kl / m when drawn uniformly); those in
        # the row's own block were counted exactly above
        n_s = n_samples * active
        samp = ((b * Hkv + kh) * n_rects + r) * n_samples
        for start in range(0, n_s, BLOCK_N):
            si = start + cols
            svalid = si < n_s
            kidx = tl.load(SAMP + samp + si, mask=svalid, other=0)
            sblk = tl.load(SBLK + samp + si, mask=svalid, other=-1)
            weight_log2 = tl.load(SLW + samp + si, mask=svalid, other=0.0)[None, :] * 1.4426950408889634
            keep = _keep_outside(kidx, svalid & (sblk != blk) & (kidx >= sinks), lo, width)
            m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kidx, svalid, keep, weight_log2, sks, svs,
                                    scale_log2, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        _store_state(OF + b * sob + h * soh + row_off * sos + dv[None, :], LSE + bh * Sq + rows, m_i, l_i, acc,
                     row_ok, dv < DV)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by largest head size; not autotuned because the
# rectangle kernel updates its output in place (a tuning rerun would merge twice). The benchmark
# sweeps candidates by assigning to these tables (bench_hyper.py --sweep-*).
# The GPU image's Triton (3.6) was measured on an H200; Triton 3.9 builds several of those tiles with
# register spills (sm90_build), so newer Tritons take the best candidate that builds without them.
_OLD_TRITON = triton_older_than(3, 7)
SPILLING_BY_CHOICE = set()  # tiles kept although their sm_90 build spills: measured fastest on triton 3.6


def _measured(fastest, spill_free):
    """The tile measured fastest on Triton 3.6 there (recorded as spilling by choice), else the spill-free one."""
    if _OLD_TRITON:
        SPILLING_BY_CHOICE.add(fastest)
        return fastest
    return spill_free


# Rectangles. d64: both causal modes at 32K (results/2026-11-30-h200-hyper-sweep.md): 128x64 at 4 warps
# 6.70 ms, 64x32 at 4 warps 7.40, 64x64 at 8 warps 8.59. d128 (results/2026-12-01-h200-hyper-bwd-sweep.md):
# 128x32 at 4 warps 8.82 ms, 64x64 9.21, 64x32 9.72.
TILES = {64: _measured((128, 64, 4, 2), (64, 32, 4, 2)), 128: _measured((128, 32, 4, 2), (64, 32, 8, 1)),
         256: (32, 32, 8, 1)}
# the exact part (sinks, window, causal leaves): contiguous keys, a flash-style loop. d128: 64x64 at
# 4 warps x 2 stages 7.02 ms, 128x64 7.43, 64x64 x 3 stages 7.46, 64x128 7.51 (same files)
TILES_EXACT = {64: (64, 64, 4, 3), 128: _measured((64, 64, 4, 2), (64, 32, 8, 1)), 256: (32, 32, 8, 1)}
# the non-causal exact part: sinks and a window around each row, no leaves (a tile of BLOCK_M rows reads the
# sinks and BLOCK_M + window keys, so taller tiles waste more). d64 swept on an H200 (triton 3.6, non-causal
# forward at 131K, results/2026-12-01-h200-hyper-window-tiles.md): 64x32 at 4 warps x 3 stages 7.98 ms,
# 64x64 x 3 stages (the causal choice) 8.21, 128-row tiles 8.45-9.82
TILES_WINDOW = {**TILES_EXACT, 64: (64, 32, 4, 3)}
# Backward, timed as causal forward+backward at 32K (results/2026-12-01-h200-hyper-bwd-sweep.md).
# The exact part: dk / dv key-major (a key tile of BLOCK_N stays while row tiles of BLOCK_M stream past):
# d64 64x64 at 4 warps 18.20 ms (32x32 at 8 warps 33.89), d128 32x64 at 4 warps 30.24 (32x32 41.32);
# dq row-major: d64 64x32 at 4 warps 17.86 (64x64 17.64 spills on 3.9), d128 64x32 at 4 warps 25.81
# (64x32 at 8 warps 30.22).
TILES_BWD_DKDV = {64: _measured((64, 64, 4, 2), (32, 128, 8, 1)), 128: _measured((32, 64, 4, 2), (64, 32, 8, 1)),
                  256: (16, 32, 8, 1)}
TILES_BWD_DQ = {64: (64, 32, 4, 2), 128: _measured((64, 32, 4, 2), (64, 32, 8, 1)), 256: (32, 32, 8, 1)}
# The rectangles' blocks: key-major (a tile of BLOCK_N keys of a block stays, the block's query tiles of
# BLOCK_M rows stream past): d64 64x64 at 4 warps 17.51 ms (32x128 at 8 warps 18.43, 32x32 25.62), d128 32x64
# at 4 warps 15.75 (32x128 at 8 warps 16.07, 32x32 19.89); results/2026-12-01-h200-hyper-bwd-sweep2.md
TILES_BWD_BLOCKS = {64: _measured((64, 64, 4, 2), (32, 64, 8, 1)), 128: _measured((32, 64, 4, 2), (32, 32, 8, 1)),
                    256: (16, 32, 8, 1)}
# The rectangles' samples: row-major, dk / dv by atomics, so taller query tiles mean fewer atomics on the
# shared sample keys: d64 128x32 at 4 warps 17.49 (64x32 18.05), d128 128x32 at 8 warps 15.76 (64x32 at
# 4 warps 15.92, 32x32 18.91) (same file)
TILES_BWD = {64: _measured((128, 32, 4, 2), (128, 32, 8, 1)), 128: _measured((128, 32, 8, 1), (32, 32, 8, 1)),
             256: (16, 32, 8, 1)}


# Register spill that the compile gate (tests/kernels/compile_gate.py) allows in fp16/bf16 builds for sm_90, for
# the kernels here and in triton_backward: none, except at the tiles kept by choice although they spill
# (SPILLING_BY_CHOICE, Triton 3.6 only: 48-408 bytes there).
SPILL_LIMITS = {"*": 0, **{f"* BLOCK_M={m} BLOCK_N={n} num_warps={w} num_stages={s}": None
                           for m, n, w, s in SPILLING_BY_CHOICE}}


def _tiles(head_dim, dv, table=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 16, 1, 1
    table = TILES if table is None else table
    width = max(head_dim, dv)
    for limit in sorted(table):
        if width <= limit:
            return table[limit]
    raise ValueError(f"hyper_attention (triton): head dims up to {max(table)} are supported, got {width}")


def needs_wide_offsets(*tensors) -> bool:
    """Whether offsets within one (batch, head) slice of any of these (B, H, S, D) tensors reach 2^31."""
    return any(t.shape[2] * t.stride(2) + t.shape[3] >= 2**31 for t in tensors)


def hyper_forward_triton(q, k, v, pattern: HyperPattern, *, scale, causal):
    """Forward of HyperAttention for a fixed pattern. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv),
    float16 / bfloat16 / float32, same dtype. Returns (out in q's dtype, lse float32 (B, Hq, Sq))."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"hyper_attention (triton): q/k/v must share one of float16/bfloat16/float32, "
                        f"got {q.dtype}/{k.dtype}/{v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    out = torch.empty(B, Hq, Sq, Dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    # index tensors stay int64 as the pattern made them: converting would cost a launch each
    lo, hi = pattern.exact_lo.contiguous(), pattern.exact_hi.contiguous()
    dims = dict(D=D, DV=Dv, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
                PRECISION="ieee" if q.dtype == torch.float32 else None, WIDE=needs_wide_offsets(q, k, v, out))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    scale_log2 = float(scale) * LOG2E

    def exact_part(target, merge):
        block_m, block_n, warps, stages = _tiles(D, Dv, TILES_EXACT if causal else TILES_WINDOW)
        _exact_part_kernel[(triton.cdiv(Sq, block_m), B * Hq)](
            q, k, v, out, target, lse, lo, hi, *strides, Hq, group, Sq, Sk, pattern.sinks, scale_log2,
            CAUSAL=bool(causal), MERGE=merge, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
            **dims)

    def rectangles(level, target, init):
        block_m, block_n, warps, stages = _tiles(D, Dv)
        grid, tiles_per_block, nbq = level_grid(level, pattern.block_size, block_m, B * Hq)
        m = level.samples.shape[-1]
        _rectangles_kernel[grid](
            q, k, v, out, target, lse, lo, hi, *level_indices(level), *strides, Hq, Hkv, group, Sq, Sk,
            pattern.sinks, m, pattern.block_size, tiles_per_block, len(level.rect_list), nbq, scale_log2,
            LOCAL=level.q_start is not None, INIT=init, EXCLUDE=not pattern.exact_apart,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **dims)

    if not causal and len(pattern.levels) == 1 and Sk > 0:
        # non-causal: the one level covers every row. It starts the state, the exact part (if any) merges last,
        # and whichever is last writes the result in q's dtype (no float32 round trip, no copy)
        final = out if q.dtype == torch.float32 else torch.empty_like(out, dtype=q.dtype)
        if pattern.exact_apart:  # no sinks, no window: no exact part
            rectangles(pattern.levels[0], final, init=True)
        else:
            rectangles(pattern.levels[0], out, init=True)
            exact_part(final, merge=True)
        return final, lse
    # causal levels cover some rows only: the exact part starts every row, the levels merge, one copy casts
    exact_part(out, merge=False)
    for level in pattern.levels:
        rectangles(level, out, init=False)
    return out.to(q.dtype), lse


def level_grid(level, block_size, block_m, heads):
    """(grid, tiles per block, q_start's row length) of a level's rectangle launch. A local pattern's
    blocks are at most the global ones' sizes, so the same grid covers them (empty tiles exit at once)."""
    rects = level.rect_list
    nbs = [num_blocks(kl, block_size) for (_, _, _, kl) in rects]
    widest = max(-(-ql // nb) for (_, ql, _, _), nb in zip(rects, nbs))
    tiles_per_block = triton.cdiv(widest, block_m)
    return (max(nbs) * tiles_per_block, len(rects), heads), tiles_per_block, max(nbs) + 1


def level_indices(level):
    """The index tensors a rectangle launch reads: QORD, QSTART (q_order again when unused), KORD, SAMP,
    SBLK, SLW, RECTS."""
    q_start = level.q_order if level.q_start is None else level.q_start
    return tuple(t.contiguous() for t in (level.q_order, q_start, level.k_order, level.samples,
                                          level.sample_block, level.sample_logw, level.rects))


class _PatternBox:
    """Carries the forward's pattern to the backward. The pattern is built inside `forward`, where
    tensors are plain even under torch.func transforms (the Triton hash cannot read functorch
    wrappers), and it must not be rebuilt in backward: only the same pattern gives exact gradients."""
    pattern = None


def _plain(t):
    """The plain tensor under functorch wrappers (torch.func.vjp hands the backward wrapped tensors,
    which Triton cannot read); the gradients need no further transform, so computing on it is exact."""
    functorch = getattr(torch._C, "_functorch", None)
    if t is None or functorch is None:
        return t
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


# "triton": backward kernels; "reference": vjp of the PyTorch reference on the same pattern (slow, for checking)
BACKWARD = os.environ.get("LONGATTN_HYPER_BACKWARD", "triton")


class HyperAttentionTriton(torch.autograd.Function):
    """Triton forward; Triton backward for the pattern the forward used (or the reference's vjp)."""

    @staticmethod
    def forward(q, k, v, scale, causal, make_pattern, box):
        box.pattern = make_pattern(q, k)
        return hyper_forward_triton(q, k, v, box.pattern, scale=scale, causal=causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal, make_pattern, box = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.scale, ctx.causal, ctx.box = scale, causal, box
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern = ctx.box.pattern
        if BACKWARD == "triton" or pattern.rows is not None:  # the reference computes every row of a pattern
            from .triton_backward import hyper_backward_triton
            q_, k_, v_, out_, lse_ = map(_plain, (q, k, v, out, lse))
            grad_out = torch.zeros_like(out_) if grad_out is None else _plain(grad_out)
            dq, dk, dv = hyper_backward_triton(q_, k_, v_, out_, lse_, grad_out, _plain(grad_lse), pattern,
                                               scale=ctx.scale, causal=ctx.causal)
            return dq, dk, dv, None, None, None, None
        from .reference import hyper_attention_from_pattern
        fn = lambda q_, k_, v_: hyper_attention_from_pattern(q_, k_, v_, pattern, scale=ctx.scale, causal=ctx.causal)
        (out, lse), vjp = torch.func.vjp(fn, q, k, v)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        dq, dk, dv = vjp((grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
        return dq, dk, dv, None, None, None, None


def hyper_attention_triton(q, k, v, *, scale, causal, make_pattern=None, **params):
    """Differentiable Triton HyperAttention; params are `build_pattern`'s keyword arguments.
    make_pattern(q, k) -> HyperPattern replaces `build_pattern` (called inside the autograd Function, where
    tensors are plain); context parallelism passes one that returns this rank's `local_pattern`."""
    if make_pattern is None:
        make_pattern = functools.partial(build_pattern, causal=causal, rank_fn=lsh_rank_triton, scale=scale,
                                         **params)
    return HyperAttentionTriton.apply(q, k, v, scale, causal, make_pattern, _PatternBox())
