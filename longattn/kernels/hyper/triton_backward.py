"""HyperAttention backward in Triton, for the pattern the forward used.

The forward's estimate is a softmax over weighted keys: P_ij = w_ij exp(s_ij - lse_i), with w_ij the
multiplicity (1 for exact / block keys, kl/m per sample occurrence). With Delta_i = sum_d dO_id O_id
and an incoming gradient g_i on lse_i, the usual flash-attention backward holds part by part:
dS_ij = P_ij (dO_i . v_j - Delta_i + g_i), dq_i = scale sum_j dS_ij k_j, dk_j = scale sum_i dS_ij q_i,
dv_j = sum_i P_ij dO_i. The launches mirror the forward (exact part, then one per level); each
program recomputes P from the final lse. The exact part runs row-major for dq and key-major for
dk / dv (no atomics: its keys are the bulk of a causal row's work), both unmasked inside the rows'
ranges. Each level's blocks run key-major too: a key lies in one block per level, so its dk / dv
are summed in registers and added once. Its samples run row-major: dq in registers (the blocks' dq
too, recomputing P), dk / dv with float32 atomics (the samples are shared by every block of the
rectangle and the heads of a GQA group).
"""
from __future__ import annotations

import os

import torch

from .pattern import HyperPattern
from .triton_attention import SPILL_LIMITS  # noqa: F401 - the tables' spill bounds cover the backward too
from .triton_attention import (TILES_BWD, TILES_BWD_BLOCKS, TILES_BWD_DKDV, TILES_BWD_DQ, _block_rows, _key_span,
                               _offset_index, _tiles, level_grid, level_indices, needs_wide_offsets)
from .triton_hash import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _grad_step(q, do, lse2, delta, dq, k_base, v_base, dk_base, dv_base, kidx, kvalid, keep, bias,
                   sks, svs, scale_log2, scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr, KV_GRADS: tl.constexpr = True,
                   MASKED: tl.constexpr = True):
        """One key tile's share of dq (returned) and, with KV_GRADS, of dk / dv (atomics).
        MASKED=False: every row takes every key (kvalid and keep are not read)."""
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        kidx = _offset_index(kidx, WIDE)
        if MASKED:
            kmask = kvalid[:, None] & (d[None, :] < D)
            vmask = kvalid[:, None] & (dv[None, :] < DV)
        else:
            kmask = d[None, :] < D
            vmask = dv[None, :] < DV
        k = tl.load(k_base + kidx[:, None] * sks + d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + kidx[:, None] * svs + dv[None, :], mask=vmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias
        if MASKED:
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if KV_GRADS:
            dk_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            # relaxed: a pure reduction, nothing reads the result, so no ordering is needed
            tl.atomic_add(dk_base + kidx[:, None] * D + d[None, :], dk_part, mask=kmask, sem="relaxed")
            tl.atomic_add(dv_base + kidx[:, None] * DV + dv[None, :], dv_part, mask=vmask, sem="relaxed")
        return dq

    @triton.jit
    def _excluded(kidx, lo, hi, sinks):
        return (kidx[None, :] < sinks) | ((kidx[None, :] >= lo[:, None]) & (kidx[None, :] < hi[:, None]))

    @triton.jit
    def _load_rows(Q, DO, LSE, DELTA, b, h, bh, rows, row_ok, sqb, sqh, sqs, Sq,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   WIDE: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        row_off = _offset_index(rows, WIDE)[:, None]
        q = tl.load(Q + b * sqb + h * sqh + row_off * sqs + d[None, :], mask=row_ok[:, None] & (d[None, :] < D),
                    other=0.0)
        do = tl.load(DO + bh * Sq * DV + row_off * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                     other=0.0)
        lse2 = tl.load(LSE + bh * Sq + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Sq + rows, mask=row_ok, other=0.0)
        return q, do, lse2, delta

    @triton.jit
    def _exact_dq_edge(q, do, lse2, delta, dq, k_base, v_base, kidx, row_ok, lo, hi, hi_tile, sinks, sks, svs,
                       scale_log2, scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
        """dq of a key tile at the edge of the rows' exact ranges (some rows skip some keys)."""
        keep = row_ok[:, None] & (kidx[None, :] >= lo[:, None]) & (kidx[None, :] < hi[:, None]) & \
            (kidx[None, :] >= sinks)
        return _grad_step(q, do, lse2, delta, dq, k_base, v_base, k_base, v_base, kidx, kidx < hi_tile, keep, 0.0,
                          sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE, False)

    @triton.jit
    def _key_tile(K, V, b, kh, kidx, kvalid, skb, skh, sks, svb, svh, svs, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WIDE: tl.constexpr):
        """A key-major program's start: row offsets (BN, 1) of keys kidx in key head kh, their keys (BN, D) and
        values (BN, Dv) (zero where not kvalid), and zero dk / dv accumulators."""
        k_off = _offset_index(kidx, WIDE)[:, None]
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        k = tl.load(K + b * skb + kh * skh + k_off * sks + d[None, :], mask=kvalid[:, None] & (d[None, :] < D),
                    other=0.0)
        v = tl.load(V + b * svb + kh * svh + k_off * svs + dv[None, :], mask=kvalid[:, None] & (dv[None, :] < DV),
                    other=0.0)
        return (k_off, k, v, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), tl.zeros([BLOCK_N, BLOCK_DV], tl.float32))

    @triton.jit
    def _kv_tile_step(k, v, dk, dvacc, q, do, lse2, delta, keep, scale_log2, PRECISION: tl.constexpr,
                      MASKED: tl.constexpr):
        """A resident key tile's dk / dv (unscaled) from one tile of rows; keep (BN, BM) when MASKED.
        Returns (dk, dv, dS (BN, BM)): dS also gives the rows' dq share, dSᵀ k."""
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
        if MASKED:
            p = tl.where(keep, tl.exp2(s - lse2[None, :]), 0.0)
        else:
            p = tl.exp2(s - lse2[None, :])
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dvacc += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
        return dk, dvacc, ds

    @triton.jit(do_not_specialize=["Hq", "Hkv", "group", "Sq", "Sk", "sinks"])
    def _exact_part_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, LO, HI,
                               sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                               Hq, Hkv, group, Sq, Sk, sinks, scale_log2, scale,
                               CAUSAL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // Hq
        h = bh % Hq
        kh = h // group
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Sq
        q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, bh, rows, row_ok, sqb, sqh, sqs, Sq,
                                        D, DV, BLOCK_D, BLOCK_DV, WIDE)
        lo = tl.load(LO + rows, mask=row_ok, other=Sk)
        hi = tl.load(HI + rows, mask=row_ok, other=0)
        last_key = hi - 1  # causal: the exact range ends at the diagonal (see the forward)
        k_base = K + b * skb + kh * skh
        v_base = V + b * svb + kh * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        # dq only (KV_GRADS False): _grad_step's dk / dv pointers are not read, k_base / v_base fill them
        for start in range(0, sinks, BLOCK_N):
            kidx = start + cols
            keep = row_ok[:, None] & (kidx[None, :] < sinks)
            if CAUSAL:
                keep = keep & (kidx[None, :] <= last_key[:, None])
            dq = _grad_step(q, do, lse2, delta, dq, k_base, v_base, k_base, v_base, kidx, kidx < sinks, keep, 0.0,
                            sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE, False)
        # masked edges, unmasked interior, as in the forward
        lo_tile, first_full, end_full, hi_tile = _key_span(lo, hi, sinks, BLOCK_N)
        for start in range(lo_tile, tl.minimum(first_full, hi_tile), BLOCK_N):
            dq = _exact_dq_edge(q, do, lse2, delta, dq, k_base, v_base, start + cols, row_ok, lo, hi, hi_tile, sinks,
                                sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        for start in range(first_full, end_full, BLOCK_N):
            dq = _grad_step(q, do, lse2, delta, dq, k_base, v_base, k_base, v_base, start + cols, cols, cols, 0.0,
                            sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE, False, MASKED=False)
        for start in range(tl.maximum(end_full, first_full), hi_tile, BLOCK_N):
            dq = _exact_dq_edge(q, do, lse2, delta, dq, k_base, v_base, start + cols, row_ok, lo, hi, hi_tile, sinks,
                                sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        d = tl.arange(0, BLOCK_D)
        tl.store(DQ + bh * Sq * D + _offset_index(rows, WIDE)[:, None] * D + d[None, :], dq * scale,
                 mask=row_ok[:, None] & (d[None, :] < D))

    @triton.jit
    def _dkdv_edge(Q, DO, LSE, DELTA, LO, HI, k, v, dk, dvacc, kidx, kvalid, start, r_hi, b, h, bh,
                   sqb, sqh, sqs, Sq, sinks, scale_log2, CAUSAL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                   WIDE: tl.constexpr):
        """A tile of rows at the edge of the key tile's rows: (BN, BM) mask of which rows' exact sets hold
        which keys, as the forward counted them."""
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < r_hi
        q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, bh, rows, row_ok, sqb, sqh, sqs, Sq,
                                        D, DV, BLOCK_D, BLOCK_DV, WIDE)
        lo = tl.load(LO + rows, mask=row_ok, other=0)
        hi = tl.load(HI + rows, mask=row_ok, other=0)
        in_range = (kidx[:, None] >= lo[None, :]) & (kidx[:, None] < hi[None, :]) & (kidx[:, None] >= sinks)
        in_sinks = kidx[:, None] < sinks
        if CAUSAL:
            in_sinks = in_sinks & (kidx[:, None] < hi[None, :])  # hi - 1 is the row's last key
        keep = (in_range | in_sinks) & row_ok[None, :] & kvalid[:, None]
        dk, dvacc, _ = _kv_tile_step(k, v, dk, dvacc, q, do, lse2, delta, keep, scale_log2, PRECISION, MASKED=True)
        return dk, dvacc

    @triton.jit(do_not_specialize=["Hq", "Hkv", "group", "Sq", "Sk", "sinks"])
    def _exact_part_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, LO, HI, ROW_LO, ROW_HI, FULL_LO, FULL_HI,
                                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                                Hq, Hkv, group, Sq, Sk, sinks, scale_log2, scale,
                                CAUSAL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
        """dk / dv of the exact part, key-major: a program owns a key tile and walks the rows whose
        exact set can hold it (ROW_LO/ROW_HI, from the monotone exact ranges), so no atomics; it
        writes every key of its tile, so it runs before the rectangles add theirs. Rows in
        [FULL_LO, FULL_HI) hold the whole tile in their range: their row tiles run unmasked."""
        pid_n = tl.program_id(0)
        bkh = tl.program_id(1).to(tl.int64)
        b = bkh // Hkv
        kh = bkh % Hkv
        kidx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = kidx < Sk
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        k_off, k, v, dk, dvacc = _key_tile(K, V, b, kh, kidx, kvalid, skb, skh, sks, svb, svh, svs, D, DV, BLOCK_N,
                                           BLOCK_D, BLOCK_DV, WIDE)
        r_lo = tl.load(ROW_LO + pid_n)
        r_hi = tl.load(ROW_HI + pid_n)
        # row tiles aligned to r_lo: those inside [FULL_LO, FULL_HI) unmasked, the edges masked
        first_full = r_lo + tl.cdiv(tl.maximum(tl.load(FULL_LO + pid_n) - r_lo, 0), BLOCK_M) * BLOCK_M
        end_full = first_full + tl.maximum(tl.load(FULL_HI + pid_n) - first_full, 0) // BLOCK_M * BLOCK_M
        for g in range(0, group):
            h = kh * group + g
            bh = b * Hq + h
            for start in range(r_lo, tl.minimum(first_full, r_hi), BLOCK_M):
                dk, dvacc = _dkdv_edge(Q, DO, LSE, DELTA, LO, HI, k, v, dk, dvacc, kidx, kvalid, start, r_hi, b, h, bh,
                                       sqb, sqh, sqs, Sq, sinks, scale_log2, CAUSAL, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV,
                                       PRECISION, WIDE)
            for start in range(first_full, end_full, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, bh, rows, rows < r_hi, sqb, sqh, sqs, Sq,
                                                D, DV, BLOCK_D, BLOCK_DV, WIDE)
                dk, dvacc, _ = _kv_tile_step(k, v, dk, dvacc, q, do, lse2, delta, 0, scale_log2, PRECISION,
                                             MASKED=False)
            for start in range(tl.maximum(end_full, first_full), r_hi, BLOCK_M):
                dk, dvacc = _dkdv_edge(Q, DO, LSE, DELTA, LO, HI, k, v, dk, dvacc, kidx, kvalid, start, r_hi, b, h, bh,
                                       sqb, sqh, sqs, Sq, sinks, scale_log2, CAUSAL, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV,
                                       PRECISION, WIDE)
        tl.store(DK + bkh * Sk * D + k_off * D + d[None, :], dk * scale, mask=kvalid[:, None] & (d[None, :] < D))
        tl.store(DV_ + bkh * Sk * DV + k_off * DV + dv[None, :], dvacc, mask=kvalid[:, None] & (dv[None, :] < DV))

    @triton.jit(do_not_specialize=["Hq", "Hkv", "group", "Sq", "Sk", "sinks", "block_size", "key_tiles", "q_tiles",
                                   "n_rects", "nbq"])
    def _blocks_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV_, LO, HI, QORD, QSTART, KORD, RECTS,
                           sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                           Hq, Hkv, group, Sq, Sk, sinks, block_size, key_tiles, q_tiles, n_rects, nbq,
                           scale_log2, scale,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                           WIDE: tl.constexpr, LOCAL: tl.constexpr, DQ_ATOMIC: tl.constexpr):
        """One level's blocks, key-major: a program owns a tile of BLOCK_N keys of one block (sorted key
        ranks) and walks the matching query block's rows for every query head of the group. dk / dv stay in
        registers and are added to DK / DV once at the end (a key is in one block per level and one
        program per launch holds it, so no atomics). DQ_ATOMIC: dq contributions go out with atomics;
        otherwise the row-major kernel computes the blocks' dq (recomputing P, without atomics)."""
        pid = tl.program_id(0)
        r = tl.program_id(1)
        bkh = tl.program_id(2).to(tl.int64)
        b = bkh // Hkv
        kh = bkh % Hkv
        ks = tl.load(RECTS + r * 4 + 2)
        kl = tl.load(RECTS + r * 4 + 3)
        nb = (kl + block_size - 1) // block_size
        blk = pid // key_tiles
        pos = ks + (blk * kl) // nb + (pid % key_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = pos < (ks + ((blk + 1) * kl) // nb) * (blk < nb).to(tl.int32)  # none past the last block
        kidx = tl.load(KORD + bkh * Sk + pos, mask=kvalid, other=0)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        k_off, k, v, dk, dvacc = _key_tile(K, V, b, kh, kidx, kvalid, skb, skh, sks, svb, svh, svs, D, DV, BLOCK_N,
                                           BLOCK_D, BLOCK_DV, WIDE)
        for g in range(0, group):
            h = kh * group + g
            bh = b * Hq + h
            for t in range(0, q_tiles):
                rows, row_ok, active = _block_rows(QORD, QSTART, RECTS, bh, r, blk, t, nb, Sq, n_rects, nbq, BLOCK_M,
                                                   LOCAL)
                q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, bh, rows, row_ok, sqb, sqh, sqs, Sq,
                                                D, DV, BLOCK_D, BLOCK_DV, WIDE)
                lo = tl.load(LO + rows, mask=row_ok, other=0)
                hi = tl.load(HI + rows, mask=row_ok, other=0)
                # (BN, BM): the block's keys, less each row's exact keys (counted by the exact part)
                exact = (kidx[:, None] < sinks) | ((kidx[:, None] >= lo[None, :]) & (kidx[:, None] < hi[None, :]))
                keep = kvalid[:, None] & row_ok[None, :] & ~exact
                dk, dvacc, ds = _kv_tile_step(k, v, dk, dvacc, q, do, lse2, delta, keep, scale_log2, PRECISION,
                                              MASKED=True)
                if DQ_ATOMIC:
                    dq_part = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=PRECISION) * scale
                    tl.atomic_add(DQ + bh * Sq * D + _offset_index(rows, WIDE)[:, None] * D + d[None, :], dq_part,
                                  mask=row_ok[:, None] & (d[None, :] < D), sem="relaxed")
        dk_ptr = DK + bkh * Sk * D + k_off * D + d[None, :]
        dv_ptr = DV_ + bkh * Sk * DV + k_off * DV + dv[None, :]
        dk_mask = kvalid[:, None] & (d[None, :] < D)
        dv_mask = kvalid[:, None] & (dv[None, :] < DV)
        tl.store(dk_ptr, tl.load(dk_ptr, mask=dk_mask, other=0.0) + dk * scale, mask=dk_mask)
        tl.store(dv_ptr, tl.load(dv_ptr, mask=dv_mask, other=0.0) + dvacc, mask=dv_mask)

    @triton.jit(do_not_specialize=["Hq", "Hkv", "group", "Sq", "Sk", "sinks", "n_samples", "block_size",
                                   "tiles_per_block", "n_rects", "nbq"])
    def _rectangles_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV_, LO, HI, QORD, QSTART, KORD, SAMP, SBLK, SLW,
                               RECTS, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                               Hq, Hkv, group, Sq, Sk, sinks, n_samples, block_size, tiles_per_block, n_rects, nbq,
                               scale_log2, scale,
                               D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                               WIDE: tl.constexpr, LOCAL: tl.constexpr, BLOCK_DQ: tl.constexpr):
        """One level's samples, row-major (a tile of one block's sorted query rows): dq added to DQ's rows
        (one program per row, no race), dk / dv with atomics. BLOCK_DQ: the block's keys' share of dq too
        (their dk / dv come from the key-major blocks' kernel)."""
        pid = tl.program_id(0)
        r = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        b = bh // Hq
        h = bh % Hq
        kh = h // group
        kl = tl.load(RECTS + r * 4 + 3)
        nb = (kl + block_size - 1) // block_size
        blk = pid // tiles_per_block
        rows, row_ok, active = _block_rows(QORD, QSTART, RECTS, bh, r, blk, pid % tiles_per_block, nb, Sq, n_rects,
                                           nbq, BLOCK_M, LOCAL)
        q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, bh, rows, row_ok, sqb, sqh, sqs, Sq,
                                        D, DV, BLOCK_D, BLOCK_DV, WIDE)
        lo = tl.load(LO + rows, mask=row_ok, other=0)
        hi = tl.load(HI + rows, mask=row_ok, other=0)
        k_base = K + b * skb + kh * skh
        v_base = V + b * svb + kh * svh
        dk_base = DK + (b * Hkv + kh) * Sk * D
        dv_base = DV_ + (b * Hkv + kh) * Sk * DV
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        if BLOCK_DQ:
            ks = tl.load(RECTS + r * 4 + 2)
            k_lo = ks + (blk * kl) // nb
            k_hi = k_lo + (ks + ((blk + 1) * kl) // nb - k_lo) * active
            kord = KORD + (b * Hkv + kh) * Sk
            for start in range(k_lo, k_hi, BLOCK_N):
                pos = start + cols
                kvalid = pos < k_hi
                kidx = tl.load(kord + pos, mask=kvalid, other=0)
                keep = row_ok[:, None] & kvalid[None, :] & ~_excluded(kidx, lo, hi, sinks)
                dq = _grad_step(q, do, lse2, delta, dq, k_base, v_base, dk_base, dv_base, kidx, kvalid, keep, 0.0,
                                sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE, False)
        n_s = n_samples * active
        samp = ((b * Hkv + kh) * n_rects + r) * n_samples
        for start in range(0, n_s, BLOCK_N):
            si = start + cols
            svalid = si < n_s
            kidx = tl.load(SAMP + samp + si, mask=svalid, other=0)
            sblk = tl.load(SBLK + samp + si, mask=svalid, other=-1)
            weight_log2 = tl.load(SLW + samp + si, mask=svalid, other=0.0)[None, :] * 1.4426950408889634
            keep = row_ok[:, None] & (svalid & (sblk != blk))[None, :] & ~_excluded(kidx, lo, hi, sinks)
            dq = _grad_step(q, do, lse2, delta, dq, k_base, v_base, dk_base, dv_base, kidx, svalid, keep,
                            weight_log2, sks, svs, scale_log2, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION, WIDE)
        # rows of one launch belong to one program each: read-add-write of dq is race free
        d = tl.arange(0, BLOCK_D)
        dq_ptr = DQ + bh * Sq * D + _offset_index(rows, WIDE)[:, None] * D + d[None, :]
        dq_mask = row_ok[:, None] & (d[None, :] < D)
        tl.store(dq_ptr, tl.load(dq_ptr, mask=dq_mask, other=0.0) + dq * scale, mask=dq_mask)


# the blocks' dq: "rows" recomputes P row-major in the samples' kernel (no atomics), "atomic" adds it from the
# key-major kernel (one pass, float32 atomics); kept switchable for the benchmark's comparison
BLOCK_DQ = os.environ.get("LONGATTN_HYPER_BLOCK_DQ", "rows")
if BLOCK_DQ not in ("rows", "atomic"):
    raise ValueError(f"LONGATTN_HYPER_BLOCK_DQ must be 'rows' or 'atomic', got {BLOCK_DQ!r}")


def hyper_backward_triton(q, k, v, out, lse, grad_out, grad_lse, pattern: HyperPattern, *, scale, causal):
    """Gradients (dq, dk, dv) of the forward's (out, lse) for `pattern`; grad_lse may be None.
    q/k/v as in the forward; out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) float32 are the forward's results."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    # Delta_i = dO_i . O_i is sum_j P_ij dP_ij; an lse gradient g_i enters dS as +P_ij g_i, i.e. as -g_i here
    delta = (do.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    dq = torch.empty(B, Hq, Sq, D, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, Hkv, Sk, D, dtype=torch.float32, device=q.device)  # every key written by the exact part
    dv = torch.empty(B, Hkv, Sk, Dv, dtype=torch.float32, device=q.device)
    # index tensors stay int64 as the pattern made them: converting would cost a launch each
    lo, hi = pattern.exact_lo.contiguous(), pattern.exact_hi.contiguous()
    dims = dict(D=D, DV=Dv, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
                PRECISION="ieee" if q.dtype == torch.float32 else None, WIDE=needs_wide_offsets(q, k, v, dq, dk, dv))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    scale_log2 = float(scale) * 1.4426950408889634

    def launch(kernel, grid, table, *args, **flags):
        block_m, block_n, warps, stages = _tiles(D, Dv, table)
        kernel[grid(block_m, block_n)](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                                       **flags, **dims)

    launch(_exact_part_bwd_kernel, lambda bm, bn: (triton.cdiv(Sq, bm), B * Hq), TILES_BWD_DQ,
           q, k, v, do, lse, delta, dq, lo, hi, *strides, Hq, Hkv, group, Sq, Sk, pattern.sinks,
           scale_log2, float(scale), CAUSAL=bool(causal))
    block_n = _tiles(D, Dv, TILES_BWD_DKDV)[1]
    launch(_exact_part_dkdv_kernel, lambda bm, bn: (triton.cdiv(Sk, bn), B * Hkv), TILES_BWD_DKDV,
           q, k, v, do, lse, delta, dk, dv, lo, hi, *exact_rows_by_key_tile(pattern, Sq, Sk, block_n, causal),
           *strides, Hq, Hkv, group, Sq, Sk, pattern.sinks, scale_log2, float(scale), CAUSAL=bool(causal))
    for level in pattern.levels:
        # the blocks key-major (dk / dv without atomics), then the samples row-major
        block_m, block_n = _tiles(D, Dv, TILES_BWD_BLOCKS)[:2]
        grid, q_tiles, nbq = level_grid(level, pattern.block_size, block_m, B * Hq)
        key_tiles = triton.cdiv(pattern.block_size, block_n)
        q_order, q_start, k_order, *_, rects = level_indices(level)
        launch(_blocks_bwd_kernel, lambda bm, bn: (grid[0] // q_tiles * key_tiles, grid[1], B * Hkv), TILES_BWD_BLOCKS,
               q, k, v, do, lse, delta, dq, dk, dv, lo, hi, q_order, q_start, k_order, rects, *strides, Hq, Hkv, group,
               Sq, Sk, pattern.sinks, pattern.block_size, key_tiles, q_tiles, len(level.rect_list), nbq, scale_log2,
               float(scale), LOCAL=level.q_start is not None, DQ_ATOMIC=BLOCK_DQ == "atomic")
        block_m = _tiles(D, Dv, TILES_BWD)[0]
        grid, tiles_per_block, nbq = level_grid(level, pattern.block_size, block_m, B * Hq)
        m = level.samples.shape[-1]
        launch(_rectangles_bwd_kernel, lambda bm, bn: grid, TILES_BWD,
               q, k, v, do, lse, delta, dq, dk, dv, lo, hi, *level_indices(level), *strides, Hq, Hkv, group, Sq, Sk,
               pattern.sinks, m, pattern.block_size, tiles_per_block, len(level.rect_list), nbq, scale_log2,
               float(scale), LOCAL=level.q_start is not None, BLOCK_DQ=BLOCK_DQ == "rows")
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def exact_rows_by_key_tile(pattern: HyperPattern, Sq, Sk, block_n, causal):
    """For each key tile [start, start + block_n): (row_lo, row_hi, full_lo, full_hi), int64 (tiles,).
    Rows [row_lo, row_hi) are those whose exact set can hold a key of the tile, rows [full_lo, full_hi)
    those whose range holds all of it. exact_lo and exact_hi never decrease along the rows (also along
    a local pattern's increasing rows), so both are contiguous runs."""
    lo, hi = pattern.exact_lo.contiguous(), pattern.exact_hi.contiguous()
    starts = torch.arange(0, Sk, block_n, device=lo.device)
    row_lo = torch.searchsorted(hi, starts, right=True)
    row_hi = torch.searchsorted(lo, starts + block_n, right=False)
    # whole tiles inside [lo, hi), past the sinks and before Sk: from the first row with hi >= end to the
    # last with lo <= start
    full_lo = torch.searchsorted(hi, starts + block_n, right=False)
    full_hi = torch.searchsorted(lo, starts, right=True)
    plain = (starts >= pattern.sinks) & (starts + block_n <= Sk)
    full_hi = torch.where(plain, full_hi, full_lo)
    if pattern.sinks > 0:
        # tiles holding sinks take every row that sees them: causally the rows with hi > start, row_lo already
        with_sinks = starts < pattern.sinks
        if not causal:
            row_lo = torch.where(with_sinks, 0, row_lo)
        row_hi = torch.where(with_sinks, torch.full_like(row_hi, Sq), row_hi)
    return row_lo, row_hi, full_lo, full_hi
