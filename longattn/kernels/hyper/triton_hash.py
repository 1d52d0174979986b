"""Angular LSH in one Triton kernel: project rows on the head's hyperplanes, take signs, Gray-rank the code.

Same result as `pattern.lsh_rank` up to the sign of projections within rounding of zero (tf32 products on
the GPU, see HASH_TILE; the interpreter computes in float32); the forward and its recomputed backward both
use this kernel, so they agree exactly.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without triton; callers check HAVE_TRITON
    triton = None

HAVE_TRITON = triton is not None

if HAVE_TRITON:
    @triton.jit
    def _lsh_rank_kernel(X, P, RANK, sxb, sxh, sxs, H, group, S,
                         D: tl.constexpr, BITS: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr = "ieee"):
        pid_s = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        plane_head = h // group
        rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        row_ok = rows < S
        x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxs + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        p = tl.load(P + plane_head * D * BITS + d[:, None] * BITS + r[None, :],
                    mask=(d[:, None] < D) & (r[None, :] < BITS), other=0.0)
        # float32 products ("ieee": the reference's projection; tf32 variants round the projections a little,
        # which moves only points within that rounding of a hyperplane, i.e. an equally random hash)
        proj = tl.dot(x, p, input_precision=PRECISION)
        bit = ((proj > 0) & (r[None, :] < BITS)).to(tl.int32)
        code = tl.sum(bit << r[None, :], axis=1)
        # inverse Gray code (position along the Gray sequence), codes have at most 16 bits
        rank = code ^ (code >> 1)
        rank = rank ^ (rank >> 2)
        rank = rank ^ (rank >> 4)
        rank = rank ^ (rank >> 8)
        tl.store(RANK + bh * S + rows, rank.to(tl.int64), mask=row_ok)


# (rows per program, num_warps, dot precision); `benchmarks/bench_hyper.py --sweep-hash` times candidates.
# Measured on an H200 (triton 3.6, h32 d64, 131K rows; benchmarks/results/2026-12-01-h200-hyper-hash-sweep.md):
# "ieee" 0.49-0.52 ms, "tf32x3" 0.33 ms, "tf32" 0.17 ms (3.2 TB/s). tf32 puts 0.05% of rows in another bucket than the float32 projection:
# rows within tf32 rounding of a hyperplane, whose side is a coin toss under any precision, so the hash is as
# random as before. Forward and backward hash with this same kernel, so they always agree with each other.
HASH_TILE = (128, 4, "tf32")
# register spill the compile gate (tests/kernels/compile_gate.py) allows in fp16/bf16 builds for sm_90: none up to
# d128; at d256 the 128 x 256 tile spills 168 (Triton 3.6) to 192 bytes (3.9), once per 128 rows: bounded there
SPILL_LIMITS = {"_lsh_rank_kernel": 0, "_lsh_rank_kernel BLOCK_D=256": 192}


def lsh_rank_triton(x, planes, group):
    """x (B, H, S, D) float16/bfloat16/float32, planes (Hkv, D, r) float32, H = group * Hkv
    -> (B, H, S) int64 Gray rank of each row's bucket. Drop-in for `pattern.lsh_rank`."""
    import torch
    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    planes = planes.to(device=x.device, dtype=torch.float32).contiguous()
    bits = planes.shape[-1]
    rank = torch.empty(B, H, S, dtype=torch.int64, device=x.device)
    block_s, warps, precision = HASH_TILE
    grid = (triton.cdiv(S, block_s), B * H)
    _lsh_rank_kernel[grid](x, planes, rank, x.stride(0), x.stride(1), x.stride(2), H, group, S,
                           D=D, BITS=bits, BLOCK_S=block_s, BLOCK_D=max(16, triton.next_power_of_2(D)),
                           BLOCK_R=max(16, triton.next_power_of_2(bits)), PRECISION=precision, num_warps=warps)
    return rank
