"""Build the hyper Triton kernels for sm_90 without a GPU and print each one's register use.

`python -m longattn.kernels.hyper.sm90_build` in a process where TRITON_INTERPRET is unset (the
test runs it in a subprocess):
a compile error or a register spill here shows up before any GPU run. Uses the ptxas and cuobjdump
that the triton wheel ships."""
import os
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_attention as fwd
from . import triton_backward as bwd

TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "O": "*fp32", "OF": "*bf16", "LSE": "*fp32",
         "DELTA": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV_": "*fp32", "LO": "*i64", "HI": "*i64", "QORD": "*i64",
         "QSTART": "*i64", "KORD": "*i64", "SAMP": "*i64", "SBLK": "*i64", "SLW": "*fp32", "RECTS": "*i64",
         "ROW_LO": "*i64", "ROW_HI": "*i64", "FULL_LO": "*i64", "FULL_HI": "*i64", "scale_log2": "fp32", "scale": "fp32"}


def build(kernel, tiles, head_dim, causal, local=False, **flags):
    block_m, block_n, warps, stages = tiles
    consts = dict(D=head_dim, DV=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim,
                  PRECISION=None, WIDE=False, CAUSAL=causal, LOCAL=local, DQ_ATOMIC=bwd.BLOCK_DQ == "atomic",
                  BLOCK_DQ=bwd.BLOCK_DQ == "rows")
    consts.update(flags)
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    sig = {n: "constexpr" if n in consts else TYPES.get(n, "i32") for n in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    path = f"/tmp/hyper_sm90_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    os.remove(path)
    line = next(l for l in usage.splitlines() if "REG:" in l)
    return {kv.split(":")[0]: int(kv.split(":")[1]) for kv in line.split() if kv.split(":")[0] in ("REG", "STACK")}


def main():
    for head_dim in (64, 128):
        f_tiles = fwd._tiles(head_dim, head_dim)
        e_tiles = fwd._tiles(head_dim, head_dim, fwd.TILES_EXACT)
        w_tiles = fwd._tiles(head_dim, head_dim, fwd.TILES_WINDOW)
        b_tiles = fwd._tiles(head_dim, head_dim, fwd.TILES_BWD)
        dq_tiles = fwd._tiles(head_dim, head_dim, fwd.TILES_BWD_DQ)
        dkdv_tiles = fwd._tiles(head_dim, head_dim, fwd.TILES_BWD_DKDV)
        blocks_tiles = fwd._tiles(head_dim, head_dim, fwd.TILES_BWD_BLOCKS)
        for name, kernel, tiles, local, flags in (
                ("forward exact part", fwd._exact_part_kernel, e_tiles, False, {}),
                ("forward exact part merging", fwd._exact_part_kernel, e_tiles, False, dict(MERGE=True)),
                ("forward window part merging", fwd._exact_part_kernel, w_tiles, False, dict(MERGE=True, CAUSAL=False)),
                ("forward rectangles", fwd._rectangles_kernel, f_tiles, False, {}),
                ("forward rectangles first, unmasked", fwd._rectangles_kernel, f_tiles, False,
                 dict(INIT=True, EXCLUDE=False)),
                ("forward rectangles local", fwd._rectangles_kernel, f_tiles, True, {}),
                ("backward exact dq", bwd._exact_part_bwd_kernel, dq_tiles, False, {}),
                ("backward exact dk/dv", bwd._exact_part_dkdv_kernel, dkdv_tiles, False, {}),
                ("backward blocks", bwd._blocks_bwd_kernel, blocks_tiles, False, {}),
                ("backward blocks local", bwd._blocks_bwd_kernel, blocks_tiles, True, {}),
                ("backward rectangles", bwd._rectangles_bwd_kernel, b_tiles, False, {}),
                ("backward rectangles local", bwd._rectangles_bwd_kernel, b_tiles, True, {})):
            use = build(kernel, tiles, head_dim, True, local, **flags)
            # a tile the GPU measured fastest although it spills (triton_attention.TILES' comment)
            kept = " measured-fastest" if tiles in fwd.SPILLING_BY_CHOICE else ""
            print(f"{name} d{head_dim} tiles={tiles} REG={use['REG']}{kept} STACK={use['STACK']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
