"""The compile gate's cases for the linear kind's kernels (`longattn/kernels/linear/`), read from the kernel modules.

Shapes: bf16 and fp32 runs (the `BF16` constexpr; products in bf16 or tf32) at head dims 64 and 128 with the
elementwise maps (features = head dim) and the launchers' default chunk. The variants are those the launchers
produce: fused maps (elu) and the raw identity (whose tiles the compiler pipelines into shared memory), with
and without the normaliser, context parallelism's incoming state (INIT), the delta rule's unit rows (QL2),
and the decode step with an elementwise and a hedgehog map (features 2 x head dim).

The states walk and the output kernel of the additive rule are autotuned on a GPU over STATES_TILES and
OUTPUT_TILES: at bf16 every candidate must fit, at fp32 one of them (the autotuner skips what does not fit,
and there is no fallback). Every other kernel runs at pinned tiles (the module constants named in each case),
which must fit. The products must run on the tensor cores, except where a program holds one query row (the
decode step) or only sums (the segment offsets).
"""
from __future__ import annotations

import inspect

from .compile_gate import Group, config_label, make_case

DTYPES = ("bf16", "fp32")
HEAD_DIMS = (64, 128)
# names of integer (not pointer) arguments that start with a capital; others with a capital are pointers
INTS = {"N", "NQ", "F", "FD", "G", "Hq", "Hkv", "D", "Dv", "W", "L", "P", "Sq", "Sk", "SEG", "NSEG", "TROW", "FDV"}
FLOATS = {"eps", "scale", "c_all", "beta_new", "phi_scale"}
INT_POINTERS = {"COUNT"}
# pointers in the run's dtype in bf16 runs (inputs, their gradients, and the bf16-stored states); others float32
IO = {"Q", "K", "V", "O", "H", "S0", "DO", "R", "DQ", "DK", "DV", "KN", "WT", "UT", "UNEW", "TT", "DS"}


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def _types(kernel, dtype: str, io=IO, ints=()) -> dict:
    types = {}
    for name in kernel.arg_names:
        if name in FLOATS:
            types[name] = "fp32"
        elif name in INT_POINTERS:
            types[name] = "*i32"
        elif name[0].isupper() and name not in INTS and name not in ints:
            types[name] = f"*{dtype}" if name in io else "*fp32"
    return types


def _case(module, kernel: str, shape: str, label: str, constexprs: dict, options: dict, dtype: str, *,
          io=IO, ints=(), must_fit=True, group=None, mma=True):
    constexprs = {k: v for k, v in constexprs.items() if k in getattr(module, kernel).arg_names}
    tiles = {k: constexprs[k] for k in ("BK", "BV", "BF", "BM", "BN") if k in constexprs}
    return make_case(module, kernel, shape, config_label(label, tiles, options), constexprs=constexprs,
                     types=_types(getattr(module, kernel), dtype, io, ints), options=options,
                     half_precision=dtype == "bf16", must_fit=must_fit, group=group, needs_mma=mma)


def _variant(flags: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in flags.items())


def _additive(dtype: str, d: int, chunk: int):
    from longattn.kernels.linear import triton_additive as add
    from longattn.kernels.linear import triton_additive_bwd as bwd
    shape, bf16 = f"{dtype}-d{d}", dtype == "bf16"
    cases, groups = [], []
    tuned = [("_states_kernel", "STATES_TILES", add.STATES_TILES,
              [dict(FMAP=1, HAS_DEN=True), dict(FMAP=0, HAS_DEN=False)]),
             ("_output_kernel", "OUTPUT_TILES", add.OUTPUT_TILES,
              [dict(FMAP=1, HAS_DEN=True, DIVIDE=True, INIT=False), dict(FMAP=1, HAS_DEN=True, DIVIDE=True, INIT=True),
               dict(FMAP=0, HAS_DEN=False, DIVIDE=False, INIT=False)])]
    for kernel, table, tiles, variants in tuned:
        for flags in variants:
            group = None if bf16 else Group(f"linear/triton_additive.py {kernel} {table} {_variant(flags)} {shape}")
            groups += [group] if group else []
            for i, (bk, bv, warps, stages) in enumerate(tiles):
                constexprs = dict(**flags, BF16=bf16, C=chunk, BK=bk, BV=bv, KMAP=-1, QL2=False)
                cases.append(_case(add, kernel, shape, f"{table}[{i}] {_variant(flags)}", constexprs,
                                   {"num_warps": warps, "num_stages": stages}, dtype, must_fit=bf16, group=group))
    for init in (False, True):
        cases.append(_case(add, "_offsets_kernel", shape, f"OFFSETS_BLOCK HAS_INIT={init}",
                           dict(HAS_INIT=init, BLOCK=add.OFFSETS_BLOCK), {}, dtype, io={"SOff"}, mma=False))
    flags = dict(HAS_DEN=True, HAS_RS=True, BF16=bf16, C=chunk)
    tile = lambda spec: bwd._tile(spec, d, d)
    launches = [("_rev_states_kernel", "REV_TILE", bwd.REV_TILE, dict(FMAP=1)),
                *(("_dq_kernel", "DQ_TILE", bwd.DQ_TILE, dict(FMAP=fmap, INIT=init))
                  for fmap, init in ((1, False), (1, True), (0, False))),
                *(("_dkv_kernel", name, spec, dict(WANT_DK=want_dk, FMAP=fmap))
                  for want_dk, name, spec in ((True, "DK_TILE", bwd.DK_TILE), (False, "DV_TILE", bwd.DV_TILE))
                  for fmap in (1, 0))]
    for kernel, name, spec, variant in launches:
        t = tile(spec)
        options = {k: t.pop(k) for k in ("num_warps", "num_stages")}
        cases.append(_case(bwd, kernel, shape, f"{name} {_variant(variant)}", {**flags, **variant, **t}, options,
                           dtype))
    return cases, groups


def _delta(dtype: str, d: int, chunk: int):
    from longattn.kernels.linear import triton_additive as add
    from longattn.kernels.linear import triton_delta as delta
    from longattn.kernels.linear import triton_delta_bwd as dbwd
    shape, bf16 = f"{dtype}-d{d}", dtype == "bf16"
    bf, bv = _pow2(d), min(64, _pow2(d))  # one feature tile per row; value tiles as `delta_states` clamps them
    precision = delta.products_precision(bf16)
    common = dict(FMAP=1, BF16=bf16, C=chunk, BF=bf, PRECISION=precision)
    ov, ow, os_ = delta.OUTPUT_TILE
    hv, hw, hs = delta.WALK_TILE
    cases = [
        _case(delta, "_delta_inverse_kernel", shape, "INVERSE_WARPS", common, {"num_warps": delta.INVERSE_WARPS},
              dtype),
        _case(delta, "_delta_wu_kernel", shape, "WU_WARPS", {**common, "BV": bv}, {"num_warps": delta.WU_WARPS},
              dtype),
        _case(delta, "_delta_h_kernel", shape, "WALK_TILE", {**common, "BV": min(hv, bv)},
              {"num_warps": hw, "num_stages": hs}, dtype),
        _case(add, "_output_kernel", shape, "triton_delta.OUTPUT_TILE QL2=True",
              dict(FMAP=0, HAS_DEN=False, DIVIDE=False, BF16=bf16, C=chunk, BK=bf, BV=min(ov, bv), KMAP=0, QL2=True,
                   INIT=False), {"num_warps": ow, "num_stages": os_}, dtype),
    ]
    for kernel, name, (tile_v, warps) in (("_walk_kernel", "WALK_TILE", dbwd.WALK_TILE),
                                          ("_local_kernel", "LOCAL_TILE", dbwd.LOCAL_TILE),
                                          ("_dq_kernel", "DQ_TILE", dbwd.DQ_TILE),
                                          ("_dkn_kernel", "DKV_TILE", dbwd.DKV_TILE),
                                          ("_dkv_kernel", "DKV_TILE", dbwd.DKV_TILE)):
        cases.append(_case(dbwd, kernel, shape, f"triton_delta_bwd.{name}", {**common, "BV": min(tile_v, bv)},
                           {"num_warps": warps}, dtype))
    cases.append(_case(dbwd, "_dk_kernel", shape, "triton_delta_bwd.DK_WARPS", common, {"num_warps": dbwd.DK_WARPS},
                       dtype))
    return cases


def _chunked(dtype: str, d: int, chunk: int):
    """`triton_chunk`: the delta rule's far part where the fused path does not apply (with the normaliser's
    column of ones in the values), and the additive walk it keeps."""
    from longattn.kernels.linear import triton_chunk as ch
    bk, bv = ch._blocks(d, d + 1)
    io = {"K", "Vals", "Q"}
    return [_case(ch, kernel, f"{dtype}-d{d}", "_blocks", dict(C=chunk, BK=bk, BV=bv), {}, dtype, io=io, ints={"V"})
            for kernel in ("_add_states_kernel", "_delta_ut_kernel", "_delta_states_kernel", "_output_kernel")]


def _decode(dtype: str, d: int):
    from longattn.kernels.linear import triton_decode as dec
    from longattn.kernels.linear.triton_additive import FUSED_MAPS
    cases = []
    for name, fmap, fd in (("elu", FUSED_MAPS["elu"], d), ("hedgehog", dec.HEDGEHOG, 2 * d)):
        constexprs = dict(FMAP=fmap, HAS_FAR=True, FOLD=True, NORMALIZE=True, PER_HEAD_C=True, SHIFT=True, BD=_pow2(d),
                          BDV=_pow2(d), BN=dec.KEYS_PER_PROGRAM, PARTS=8, BF=_pow2(fd), HAS_BIAS=True)
        cases.append(_case(dec, "_decode_kernel", f"{dtype}-d{d}-{name}", "KEYS_PER_PROGRAM decode_warps",
                           constexprs, {"num_warps": dec.decode_warps(d, fd, d)}, dtype, io={"Q", "O"}, mma=False))
    return cases


def _exact(dtype: str, d: int):
    from longattn.kernels.linear import triton_exact as ex
    bm, bn = ex.EXACT_TILE
    constexprs = dict(CAUSAL=True, BF16=dtype == "bf16", BM=bm, BN=bn, BD=_pow2(d), BDV=_pow2(d))
    shape = f"{dtype}-d{d}"
    return [_case(ex, "_exact_kernel", shape, "EXACT_TILE forward_warps", constexprs,
                  {"num_warps": ex.forward_warps(_pow2(d), _pow2(d))}, dtype, io={"Q", "K", "V"}),
            *(_case(ex, kernel, shape, "EXACT_TILE BACKWARD_WARPS", constexprs, {"num_warps": ex.BACKWARD_WARPS},
                    dtype, io={"Q", "K", "V", "DQ", "DK", "DV"})
              for kernel in ("_exact_dq_kernel", "_exact_dkv_kernel"))]


def cases():
    from longattn.kernels import linear
    chunk = inspect.signature(linear.linear_attention).parameters["chunk_size"].default
    cases, groups = [], []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            c, g = _additive(dtype, d, chunk)
            cases += c + _delta(dtype, d, chunk) + _chunked(dtype, d, chunk) + _decode(dtype, d) + _exact(dtype, d)
            groups += g
    return cases, groups
