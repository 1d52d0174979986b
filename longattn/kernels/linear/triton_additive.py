"""Triton kernels for additive (non-delta) linear attention, reading q/k/v where they lie.

Unlike `triton_chunk.py` (features, ones column and padding prepared in PyTorch), these kernels
- apply the elementwise maps (elu + 1, relu, identity) on the tiles they load, so q/k are read once, raw;
  other maps (favor, taylor2, hedgehog) hand in their float32 features, which the kernels read the same way;
- keep the normaliser as its own state z = Σφ(k) (F floats per chunk) instead of a column of ones in v;
- shift key chunks by index arithmetic (a masked load) rather than padding k and v;
- for pure linear attention divide by φ(q)·z + eps themselves and write the output in q's dtype.

Kernels: `_states_kernel` walks the key chunks of one (F block, V block, key head) in order and stores the
state before each chunk, H[t] (F × Dv) and z[t] (F); `_output_kernel` runs one (V block, query chunk,
query head): φ(Q_c) H[t] + (φ(Q_c) φ(K_t)ᵀ ⊙ tril) V_t, t = c + shift. The forward cuts long walks into
segments that run side by side (`walk_segments`); the output kernel adds each segment's offset, the sum
of the segments before it. States are float32, except in
bfloat16 runs, where H is stored in bfloat16: it is cast to bfloat16 for the tensor-core product anyway.
Products run in bfloat16 for bfloat16 inputs and in float32 (tf32 on GPUs) otherwise: float16 cannot
hold a state summed over a long context.

Backward: `triton_additive_bwd.py`; `far_additive_torch` is the same function in PyTorch, for the tests.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .reference import far_chunked

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FUSED_MAPS = {"identity": 0, "elu": 1, "relu": 2}  # maps applied inside the kernels; others arrive as features
# the autotuner's candidates on a GPU, (BK, BV, num_warps, num_stages): see where they are tuned below
STATES_TILES = ((64, 32, 8, 5), (64, 32, 4, 5), (64, 64, 8, 5), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 3))
OUTPUT_TILES = ((64, 64, 4, 1), (32, 64, 4, 3), (64, 64, 8, 2), (32, 64, 8, 3))
OFFSETS_BLOCK = 1024  # elements of the segment offsets a program sums
SPILL_LIMITS = {"*": 0}  # register spill the compile gate allows in bf16 builds (tests/kernels/compile_gate.py)
MIN_SEGMENT_CHUNKS = 32  # a states walk is cut into segments of at least this many chunks
WALKS_PER_SM = 4  # ... and into enough of them for about this many walk programs per SM


if triton is not None:

    @triton.jit
    def _phi(x, FMAP: tl.constexpr):
        if FMAP == 1:  # elu(x) + 1
            return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
        elif FMAP == 2:
            return tl.maximum(x, 0.0)
        else:
            return x

    @triton.jit
    def _load_phi(ptrs, mask, FMAP: tl.constexpr, DOT_ONLY: tl.constexpr):
        """φ of a masked tile as float32, zero where masked (φ(0) = 1 for elu). DOT_ONLY: the tile only feeds
        tensor-core products, so the identity map returns the load itself, in its own dtype, which the compiler
        pipelines into shared memory (0.27 -> 0.17 ms for the states walk at 32K, H200). Not for tiles that other
        arithmetic also reads: triton 3.6 computed wrong outputs from such a tile at num_stages >= 2 (sm_90;
        results/2026-12-01-h200-linear-tiles.md, the delta output's QL2=2 rows)."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        if (FMAP != 0) | (not DOT_ONLY):
            x = tl.where(mask, _phi(x.to(tl.float32), FMAP), 0.0)
        return x

    @triton.jit
    def _segment_row(bkv, tt, N, SEG):
        """The row of S0 / Z0 that state H[tt] of key head bkv adds: its walk segment's (H[N] is in the last one)."""
        return bkv.to(tl.int64) * ((N + SEG - 1) // SEG) + (tt - (tt == N).to(tl.int32)) // SEG

    @triton.jit
    def _states_kernel(K, V, H, Z, T, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, Hkv, L, P, N, F, Dv, SEG, NSEG, TROW,
                       FMAP: tl.constexpr, HAS_DEN: tl.constexpr, BF16: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """One (F block, V block, key head, segment): the walk over key chunks [s·SEG, s·SEG + SEG) from a zero
        state, storing the state before each chunk (and after the last one, H[N], in the last segment). With
        NSEG > 1 it also stores the segment's total [S | z] in T's row pid (TROW floats each)."""
        ik, iv, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bh, s = pid // NSEG, pid % NSEG
        b, h = bh // Hkv, bh % Hkv
        offs_c = tl.arange(0, C)
        offs_k = ik * BK + tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_k, mask_v = offs_k < F, offs_v < Dv
        k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
        h_ptrs = H + bh.to(tl.int64) * (N + 1) * F * Dv + offs_k[:, None] * Dv + offs_v[None, :]
        z_ptrs = Z + bh.to(tl.int64) * (N + 1) * F + offs_k
        h_mask = mask_k[:, None] & mask_v[None, :]
        state = tl.zeros((BK, BV), dtype=tl.float32)
        z = tl.zeros((BK,), dtype=tl.float32)
        t0 = s * SEG
        t1 = tl.minimum(t0 + SEG, N)
        for t in range(t0, t1):
            tl.store(h_ptrs + t * F * Dv, state.to(H.dtype.element_ty), mask=h_mask)
            if HAS_DEN:
                if iv == 0:
                    tl.store(z_ptrs + t * F, z, mask=mask_k)
            r = t * C + offs_c - P  # key index; the first P slots of the sequence are empty
            mask_r = (r >= 0) & (r < L)
            kmask = mask_r[:, None] & mask_k[None, :]
            kt = _load_phi(k_base + r[:, None] * sk_s + offs_k[None, :], kmask, FMAP, not HAS_DEN)
            vt = tl.load(v_base + r[:, None] * sv_s + offs_v[None, :],
                         mask=mask_r[:, None] & mask_v[None, :], other=0.0)
            if BF16:
                state += tl.dot(tl.trans(kt.to(tl.bfloat16)), vt.to(tl.bfloat16))
            else:
                state += tl.dot(tl.trans(kt.to(tl.float32)), vt.to(tl.float32))
            if HAS_DEN:
                z += tl.sum(kt.to(tl.float32), 0)
        if t1 == N:
            tl.store(h_ptrs + N * F * Dv, state.to(H.dtype.element_ty), mask=h_mask)
            if HAS_DEN:
                if iv == 0:
                    tl.store(z_ptrs + N * F, z, mask=mask_k)
        if NSEG > 1:
            t_row = T + pid.to(tl.int64) * TROW
            tl.store(t_row + offs_k[:, None] * Dv + offs_v[None, :], state, mask=h_mask)
            if HAS_DEN:
                if iv == 0:
                    tl.store(t_row + F * Dv + offs_k, z, mask=mask_k)

    @triton.jit
    def _offsets_kernel(T, Init, SOff, ZOff, NSEG, FDV, TROW, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        """Exclusive prefix sums over the walk segments' totals T (B·Hkv, NSEG, TROW = F·Dv [+ F]) plus the
        incoming state Init (B·Hkv, TROW), if any: the state part to SOff (B·Hkv, NSEG, F·Dv) in its dtype,
        the normaliser's to ZOff (B·Hkv, NSEG, TROW − F·Dv) float32."""
        bh, blk = tl.program_id(0), tl.program_id(1)
        e = blk * BLOCK + tl.arange(0, BLOCK)
        ok = e < TROW
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_INIT:
            acc += tl.load(Init + bh.to(tl.int64) * TROW + e, mask=ok, other=0.0)
        for s in range(NSEG):
            row = bh.to(tl.int64) * NSEG + s
            tl.store(SOff + row * FDV + e, acc.to(SOff.dtype.element_ty), mask=ok & (e < FDV))
            tl.store(ZOff + row * (TROW - FDV) + (e - FDV), acc, mask=ok & (e >= FDV))
            acc += tl.load(T + row * TROW + e, mask=ok, other=0.0)

    @triton.jit
    def _output_kernel(Q, K, V, H, Z, O, DEN, S0, Z0, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                       so_b, so_h, so_s, Hq, G, Sq, L, P, N, F, Dv, shift, eps, SEG,
                       FMAP: tl.constexpr, HAS_DEN: tl.constexpr, DIVIDE: tl.constexpr, BF16: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       KMAP: tl.constexpr = -1, QL2: tl.constexpr = False, INIT: tl.constexpr = False):
        """KMAP: the keys' map when it differs from the queries' (-1: FMAP); QL2: unit-length φ(q) rows,
        for the delta rule (needs BK >= F: one feature tile). INIT: every state H[t] is offset by S0 / Z0 of its
        walk segment, (B·Hkv, cdiv(N, SEG), F, Dv) / (.., F): an incoming state plus the totals of the segments
        before (H[N] belongs to the last segment). Query chunks before the first key chunk read H[0] + S0[0]."""
        iv, c, bhq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, hq = bhq // Hq, bhq % Hq
        hk = hq // G
        bkv = b * (Hq // G) + hk
        offs_c = tl.arange(0, C)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_v = offs_v < Dv
        i = c * C + offs_c
        mask_i = i < Sq
        q_base = Q + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h
        k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        t = c + shift  # the key chunk read causally (>= N: the state after every key; < 0: nothing)
        acc = tl.zeros((C, BV), dtype=tl.float32)
        den = tl.zeros((C,), dtype=tl.float32)
        if (t >= 0) | INIT:  # with INIT, t < 0 reads H[0] = 0 plus S0; its key rows are all masked
            tt = tl.maximum(tl.minimum(t, N), 0)
            seg = _segment_row(bkv, tt, N, SEG)
            h_base = H + (bkv.to(tl.int64) * (N + 1) + tt) * F * Dv
            z_base = Z + (bkv.to(tl.int64) * (N + 1) + tt) * F
            r = t * C + offs_c - P
            mask_r = (r >= 0) & (r < L)
            scores = tl.zeros((C, C), dtype=tl.float32)
            for f0 in range(0, F, BK):
                offs_k = f0 + tl.arange(0, BK)
                mask_k = offs_k < F
                qt = _load_phi(q_base + i[:, None] * sq_s + offs_k[None, :], mask_i[:, None] & mask_k[None, :], FMAP,
                               (not HAS_DEN) & (not QL2))
                if QL2:  # unit rows (one feature tile holds the whole row)
                    qt = qt / tl.maximum(tl.sqrt(tl.sum(qt * qt, 1)), 1e-12)[:, None]
                hmask = mask_k[:, None] & mask_v[None, :]
                ht = tl.load(h_base + offs_k[:, None] * Dv + offs_v[None, :], mask=hmask, other=0.0)
                if INIT:  # S0 in H's dtype: an fp32 tile more would spill (ptxas, sm_90)
                    ht += tl.load(S0 + seg * F * Dv + offs_k[:, None] * Dv + offs_v[None, :], mask=hmask, other=0.0)
                if BF16:
                    acc += tl.dot(qt.to(tl.bfloat16), ht.to(tl.bfloat16))
                else:
                    acc += tl.dot(qt.to(tl.float32), ht.to(tl.float32))
                if HAS_DEN:
                    zt = tl.load(z_base + offs_k, mask=mask_k, other=0.0)
                    if INIT:
                        zt += tl.load(Z0 + seg * F + offs_k, mask=mask_k, other=0.0)
                    den += tl.sum(qt.to(tl.float32) * zt[None, :], 1)
                if t < N:
                    kt = _load_phi(k_base + r[:, None] * sk_s + offs_k[None, :], mask_r[:, None] & mask_k[None, :],
                                   FMAP if KMAP < 0 else KMAP, True)
                    if BF16:
                        scores += tl.dot(qt.to(tl.bfloat16), tl.trans(kt.to(tl.bfloat16)))
                    else:
                        scores += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)))
            if t < N:
                scores = tl.where(offs_c[:, None] >= offs_c[None, :], scores, 0.0)
                vt = tl.load(v_base + r[:, None] * sv_s + offs_v[None, :],
                             mask=mask_r[:, None] & mask_v[None, :], other=0.0)
                if BF16:
                    acc += tl.dot(scores.to(tl.bfloat16), vt.to(tl.bfloat16))
                else:
                    acc += tl.dot(scores, vt.to(tl.float32))
                if HAS_DEN:
                    den += tl.sum(scores, 1)
        o_ptrs = O + b.to(tl.int64) * so_b + hq.to(tl.int64) * so_h + i[:, None] * so_s + offs_v[None, :]
        o_mask = mask_i[:, None] & mask_v[None, :]
        if DIVIDE:
            tl.store(o_ptrs, (acc / (den + eps)[:, None]).to(O.dtype.element_ty), mask=o_mask)
        else:
            tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_mask)
        if HAS_DEN:
            if iv == 0:  # the backward needs it; B·Hq·Sq floats
                tl.store(DEN + bhq.to(tl.int64) * Sq + i, den, mask=mask_i)


if triton is not None and os.environ.get("TRITON_INTERPRET") != "1":
    # on a GPU the tiles and pipelining depth are measured once per shape; the interpreter takes the heuristic
    # (stores overwrite H, Z and O entirely, so re-running a config during tuning is harmless)
    # few configs: every new (shape, map, mode) key compiles all of them once
    # the candidates: the fastest of `benchmarks/sweep_linear_tiles.py` (H200, h32 d64 bf16, raw identity:
    # results/2026-12-01-h200-linear-tiles.md) and the earlier ones, which normalised forms (float32 tiles) prefer
    _states_tuned = triton.autotune(
        configs=[triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s) for bk, bv, w, s in STATES_TILES],
        key=["F", "Dv", "Hkv", "NSEG", "FMAP", "BF16"])(_states_kernel)  # not the length: no re-tuning per new length
    _output_tuned = triton.autotune(
        configs=[triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s) for bk, bv, w, s in OUTPUT_TILES],
        key=["F", "Dv", "FMAP", "BF16", "DIVIDE"])(_output_kernel)
else:
    _states_tuned = _output_tuned = None


def rows_addressable(x: torch.Tensor, name: str) -> torch.Tensor:
    """The kernels offset rows within one (batch, head) in 32 bits: make x contiguous when its sequence
    stride would overflow that, and refuse sequences too long even then."""
    if x.stride(-1) != 1 or x.shape[2] * x.stride(2) >= 2 ** 31:
        x = x.contiguous()
    if x.shape[2] * x.stride(2) >= 2 ** 31:
        raise ValueError(f"linear_attention: {name} has {x.shape[2]} positions of {x.stride(2)} elements, "
                         "more than 2³¹ elements per head")
    return x


def with_grad_buffer(x: torch.Tensor, name: str):
    """(x, its gradient's buffer) for the backward kernels, which write each gradient with its input's strides:
    an input that is not dense (a slice) is copied first."""
    x = rows_addressable(x, name)
    gx = torch.empty_like(x)
    if gx.stride() != x.stride():
        x = x.contiguous()
        gx = torch.empty_like(x)
    return x, gx


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _state_blocks(F_: int, Dv: int, programs_per_block: int, sm_count: int):
    """Tiles for the sequential state walk: as large as 64 × 64, smaller until the grid covers the GPU twice
    (the walk over chunks is sequential, so parallelism comes only from heads and tiles)."""
    BK = min(64, max(16, triton.next_power_of_2(F_)))
    BV = min(64, max(16, triton.next_power_of_2(Dv)))
    while triton.cdiv(F_, BK) * triton.cdiv(Dv, BV) * programs_per_block < 2 * sm_count and max(BK, BV) > 16:
        if BV >= BK:
            BV //= 2
        else:
            BK //= 2
    return BK, BV


def chunk_geometry(Sq: int, L: int, causal: bool, offset, chunk: int):
    """(P, shift, N, nq): P empty key slots in front, key chunk t = query chunk c + shift, N key chunks, nq query chunks."""
    if causal:
        P = (-offset) % chunk
        shift = (offset + P) // chunk
    else:
        P, shift = 0, None
    N = max(1, -(-(P + L) // chunk))
    return P, (N if shift is None else shift), N, -(-Sq // chunk)


def walk_segments(N: int, walks: int, device) -> int:
    """Into how many segments to cut each states walk: the walk is sequential over the N key chunks, so one
    program per (tile, key head) can leave SMs idle (32 heads x 2 tiles = 64 programs on 132 SMs). Segments of
    >= MIN_SEGMENT_CHUNKS chunks, enough of them for about WALKS_PER_SM programs per SM."""
    wanted = -(-WALKS_PER_SM * _sm_count(device) // max(1, walks))
    return max(1, min(wanted, N // MIN_SEGMENT_CHUNKS))


def launch_walk(fk, v, *, fmap_id, normalize, bf16, chunk, P, N, init=None):
    """`launch_segmented_states` with the number of segments `walk_segments` picks for these keys."""
    B, Hkv, _, Fd = fk.shape
    walks = B * Hkv * triton.cdiv(Fd, 64) * triton.cdiv(v.shape[-1], 32)  # programs of one walk at the usual tiles
    return launch_segmented_states(fk, v, fmap_id=fmap_id, normalize=normalize, bf16=bf16, chunk=chunk, P=P, N=N,
                                   segments=walk_segments(N, walks, fk.device), init=init)


def launch_states(fk, v, *, fmap_id, normalize, bf16, chunk, P, N):
    """H (B·Hkv, N + 1, F, Dv) and Z (B·Hkv, N + 1, F or 1): the state before each key chunk."""
    return launch_segmented_states(fk, v, fmap_id=fmap_id, normalize=normalize, bf16=bf16, chunk=chunk, P=P, N=N,
                                   segments=1)[:2]


def launch_segmented_states(fk, v, *, fmap_id, normalize, bf16, chunk, P, N, segments, init=None):
    """(H, Z, SEG, offsets): the walk cut into `segments` (at most) of SEG chunks, each starting from zero, so
    H[t] misses the totals of the segments before t's. offsets: what the output kernel's INIT adds to the states
    of each segment, (S0, Z0) of shapes (B·Hkv, segments, F, Dv) in H's dtype / (.., F) float32: the totals of
    the segments before plus the incoming state `init` [S | z] (B, Hkv, F, Dv + normalize); None when the walk
    is one segment and there is no init."""
    B, Hkv, L, Fd = fk.shape
    Dv = v.shape[-1]
    dev = fk.device
    SEG = -(-N // max(1, segments))
    nseg = -(-N // SEG)
    H = torch.empty(B * Hkv, N + 1, Fd, Dv, dtype=torch.bfloat16 if bf16 else torch.float32, device=dev)
    Z = torch.empty(B * Hkv, N + 1, Fd if normalize else 1, dtype=torch.float32, device=dev)
    trow = Fd * Dv + (Fd if normalize else 0)
    T = torch.empty(B * Hkv, nseg, trow, dtype=torch.float32, device=dev) if nseg > 1 else Z
    state_args = (fk, v, H, Z, T, fk.stride(0), fk.stride(1), fk.stride(2), v.stride(0), v.stride(1), v.stride(2),
                  Hkv, L, P, N, Fd, Dv, SEG, nseg, trow)
    state_meta = dict(FMAP=fmap_id, HAS_DEN=normalize, BF16=bf16, C=chunk)
    if _states_tuned is not None and dev.type == "cuda":
        _states_tuned[lambda m: (triton.cdiv(Fd, m["BK"]), triton.cdiv(Dv, m["BV"]), B * Hkv * nseg)](
            *state_args, **state_meta)
    else:
        BK, BV = _state_blocks(Fd, Dv, B * Hkv * nseg, _sm_count(dev))
        _states_kernel[(triton.cdiv(Fd, BK), triton.cdiv(Dv, BV), B * Hkv * nseg)](*state_args, **state_meta,
                                                                                    BK=BK, BV=BV)
    if nseg == 1:
        return H, Z, SEG, None if init is None else split_state(init, Dv, normalize, H.dtype)
    s0 = torch.empty(B * Hkv, nseg, Fd, Dv, dtype=H.dtype, device=dev)
    z0 = torch.empty(B * Hkv, nseg, Fd, dtype=torch.float32, device=dev) if normalize else Z
    init_rows = None
    if init is not None:  # as T's rows: [S flattened | z]
        init_rows = init[..., :Dv].reshape(B * Hkv, Fd * Dv)
        if normalize:
            init_rows = torch.cat([init_rows, init[..., Dv].reshape(B * Hkv, Fd)], dim=-1)
        init_rows = init_rows.float().contiguous()
    block = OFFSETS_BLOCK
    _offsets_kernel[(B * Hkv, triton.cdiv(trow, block))](T, init_rows if init is not None else T, s0, z0, nseg,
                                                         Fd * Dv, trow, HAS_INIT=init is not None, BLOCK=block)
    return H, Z, SEG, (s0, z0)


def split_state(state, Dv: int, normalize: bool, dtype):
    """A state [S | z] (B, Hkv, F, Dv + normalize) as the kernels read it: S0 (B·Hkv, F, Dv) in the states'
    dtype `dtype` (bfloat16 in bfloat16 runs, as H), Z0 (B·Hkv, F) float32."""
    B, Hkv, Fd = state.shape[:3]
    s0 = state[..., :Dv].to(dtype).reshape(B * Hkv, Fd, Dv).contiguous()
    z0 = state[..., Dv].float().reshape(B * Hkv, Fd).contiguous() if normalize else s0
    return s0, z0


def far_additive_triton(fq, fk, v, *, fmap: str, causal: bool, offset, chunk: int, normalize: bool,
                        divide: bool, eps: float, out_dtype, return_den: bool = False, init=None, states=None):
    """Far part of additive linear attention, forward only.

    fq (B, Hq, Sq, F) and fk (B, Hkv, L, F): raw q/k for the fused maps (FUSED_MAPS), features otherwise;
    v (B, Hkv, L, Dv). divide: return the finished output in out_dtype, (B, Hq, Sq, Dv): num / (den + eps), or
    num itself when not normalize. Otherwise return float32 (B, Hq, Sq, Dv + 1) with den as the last column
    when normalize, or (B, Hq, Sq, Dv) unnormalised (same contract as `reference.far_chunked` on v with a ones column).
    init: an incoming state [S | z] (B, Hkv, F, Dv + normalize) over keys before all of these, which every
    query reads (context parallelism); states: (H, Z) of `launch_states` for these keys, if already walked.
    """
    B, Hq, Sq, Fd = fq.shape
    Hkv, L, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    G = Hq // Hkv
    P, shift, N, nq = chunk_geometry(Sq, L, causal, offset, chunk)
    fq, fk, v = rows_addressable(fq, "q"), rows_addressable(fk, "k"), rows_addressable(v, "v")
    bf16 = out_dtype == torch.bfloat16
    fmap_id = FUSED_MAPS.get(fmap, 0)
    dev = fq.device
    if states is not None:
        (H, Z), SEG = states, N
        offsets = None if init is None else split_state(init, Dv, normalize, H.dtype)
    else:
        H, Z, SEG, offsets = launch_walk(fk, v, fmap_id=fmap_id, normalize=normalize, bf16=bf16, chunk=chunk, P=P,
                                         N=N, init=init)
    s0, z0 = offsets if offsets is not None else (H, Z)
    den = torch.empty(B * Hq, Sq, dtype=torch.float32, device=dev) if normalize else None
    if divide:
        out = o_view = torch.empty(B, Hq, Sq, Dv, dtype=out_dtype, device=dev)
    else:
        out = torch.empty(B, Hq, Sq, Dv + int(normalize), dtype=torch.float32, device=dev)
        o_view = out[..., :Dv]
    out_args = (fq, fk, v, H, Z, o_view, den if normalize else out, s0, z0, fq.stride(0), fq.stride(1), fq.stride(2),
                fk.stride(0), fk.stride(1), fk.stride(2), v.stride(0), v.stride(1), v.stride(2), o_view.stride(0), o_view.stride(1),
                o_view.stride(2), Hq, G, Sq, L, P, N, Fd, Dv, shift, float(eps), SEG)
    out_meta = dict(FMAP=fmap_id, HAS_DEN=normalize, DIVIDE=divide and normalize, BF16=bf16, C=chunk,
                    INIT=offsets is not None)
    if _output_tuned is not None and dev.type == "cuda":
        _output_tuned[lambda m: (triton.cdiv(Dv, m["BV"]), nq, B * Hq)](*out_args, **out_meta)
    else:
        OK = min(64, max(16, triton.next_power_of_2(Fd)))
        OV = min(64, max(16, triton.next_power_of_2(Dv)))
        _output_kernel[(triton.cdiv(Dv, OV), nq, B * Hq)](*out_args, **out_meta, BK=OK, BV=OV, num_warps=8)
    if normalize and not divide:
        out[..., Dv] = den.view(B, Hq, Sq)
    if return_den:  # an empty tensor rather than None: autograd marks it non-differentiable
        return out, (den if den is not None else out.new_empty(0))
    return out


def _phi_torch(x, fmap: str):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    return F.elu(x) + 1.0 if fmap == "elu" else F.relu(x) if fmap == "relu" else x


def far_additive_torch(fq, fk, v, init=None, *, fmap: str, causal: bool, offset, chunk: int, normalize: bool,
                       divide: bool, eps: float, out_dtype):
    """The same function as `far_additive_triton`, in PyTorch (float32): what its backward differentiates."""
    fq, fk = _phi_torch(fq, fmap), _phi_torch(fk, fmap)
    v = v.to(fq.dtype)
    vals = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v
    B, Hq, Sq, Fd = fq.shape
    if fk.shape[2]:
        out = far_chunked(fq, fk, vals, None, causal=causal, offset=offset, update_rule="add", chunk=chunk)
    else:
        out = fq.new_zeros(B, Hq, Sq, vals.shape[-1])
    if init is not None:  # every query reads the incoming state
        Hkv = fk.shape[1]
        out = out + torch.einsum("bhgqf,bhfv->bhgqv", fq.view(B, Hkv, Hq // Hkv, Sq, Fd),
                                 init.to(fq.dtype)).reshape(out.shape)
    if divide:
        return (out[..., :-1] / (out[..., -1:] + eps) if normalize else out).to(out_dtype)
    return out


class _FarAdditive(torch.autograd.Function):
    """Forward and backward by the Triton kernels (`triton_additive_bwd` for the backward)."""

    @staticmethod
    def forward(fq, fk, v, init, H, Z, options):
        return far_additive_triton(fq, fk, v, **options, return_den=True, init=init,
                                   states=None if H is None else (H, Z))

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, v, init, _, _, options = inputs
        out, den = output
        ctx.mark_non_differentiable(den)
        divided = options["divide"] and options["normalize"]
        ctx.save_for_backward(fq, fk, v, init, out if divided else None, den if divided else None)
        ctx.options = options

    @staticmethod
    def backward(ctx, grad_out, _grad_den):
        from .triton_additive_bwd import far_additive_backward
        fq, fk, v, init, out, den = ctx.saved_tensors
        if any(_functorch_wrapped(t) for t in (grad_out, fq, fk, v, init)):
            # under torch.func transforms (the dispatcher's backward runs torch.func.vjp) the tensors are
            # wrappers Triton cannot read: differentiate the same function in PyTorch instead
            if init is None:
                _, vjp = torch.func.vjp(lambda a, b, c: far_additive_torch(a, b, c, **ctx.options), fq, fk, v)
                return (*vjp(grad_out), None, None, None, None)
            _, vjp = torch.func.vjp(lambda a, b, c, d: far_additive_torch(a, b, c, d, **ctx.options), fq, fk, v, init)
            return (*vjp(grad_out), None, None, None)
        dq, dk, dv, dinit = far_additive_backward(grad_out, fq, fk, v, out=out, den=den, init=init, **ctx.options)
        return dq, dk, dv, dinit, None, None, None


def _functorch_wrapped(t) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and t is not None and check(t))


def far_additive(fq, fk, v, init=None, states=None, **options):
    """Differentiable `far_additive_triton` (also in `init`; `states` is a cache, not differentiated)."""
    if not needs_grad(fq, fk, v, init):  # inference: no autograd node (its per-call argument binding costs host time)
        return far_additive_triton(fq, fk, v, **options, init=init, states=states)
    H, Z = states if states is not None else (None, None)
    return _FarAdditive.apply(fq, fk, v, init, H, Z, options)[0]


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fold_additive_torch(fk, v, *, fmap: str, normalize: bool):
    """The state over all keys, φ(k)ᵀ [v | 1]: (B, Hkv, F, Dv + normalize), float32 (float64 for float64)."""
    fk = _phi_torch(fk, fmap)
    v = v.to(fk.dtype)
    vals = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v
    return fk.transpose(-1, -2) @ vals


class _FoldAdditive(torch.autograd.Function):
    """`fold_additive_torch` as the last state of the states walk, plus the walk's (H, Z) for `far_additive`."""

    @staticmethod
    def forward(fk, v, options):
        B, Hkv, L, Fd = fk.shape
        Dv, normalize = v.shape[-1], options["normalize"]
        P, _, N, _ = chunk_geometry(1, L, options["causal"], options["offset"], options["chunk"])
        H, Z = launch_states(rows_addressable(fk, "k"), rows_addressable(v, "v"),
                             fmap_id=FUSED_MAPS.get(options["fmap"], 0), normalize=normalize,
                             bf16=options["out_dtype"] == torch.bfloat16, chunk=options["chunk"], P=P, N=N)
        # the last state, as the output kernel reads states (bfloat16 in bfloat16 runs); a copy, not a view of H
        fold = H[:, N].to(torch.float32, copy=True)
        if normalize:
            fold = torch.cat([fold, Z[:, N, :, None]], dim=-1)
        return fold.view(B, Hkv, Fd, Dv + int(normalize)), H, Z

    @staticmethod
    def setup_context(ctx, inputs, output):
        fk, v, options = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(fk, v)
        ctx.options = options

    @staticmethod
    def backward(ctx, dfold, _dH, _dZ):
        from .triton_additive_bwd import fold_additive_backward
        fk, v = ctx.saved_tensors
        opts = dict(fmap=ctx.options["fmap"], normalize=ctx.options["normalize"])
        if any(_functorch_wrapped(t) for t in (dfold, fk, v)):
            _, vjp = torch.func.vjp(lambda a, b: fold_additive_torch(a, b, **opts), fk, v)
            return (*vjp(dfold), None)
        return (*fold_additive_backward(dfold, fk, v, chunk=ctx.options["chunk"],
                                        bf16=ctx.options["out_dtype"] == torch.bfloat16, **opts), None)


def fold_additive(fk, v, *, fmap: str, causal: bool, offset, chunk: int, normalize: bool, out_dtype):
    """(fold, states): the state over all keys fk/v (`fold_additive_torch`'s value, differentiable) and the
    states walk (H, Z) that `far_additive(..., states=)` takes for the same keys and geometry."""
    fold, H, Z = _FoldAdditive.apply(fk, v, dict(fmap=fmap, causal=causal, offset=offset, chunk=chunk,
                                                 normalize=normalize, out_dtype=out_dtype))
    return fold, (H, Z)


def linear_attention_additive_triton(q, k, v, *, scale=None, causal=False, feature_map="elu", num_features=256,
                                     seed=0, sink_tokens=0, local_window=0, normalize=True, eps=1e-6,
                                     chunk_size=64, feature_params=None):
    """`linear_attention` with update_rule="add", far part on `far_additive`; the exact part and the shared
    normaliser as in `reference.linear_attention_reference` (which this mirrors line for line)."""
    import math

    from ..masks import check_qkv
    from .feature_maps import apply_feature_map
    from .reference import check_options, combine, far_keys, far_scale_per_head

    check_qkv(q, k, v, "linear_attention")
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule="add", chunk_size=chunk_size)
    B, Hq, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    from .triton_exact import exact_part_triton
    exact = exact_part_triton(q, k, v, scale=scale, causal=causal, sink_tokens=sink_tokens, local_window=local_window)
    fr = far_keys(Sq, Sk, causal, sink_tokens, local_window)
    far_num, lq = None, None
    if feature_map != "none" and fr.stop > fr.start:
        fk = k[:, :, fr.start:fr.stop]
        if feature_map in FUSED_MAPS:
            fq = q
        else:
            feats = apply_feature_map(q, fk, feature_map=feature_map, scale=scale, num_features=num_features,
                                      seed=seed, feature_params=feature_params)
            fq, fk, lq = feats.q, feats.k, feats.q_log_scale
        # nothing to combine: the kernel writes the finished output (divided by the normaliser, if any)
        pure = exact is None and lq is None and "far_scale" not in (feature_params or {})
        far_num = far_additive(fq, fk, v[:, :, fr.start:fr.stop], fmap=feature_map, causal=causal,
                               offset=fr.offset, chunk=chunk_size, normalize=normalize, divide=pure, eps=eps,
                               out_dtype=q.dtype)
        if pure:
            return far_num
    elif not normalize:
        return q.new_zeros(B, Hq, Sq, Dv)
    if exact is None and far_num is None:
        return q.new_zeros(B, Hq, Sq, Dv)
    c = far_scale_per_head(feature_params, Hq, q.device, torch.float32)
    return combine(exact, far_num, lq, c, normalize=normalize, eps=eps, Dv=Dv).to(q.dtype)
