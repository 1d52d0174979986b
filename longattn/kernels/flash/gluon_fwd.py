"""Forward flash attention for Hopper written in Gluon (Triton's explicit-layout language), where the
compiler-scheduled Triton loops stayed below cuDNN (`benchmarks/probe_flash_gluon.py`).

One program owns BLOCK_M query rows of one head (8 warps: two warp groups of 64 rows, wgmma tiles):
- K and V stream through a STAGES-deep shared-memory ring by TMA, one mbarrier a stage, refilled as soon
  as a tile has been consumed, so the copy engine runs STAGES-1 tiles ahead;
- per tile: S = Q·Kᵀ (wgmma), the online softmax in registers (base 2), O += P·V with P straight from
  registers (no shared-memory round trip); under causal only the tiles that cross the diagonal are masked;
- O goes out through Q's shared-memory buffer and a TMA store, the log-sum-exp through pointers.
A warp-specialised variant (config "WS") has FA3's roles: a one-warp producer feeds the ring, two consumer
warp groups own half the rows each; with "PINGPONG" the consumers take turns at the tensor cores, one's
softmax running under the other's matmuls. `GLUON_CONFIGS` holds what was measured fastest per shape.

Q, K and V are read in place, contiguous (B, H, S, D) or (B, S, H, D), through 2-d descriptors; GQA maps
each query head to its KV head. What this path does not take (masks, fp32, lengths that are not a whole
number of tiles, other head dims, other GPUs, a Triton without Gluon) runs on `triton_fwd`. Gluon does
not run in the Triton interpreter: the tests check this kernel on the GPU only.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .triton_fwd import LOG2E, _compute_capability, interpreting, triton

gluon = None
if triton is not None and not interpreting():
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                       warpgroup_mma, warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernels run
        gluon = None
    else:  # the TMA copies' names: Triton 3.9 renamed them (the old ones raise)
        _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
        _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

if gluon is not None:

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, row, col, tile, n_tiles, STAGES: gl.constexpr):
        """Start the copy of K/V tile `tile` (if there is one) into its ring stage."""
        stage = tile % STAGES
        BN: gl.constexpr = k_desc.block_type.shape[0]
        live = tile < n_tiles
        mbarrier.expect(bars.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=live)
        _tma_load(k_desc, [row + tile * BN, col], bars.index(stage), k_smem.index(stage), pred=live)
        _tma_load(v_desc, [row + tile * BN, col], bars.index(stage), v_smem.index(stage), pred=live)

    @gluon.jit
    def _online_softmax(j, s, m, l, last_key, qk_scale, s_layout: gl.constexpr, MASKED: gl.constexpr):
        """One online-softmax step (base 2) on the scores of K/V tile j: (p, new max, new sum, the old rows'
        factor); MASKED hides the keys past each row's last_key."""
        BN: gl.constexpr = s.type.shape[1]
        if MASKED:
            cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols, 0) <= gl.expand_dims(last_key, 1), s, float("-inf"))
        m_new = gl.maximum(m, gl.max(s, axis=1) * qk_scale)
        m_use = m_new
        if MASKED:  # a row that sees no key keeps m = -inf; exp2 must not see -inf - -inf
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m - m_use)
        return p, m_new, l * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _attend_tile(j, q_smem, k_tile, v_tile, acc, m, l, last_key, qk_scale, s_layout: gl.constexpr,
                     p_layout: gl.constexpr, o_rows: gl.constexpr, MASKED: gl.constexpr):
        """K/V tile j (already in shared memory) into the running (acc, m, l)."""
        BM: gl.constexpr = q_smem.type.shape[0]
        BN: gl.constexpr = k_tile.type.shape[0]
        s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, m, l, alpha = _online_softmax(j, s, m, l, last_key, qk_scale, s_layout, MASKED)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        acc = warpgroup_mma(p, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        return acc, m, l

    @gluon.jit
    def _tile_range(first_row, causal_offset, Sk, BM: gl.constexpr, BN: gl.constexpr, CAUSAL: gl.constexpr):
        """(n_full, n_tiles) for the rows first_row..first_row+BM-1: K/V tiles [0, n_full) need no mask,
        [n_full, n_tiles) cross the diagonal; tiles from n_tiles on are not visible."""
        if CAUSAL:
            n_tiles = gl.minimum(gl.maximum(gl.cdiv(first_row + BM + causal_offset, BN), 0), Sk // BN)
            n_full = gl.minimum(gl.maximum((first_row + causal_offset + 1) // BN, 0), n_tiles)
        else:
            n_tiles = Sk // BN
            n_full = n_tiles
        return n_full, n_tiles

    @gluon.jit
    def _finish(acc, m, l, q_smem, o_desc, o_row, Lse, lse_row, s_rows: gl.constexpr, o_rows: gl.constexpr):
        """Normalise, store the log-sum-exp through pointers and O through q_smem (Q is no longer read) by TMA."""
        BM: gl.constexpr = q_smem.type.shape[0]
        seen = l > 0.0
        l_safe = gl.where(seen, l, 1.0)
        lse = gl.where(seen, (m + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(Lse + lse_row + gl.arange(0, BM, layout=s_rows), lse)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, o_rows), 1)
        q_smem.store(out.to(q_smem.dtype))
        fence_async_shared()
        _tma_store(o_desc, [o_row, 0], q_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _ring_step(j, q_smem, k_smem, v_smem, bars, k_desc, v_desc, kv_row, kv_col, n_tiles, acc, m, l, last_key,
                   qk_scale, s_layout: gl.constexpr, p_layout: gl.constexpr, o_rows: gl.constexpr,
                   MASKED: gl.constexpr, STAGES: gl.constexpr):
        """Wait for tile j in the ring, attend to it, then refill its stage with tile j + STAGES."""
        stage = j % STAGES
        mbarrier.wait(bars.index(stage), (j // STAGES) & 1)
        acc, m, l = _attend_tile(j, q_smem, k_smem.index(stage), v_smem.index(stage), acc, m, l, last_key, qk_scale,
                                 s_layout, p_layout, o_rows, MASKED)
        _load_kv(k_desc, v_desc, k_smem, v_smem, bars, kv_row, kv_col, j + STAGES, n_tiles, STAGES)
        return acc, m, l

    @gluon.jit
    def _ws_step(j, q_smem, k_smem, v_smem, ready, empty, acc, m, l, last_key, qk_scale, s_layout: gl.constexpr,
                 p_layout: gl.constexpr, o_rows: gl.constexpr, MASKED: gl.constexpr, STAGES: gl.constexpr):
        """Wait for the producer's tile j, attend to it, release its stage."""
        stage = j % STAGES
        mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
        acc, m, l = _attend_tile(j, q_smem, k_smem.index(stage), v_smem.index(stage), acc, m, l, last_key, qk_scale,
                                 s_layout, p_layout, o_rows, MASKED)
        mbarrier.arrive(empty.index(stage), count=1)
        return acc, m, l

    @gluon.jit
    def _flash_fwd_gluon_kernel(q_desc, k_desc, v_desc, o_desc, Lse, Hq, Hkv, Sq, Sk, qk_scale, causal_offset,
                                q_rb, q_rh, q_ch, kv_rb, kv_rh, kv_ch,
                                CAUSAL: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        BM: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

        pid_m = gl.program_id(0)
        if CAUSAL:
            pid_m = gl.num_programs(0) - 1 - pid_m  # longest rows first: a shorter tail
        pid_bh = gl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // (Hq // Hkv)
        m0 = pid_m * BM
        k_row = b * kv_rb + hk * kv_rh  # K and V share a layout (checked on the host)
        kv_col = hk * kv_ch
        n_full, n_tiles = _tile_range(m0, causal_offset, Sk, BM, BN, CAUSAL)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [b * q_rb + h * q_rh + m0, h * q_ch], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _load_kv(k_desc, v_desc, k_smem, v_smem, bars, k_row, kv_col, i, n_tiles, STAGES)
        mbarrier.wait(q_bar, 0)

        last_key = m0 + causal_offset + gl.arange(0, BM, layout=s_rows)  # each row's last visible key
        m = gl.full([BM], float("-inf"), gl.float32, s_rows)
        l = gl.zeros([BM], gl.float32, s_rows)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        for j in range(0, n_full):
            acc, m, l = _ring_step(j, q_smem, k_smem, v_smem, bars, k_desc, v_desc, k_row, kv_col, n_tiles, acc, m, l,
                                   last_key, qk_scale, s_layout, p_layout, o_rows, False, STAGES)
        if CAUSAL:
            for j in range(n_full, n_tiles):
                acc, m, l = _ring_step(j, q_smem, k_smem, v_smem, bars, k_desc, v_desc, k_row, kv_col, n_tiles, acc,
                                       m, l, last_key, qk_scale, s_layout, p_layout, o_rows, True, STAGES)
        _finish(acc, m, l, q_smem, o_desc, pid_bh * Sq + m0, Lse, pid_bh.to(gl.int64) * Sq + m0, s_rows, o_rows)
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

    # Warp-specialised variant (FA3's layout): a one-warp producer streams K/V by TMA into the ring, two
    # consumer warp groups own BLOCK_M/2 query rows each and run S = Q·Kᵀ, the softmax and P·V; a stage is
    # refilled once both consumers have released it (an "empty" barrier with two arrivals).

    @gluon.jit
    def _ws_loader(args):
        (q_desc, k_desc, v_desc, o_desc, Lse, q_smem, k_smem, v_smem, q_bar, ready, empty, turns, q_row, q_col,
         k_row, kv_col, o_row, lse_row, m0, causal_offset, Sk, qk_scale, CAUSAL, STAGES, PINGPONG) = args
        HALF_M: gl.constexpr = q_desc.block_type.shape[0]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        _, n_tiles = _tile_range(m0, causal_offset, Sk, 2 * HALF_M, BN, CAUSAL)
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
        _tma_load(q_desc, [q_row + HALF_M, q_col], q_bar, q_smem.index(1))
        for j in range(n_tiles):
            stage = j % STAGES
            mbarrier.wait(empty.index(stage), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
            mbarrier.expect(ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [k_row + j * BN, kv_col], ready.index(stage), k_smem.index(stage))
            _tma_load(v_desc, [k_row + j * BN, kv_col], ready.index(stage), v_smem.index(stage))

    # Ping-pong (FA3's two schedules): each consumer issues its matmuls as one block, S_j = Q·K_jᵀ then
    # O += P_{j-1}·V_{j-1}, and the two consumers take turns (two mbarriers), so one's softmax runs while the
    # other's matmuls occupy the tensor cores; within a consumer the softmax of S_j overlaps P_{j-1}·V_{j-1}.
    # Every consumer runs n_tiles + 1 matmul blocks, so the turns stay paired; n_tiles >= 1 (checked on the host).

    @gluon.jit
    def _take_turn(turns, HALF: gl.constexpr, t):
        mbarrier.wait(turns.index(HALF), (t & 1) ^ (1 - HALF))  # consumer 0 goes first: a fresh barrier passes 1

    @gluon.jit
    def _pp_step(j, q_smem, k_smem, v_smem, ready, empty, turns, p, acc, m, l, last_key, qk_scale,
                 s_layout: gl.constexpr, p_layout: gl.constexpr, o_rows: gl.constexpr, HALF: gl.constexpr,
                 MASKED: gl.constexpr, STAGES: gl.constexpr):
        BM: gl.constexpr = q_smem.type.shape[0]
        BN: gl.constexpr = k_smem.type.shape[1]
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
        _take_turn(turns, HALF, j)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        mbarrier.arrive(turns.index(1 - HALF), count=1)
        s = warpgroup_mma_wait(1, deps=(s,))  # the scores; P·V may still run
        p_new, m, l, alpha = _online_softmax(j, s, m, l, last_key, qk_scale, s_layout, MASKED)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        return gl.convert_layout(p_new.to(q_smem.dtype), p_layout), acc, m, l

    @gluon.jit
    def _pingpong_tiles(HALF: gl.constexpr, q_smem, k_smem, v_smem, ready, empty, turns, n_full, n_tiles, acc, m,
                        l, last_key, qk_scale, s_layout: gl.constexpr, p_layout: gl.constexpr,
                        o_rows: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
        BM: gl.constexpr = q_smem.type.shape[0]
        BN: gl.constexpr = k_smem.type.shape[1]
        mbarrier.wait(ready.index(0), 0)
        _take_turn(turns, HALF, 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        mbarrier.arrive(turns.index(1 - HALF), count=1)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, m, l, alpha = _online_softmax(0, s, m, l, last_key, qk_scale, s_layout, CAUSAL)
        p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        first_masked = gl.maximum(n_full, 1)
        for j in range(1, first_masked):
            p, acc, m, l = _pp_step(j, q_smem, k_smem, v_smem, ready, empty, turns, p, acc, m, l, last_key, qk_scale,
                                    s_layout, p_layout, o_rows, HALF, False, STAGES)
        if CAUSAL:
            for j in range(first_masked, n_tiles):
                p, acc, m, l = _pp_step(j, q_smem, k_smem, v_smem, ready, empty, turns, p, acc, m, l, last_key,
                                        qk_scale, s_layout, p_layout, o_rows, HALF, True, STAGES)
        last = (n_tiles - 1) % STAGES
        _take_turn(turns, HALF, n_tiles)
        acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        mbarrier.arrive(turns.index(1 - HALF), count=1)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(last), count=1)
        return acc, m, l

    @gluon.jit
    def _ws_consume(args, HALF: gl.constexpr):
        (q_desc, k_desc, v_desc, o_desc, Lse, q_smem, k_smem, v_smem, q_bar, ready, empty, turns, q_row, q_col,
         k_row, kv_col, o_row, lse_row, m0, causal_offset, Sk, qk_scale, CAUSAL, STAGES, PINGPONG) = args
        HALF_M: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        first = m0 + HALF * HALF_M
        n_full, _ = _tile_range(first, causal_offset, Sk, HALF_M, BN, CAUSAL)
        _, n_tiles = _tile_range(m0, causal_offset, Sk, 2 * HALF_M, BN, CAUSAL)  # what the loader streams
        n_full = gl.minimum(n_full, n_tiles)
        my_q = q_smem.index(HALF)
        last_key = first + causal_offset + gl.arange(0, HALF_M, layout=s_rows)
        m = gl.full([HALF_M], float("-inf"), gl.float32, s_rows)
        l = gl.zeros([HALF_M], gl.float32, s_rows)
        acc = gl.zeros([HALF_M, D], gl.float32, o_layout)
        mbarrier.wait(q_bar, 0)
        if PINGPONG:
            acc, m, l = _pingpong_tiles(HALF, my_q, k_smem, v_smem, ready, empty, turns, n_full, n_tiles, acc, m, l,
                                        last_key, qk_scale, s_layout, p_layout, o_rows, CAUSAL, STAGES)
        else:
            for j in range(0, n_full):
                acc, m, l = _ws_step(j, my_q, k_smem, v_smem, ready, empty, acc, m, l, last_key, qk_scale, s_layout,
                                     p_layout, o_rows, False, STAGES)
            if CAUSAL:
                for j in range(n_full, n_tiles):
                    acc, m, l = _ws_step(j, my_q, k_smem, v_smem, ready, empty, acc, m, l, last_key, qk_scale,
                                         s_layout, p_layout, o_rows, True, STAGES)
        _finish(acc, m, l, my_q, o_desc, o_row + HALF * HALF_M, Lse, lse_row + HALF * HALF_M, s_rows, o_rows)

    @gluon.jit
    def _ws_consume_upper(args):
        _ws_consume(args, 1)

    @gluon.jit
    def _ws_consume_lower(args):
        _ws_consume(args, 0)

    @gluon.jit
    def _flash_fwd_gluon_ws_kernel(q_desc, k_desc, v_desc, o_desc, Lse, Hq, Hkv, Sq, Sk, qk_scale, causal_offset,
                                   q_rb, q_rh, q_ch, kv_rb, kv_rh, kv_ch, CAUSAL: gl.constexpr,
                                   STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr,
                                   num_warps: gl.constexpr):
        HALF_M: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        pid_m = gl.program_id(0)
        if CAUSAL:
            pid_m = gl.num_programs(0) - 1 - pid_m
        pid_bh = gl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // (Hq // Hkv)
        m0 = pid_m * 2 * HALF_M
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF_M, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        args = (q_desc, k_desc, v_desc, o_desc, Lse, q_smem, k_smem, v_smem, q_bar, ready, empty, turns,
                b * q_rb + h * q_rh + m0, h * q_ch, b * kv_rb + hk * kv_rh, hk * kv_ch, pid_bh * Sq + m0,
                pid_bh.to(gl.int64) * Sq + m0, m0, causal_offset, Sk, qk_scale, CAUSAL, STAGES, PINGPONG)
        gl.warp_specialize([(_ws_consume_lower, (args,)), (_ws_consume_upper, (args,)), (_ws_loader, (args,))],
                           [4, 1], [CONSUMER_REGS, 24])

# Measured on an H100 (benchmarks/results/2026-12-05-h100-flash-gluon.md): (head dim, causal) -> launch.
_PINGPONG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "STAGES": 3, "WS": True, "PINGPONG": True,
             "CONSUMER_REGS": 240, "maxnreg": 168}
GLUON_CONFIGS = {
    (64, False): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "STAGES": 3},
    (64, True): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "STAGES": 2},
    (128, False): _PINGPONG,
    (128, True): _PINGPONG,
}
# register spill the compile gate (tests/kernels/compile_gate.py) allows at GLUON_CONFIGS
SPILL_LIMITS = {"_flash_fwd_gluon_kernel": 0, "_flash_fwd_gluon_ws_kernel": 0}


@functools.lru_cache(maxsize=None)
def _hopper(device_index: int) -> bool:
    return _compute_capability(device_index) == 9


def _as_matrix(t: torch.Tensor):
    """t (B, H, S, D) as the 2-d matrix a descriptor reads, with where head (b, h)'s rows start:
    (matrix, rows per batch, rows per head, columns per head), or None for other layouts."""
    B, H, S, D = t.shape
    if t.is_contiguous():
        return t.view(B * H * S, D), H * S, S, 0
    if t.transpose(1, 2).is_contiguous():
        return t.transpose(1, 2).view(B * S, H * D), S, 0, D
    return None


# A Gluon launch costs ~0.2 ms more host time than the Triton kernels' (H200, per-call timing in
# benchmarks/results/2026-12-05-h200-flash.md: slower than the Triton path at 4K, faster from 8K), so only
# attention large enough to repay it takes this kernel. (Inside a CUDA graph the host cost would be paid once,
# but a first build during a capture is not something to risk for a few per cent at short lengths.)
MIN_WORK = 2 ** 35  # B·Hq·Sq·Sk·D, halved under causal: more than 4K x 4K at h32 d64; 8K causal on


def worth_the_launch(q, k, causal: bool) -> bool:
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] // (2 if causal else 1) > MIN_WORK


def gluon_applies(q, k, v, attn_mask, causal: bool) -> bool:
    """The Gluon kernel computes this call: a measured (head dim, causal), fp16/bf16, no mask, lengths a
    whole number of tiles, Q/K/V laid out (B, H, S, D) or (B, S, H, D) contiguously, K and V alike, on a
    Hopper GPU with a Triton that has Gluon, and work enough to repay the launch (`worth_the_launch`)."""
    if gluon is None or attn_mask is not None or os.environ.get("LONGATTN_FLASH_GLUON", "1") == "0":
        return False
    if not worth_the_launch(q, k, causal):
        return False
    cfg = GLUON_CONFIGS.get((q.shape[-1], bool(causal)))
    if cfg is None or q.dtype not in (torch.float16, torch.bfloat16) or not q.is_cuda:
        return False
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1] or not _hopper(q.device.index or 0):
        return False
    if q.shape[2] % cfg["BLOCK_M"] or k.shape[2] % cfg["BLOCK_N"] or q.numel() == 0 or k.numel() == 0:
        return False
    if cfg.get("PINGPONG") and causal and q.shape[2] > k.shape[2]:  # ping-pong needs a visible tile per block
        return False
    layouts = [_as_matrix(t) for t in (q, k, v)]
    if any(m is None for m in layouts) or layouts[1][1:] != layouts[2][1:]:
        return False
    return all(m[0].data_ptr() % 16 == 0 for m in layouts)


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, cols: int, dtype):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)  # ~8 µs a call: cached


def launch_plan(config: dict):
    """(kernel, BLOCK_M, BLOCK_N, rows of Q's descriptor tile, the kernel's other keyword arguments) for a
    config of GLUON_CONFIGS. The warp-specialised kernel ("WS") reads Q in two halves, one per consumer group."""
    cfg = dict(config)
    bm, bn, ws = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("WS", False)
    if not ws:
        return _flash_fwd_gluon_kernel, bm, bn, bm, cfg
    cfg.setdefault("PINGPONG", False)
    cfg.setdefault("CONSUMER_REGS", 240)
    return _flash_fwd_gluon_ws_kernel, bm, bn, bm // 2, cfg


_built: set = set()   # (head dim, causal, dtype, config) that compiled and ran
_broken: set = set()  # ... that this Triton could not compile: the Triton kernels run instead, never retried


def flash_forward_gluon(q, k, v, scale: float, causal: bool, config: dict | None = None):
    """(out, lse) as `triton_fwd.flash_forward` returns them, or None when this Triton cannot build the
    kernel (Gluon is experimental: its API moves between releases); call only where `gluon_applies`."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cfg = dict(config or GLUON_CONFIGS[(D, bool(causal))])
    key = (D, bool(causal), q.dtype, tuple(sorted(cfg.items())))
    if key in _broken:
        return None
    kernel, bm, bn, q_rows, cfg = launch_plan(cfg)
    dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[q.dtype]
    (qm, *q_at), (km, *k_at), (vm, _, _, _) = (_as_matrix(t) for t in (q, k, v))
    out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    q_layout, kv_layout = _smem_layout(q_rows, D, dtype), _smem_layout(bn, D, dtype)
    q_desc = TensorDescriptor.from_tensor(qm, [q_rows, D], q_layout)
    o_desc = TensorDescriptor.from_tensor(out.view(B * Hq * Sq, D), [q_rows, D], q_layout)
    k_desc = TensorDescriptor.from_tensor(km, [bn, D], kv_layout)
    v_desc = TensorDescriptor.from_tensor(vm, [bn, D], kv_layout)
    grid = (Sq // bm, B * Hq)
    try:
        kernel[grid](q_desc, k_desc, v_desc, o_desc, lse, Hq, Hkv, Sq, Sk, scale * LOG2E, Sk - Sq, *q_at, *k_at,
                     CAUSAL=bool(causal), **cfg)
    except Exception as e:  # noqa: BLE001 - the first build of a config failing is a compile error: fall back
        if key in _built:
            raise
        _broken.add(key)
        warnings.warn(f"longattn: the Gluon flash forward does not build with Triton {triton.__version__} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      "the Triton kernels run instead", RuntimeWarning, stacklevel=2)
        return None
    _built.add(key)
    return out, lse
