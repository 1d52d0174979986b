"""The compile gate's cases for the HyperAttention kernels (`longattn/kernels/hyper/`), read from the kernel modules.

The launchers pin one tile per (kernel, head size) in the tables of `triton_attention` (TILES, TILES_EXACT,
TILES_WINDOW, TILES_BWD*), chosen per Triton version where a measured tile spills on newer ones, and the hash
its HASH_TILE: nothing is autotuned and nothing falls back, so every tile must fit at every shape the launchers
take, fp16/bf16/fp32 up to d256 (here bf16 and fp32 at d64, d128 and d256, which select every table entry).
The variants are those the launchers produce (as `sm90_build` lists them): the causal exact part, the merging
non-causal window part, the rectangles continuing a state, starting one with and without exact keys to skip,
and a local pattern's (context parallelism); backward the same for its four kernels. fp32 runs take "ieee"
products, which do not use the tensor cores; the others must.
"""
from __future__ import annotations

import inspect

import torch

from .compile_gate import config_label, make_case

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)
INDEX = ("LO", "HI", "QORD", "QSTART", "KORD", "SAMP", "SBLK", "RECTS", "ROW_LO", "ROW_HI", "FULL_LO", "FULL_HI")


def _types(kernel, dtype: str, out_dtype: str) -> dict:
    """Q/K/V/DO in the inputs' dtype, index tensors int64, states and gradients float32; OF (the forward's
    target) float32 or, where the launch writes the final output, the inputs' dtype."""
    table = {**{n: f"*{dtype}" for n in ("Q", "K", "V", "DO")}, **{n: "*i64" for n in INDEX},
             **{n: "*fp32" for n in ("O", "LSE", "DELTA", "DQ", "DK", "DV_", "SLW")}, "OF": f"*{out_dtype}",
             "scale_log2": "fp32", "scale": "fp32"}
    return {n: t for n, t in table.items() if n in kernel.arg_names}


def _pinned(module, kernel: str, shape: str, table: str, tiles, dtype: str, d: int, out_dtype: str, **flags):
    """A launch at a pinned tile (BLOCK_M, BLOCK_N, num_warps, num_stages) of table `table` of triton_attention."""
    block_m, block_n, warps, stages = tiles
    dims = dict(D=d, DV=d, BLOCK_D=max(16, d), BLOCK_DV=max(16, d), WIDE=False,
                PRECISION="ieee" if dtype == "fp32" else None)
    constexprs = {**dims, "BLOCK_M": block_m, "BLOCK_N": block_n, **flags}
    options = {"num_warps": warps, "num_stages": stages}
    variant = " ".join(f"{k}={v}" for k, v in flags.items())
    return make_case(module, kernel, shape, config_label(f"{table} {variant}".strip(),
                                                         {"BLOCK_M": block_m, "BLOCK_N": block_n}, options),
                     types=_types(getattr(module, kernel), dtype, out_dtype), constexprs=constexprs,
                     options=options, half_precision=dtype == "bf16", must_fit=True,
                     needs_mma=dims["PRECISION"] != "ieee")


def _forward(dtype: str, d: int):
    from longattn.kernels.hyper import triton_attention as fwd
    shape = f"{dtype}-d{d}"
    exact, window, rects = (fwd._tiles(d, d, t) for t in (fwd.TILES_EXACT, fwd.TILES_WINDOW, fwd.TILES))
    run = lambda kernel, table, tiles, out, **flags: _pinned(fwd, kernel, shape, table, tiles, dtype, d, out, **flags)
    return [
        run("_exact_part_kernel", "TILES_EXACT", exact, "fp32", CAUSAL=True, MERGE=False),
        run("_exact_part_kernel", "TILES_WINDOW", window, dtype, CAUSAL=False, MERGE=True),
        run("_rectangles_kernel", "TILES", rects, "fp32", LOCAL=False, INIT=False, EXCLUDE=True),
        run("_rectangles_kernel", "TILES", rects, "fp32", LOCAL=False, INIT=True, EXCLUDE=True),
        run("_rectangles_kernel", "TILES", rects, dtype, LOCAL=False, INIT=True, EXCLUDE=False),
        run("_rectangles_kernel", "TILES", rects, "fp32", LOCAL=True, INIT=False, EXCLUDE=True),
    ]


def _backward(dtype: str, d: int):
    from longattn.kernels.hyper import triton_attention as fwd
    from longattn.kernels.hyper import triton_backward as bwd
    shape = f"{dtype}-d{d}"
    tiles = lambda table: fwd._tiles(d, d, getattr(fwd, table))
    run = lambda kernel, table, **flags: _pinned(bwd, kernel, shape, table, tiles(table), dtype, d, "fp32", **flags)
    block_dq = dict(DQ_ATOMIC=bwd.BLOCK_DQ == "atomic")
    rows_dq = dict(BLOCK_DQ=bwd.BLOCK_DQ == "rows")
    return [
        run("_exact_part_bwd_kernel", "TILES_BWD_DQ", CAUSAL=True),
        run("_exact_part_dkdv_kernel", "TILES_BWD_DKDV", CAUSAL=True),
        *(run("_blocks_bwd_kernel", "TILES_BWD_BLOCKS", LOCAL=local, **block_dq) for local in (False, True)),
        *(run("_rectangles_bwd_kernel", "TILES_BWD", LOCAL=local, **rows_dq) for local in (False, True)),
    ]


def _hash(dtype: str, d: int):
    from longattn.kernels.hyper import pattern, triton_hash
    bits = inspect.signature(pattern.build_pattern).parameters["lsh_bits"].default
    block_s, warps, precision = triton_hash.HASH_TILE
    constexprs = dict(D=d, BITS=bits, BLOCK_S=block_s, BLOCK_D=max(16, d), BLOCK_R=max(16, bits),
                      PRECISION=precision)
    return make_case(triton_hash, "_lsh_rank_kernel", f"{dtype}-d{d}-bits{bits}",
                     config_label("HASH_TILE", {"BLOCK_S": block_s, "PRECISION": precision}, {"num_warps": warps}),
                     types={"X": f"*{dtype}", "P": "*fp32", "RANK": "*i64"}, constexprs=constexprs,
                     options={"num_warps": warps}, half_precision=dtype == "bf16", must_fit=True,
                     needs_mma=precision != "ieee")


def cases():
    cases = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            cases += [*_forward(dtype, d), *_backward(dtype, d), _hash(dtype, d)]
    return cases, []
