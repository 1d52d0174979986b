"""The compile gate's cases for the flash kernels (`longattn/kernels/flash/`), read from the kernel modules.

Shapes: bf16 and fp32 at head dims 64, 128 and 256 (the launchers take fp16/bf16/fp32 up to d256); the decode
split kernel at 16 and 128 query rows (one query of an 8-head group; 16 queries of h32/kv4) with head dim 80
padded to 128, bf16 and fp32, and fp32 at d256 with 128 rows, where `decode_forward` hands a call that fits no
decode tile to the tiled forward. Each kernel compiles in its most general variant (causal, lengths that are not
a whole number of tiles, no mask): masks and even lengths change a few instructions, not the tiles.

- triton_fwd: the configs of FWD_CONFIGS that the autotuner's pruner keeps at the shape (TMA allowed, as on an
  H100 with contiguous inputs), and the fallback chain `fallback_configs(default_fwd_config(...))`.
- triton_bwd: `_bwd_preprocess` as launched; DKDV_CONFIGS and DQ_CONFIGS as pruned; the fallback chains of
  `default_bwd_configs`.
- triton_decode: DECODE_CONFIGS (no pruner) and `decode_fallback_configs()`; the merge kernel at 16 and at
  MAX_SPLITS splits; programmatic dependent launch wherever this Triton builds it.
- triton_fwd_ws: WS_CONFIG at WS_HEAD_DIMS, bf16, not causal unless WS_CAUSAL (the calls `ws_applies` takes).
- gluon_fwd: every GLUON_CONFIGS entry in bf16, its descriptors built as `flash_forward_gluon` builds them
  (`launch_plan`, `_smem_layout`): Gluon kernels compile offline through GluonASTSource under Triton 3.6 and 3.9.

The tuning lists are meant for half-precision inputs up to d128, and there each config must fit. Elsewhere the
autotuner skips the configs that do not fit (OutOfResources) and the launcher's fallback chain must hold one that
does, so the gate compiles the chain only (fp32 builds of the wide tuned tiles spill kilobytes and keep ptxas busy
for a minute each). The fast paths (triton_fwd_ws, gluon_fwd) must compile and fit at their measured configs,
although their launchers fall back to triton_fwd on a failed build: a fast path that silently stops building is
what this gate is for.
"""
from __future__ import annotations

import torch

from .compile_gate import Group, config_label, make_case

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)
DECODE_SHAPES = [("bf16", 16, 80), ("bf16", 128, 80), ("fp32", 16, 80), ("fp32", 128, 80), ("fp32", 128, 256)]
DECODE_HANDOVER_ABOVE = 128  # padded head dims above which decode_forward may hand a call to the tiled forward


def _tuned_for(dtype: str, head_dim_pad: int) -> bool:
    return dtype == "bf16" and head_dim_pad <= 128


def _pointers(dtype: str, io: tuple, fp32: tuple) -> dict:
    return {**{n: f"*{dtype}" for n in io}, **{n: "*fp32" for n in fp32}}


def _split(cfg) -> tuple[dict, dict]:
    """A triton.Config or a launcher's config dict as (constexpr tiles, compile options)."""
    if isinstance(cfg, dict):
        options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
        return {k: v for k, v in cfg.items() if k not in options}, options
    return dict(cfg.kwargs), {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _chain(module, kernel, shape, configs, group, *, types, constexprs, half):
    """The cases of a fallback chain, in the launcher's order."""
    cases = []
    for i, cfg in enumerate(configs):
        tiles, options = _split(cfg)
        cases.append(make_case(module, kernel, shape, config_label(f"fallback[{i}]", tiles, options), types=types,
                               constexprs={**constexprs, **tiles}, options=options, half_precision=half,
                               must_fit=False, group=group, needs_mma=True))
    return cases


def _tuned(module, kernel, shape, configs, kept, *, types, constexprs, tma=None):
    """The cases of the tuning configs `kept` (by the pruner), named by their index in the full list."""
    cases = []
    for i, cfg in enumerate(configs):
        if cfg in kept:
            tiles, options = _split(cfg)
            cases.append(make_case(module, kernel, shape, config_label(f"tuned[{i}]", tiles, options),
                                   types={**types, **(tma(cfg) if tma else {})}, constexprs={**constexprs, **tiles},
                                   options=options, half_precision=True, must_fit=True, needs_mma=True))
    return cases


def _tma_types(cfg, dtype: str, head_dim: int) -> dict:
    """The descriptor types the JIT sees once the config's pre-hook has set the tiles (none without TMA)."""
    if not cfg.kwargs["USE_TMA"]:
        return {}
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor
    x = torch.empty(16, head_dim, dtype=DTYPES[dtype])
    desc = lambda: TensorDescriptor(x, [16, head_dim], [head_dim, 1], [16, head_dim])  # noqa: E731
    nargs = {"USE_TMA": True, "BLOCK_N": cfg.kwargs["BLOCK_N"], "HEAD_DIM": head_dim, "DV": head_dim,
             "K_desc": desc(), "V_desc": desc()}
    cfg.pre_hook(nargs)
    return {n: mangle_type(nargs[n]) for n in ("K_desc", "V_desc")}


def _forward(dtype: str, d: int):
    from longattn.kernels.flash import triton_fwd as tf
    shape, torch_dtype, pad = f"{dtype}-d{d}", DTYPES[dtype], tf.padded_dim(d)
    constexprs = dict(HEAD_DIM=d, HEAD_DIM_PAD=pad, DV=d, DV_PAD=pad, CAUSAL=True, HAS_MASK=False,
                      MASK_IS_BOOL=False, EVEN_M=False, EVEN_N=False, TMA_OK=True,
                      DOT_PRECISION=tf.dot_precision(torch_dtype))
    types = {**_pointers(dtype, ("Q", "K", "V", "K_desc", "V_desc", "Mask", "Out"), ("Lse",)), "qk_scale": "fp32"}
    cases = []
    if _tuned_for(dtype, pad):
        kept = tf._prune_by_shared_memory(tf.FWD_CONFIGS, {"Q": torch.empty(0, dtype=torch_dtype), **constexprs})
        cases += _tuned(tf, "_flash_fwd_kernel", shape, tf.FWD_CONFIGS, kept, types=types, constexprs=constexprs,
                        tma=lambda cfg: _tma_types(cfg, dtype, d))
    group = Group(f"flash/triton_fwd.py _flash_fwd_kernel fallback chain {shape}")
    chain = tf.fallback_configs(tf.default_fwd_config(pad, torch_dtype.itemsize))
    cases += _chain(tf, "_flash_fwd_kernel", shape, chain, group, types=types, constexprs=constexprs,
                    half=dtype == "bf16")
    return cases, [group]


def _backward(dtype: str, d: int):
    from longattn.kernels.flash import triton_bwd as tb
    from longattn.kernels.flash import triton_fwd as tf
    shape, torch_dtype, pad, half = f"{dtype}-d{d}", DTYPES[dtype], tf.padded_dim(d), dtype == "bf16"
    cases = [make_case(tb, "_bwd_preprocess", shape, "as launched", constexprs=dict(DV=d, DV_PAD=pad, BLOCK=64),
                       types=_pointers(dtype, ("Out", "dOut"), ("dLse", "Lse", "Delta", "Lse2")), options={},
                       half_precision=half, must_fit=True)]
    constexprs = dict(HEAD_DIM=d, HEAD_DIM_PAD=pad, DV=d, DV_PAD=pad, CAUSAL=True, HAS_MASK=False,
                      MASK_IS_BOOL=False, EVEN_M=False, EVEN_N=False, DOT_PRECISION=tf.dot_precision(torch_dtype))
    pointers = {**_pointers(dtype, ("Q", "K", "V", "Mask", "dOut", "dK", "dV", "dQ"), ("Lse2", "Delta")),
                "scale": "fp32", "qk_scale": "fp32"}
    defaults = tb.default_bwd_configs(pad, torch_dtype.itemsize)
    groups = []
    for kernel, tuned, default in (("_bwd_dkdv_kernel", tb.DKDV_CONFIGS, defaults[0]),
                                   ("_bwd_dq_kernel", tb.DQ_CONFIGS, defaults[1])):
        types = {n: t for n, t in pointers.items() if n in getattr(tb, kernel).arg_names}
        if _tuned_for(dtype, pad):
            cases += _tuned(tb, kernel, shape, tuned, tb._prune(tuned, constexprs), types=types,
                            constexprs=constexprs)
        group = Group(f"flash/triton_bwd.py {kernel} fallback chain {shape}")
        groups.append(group)
        cases += _chain(tb, kernel, shape, tf.fallback_configs(default), group, types=types, constexprs=constexprs,
                        half=half)
    return cases, groups


def _decode(dtype: str, rows: int, d: int):
    from longattn.kernels.flash import triton_decode as dec
    from longattn.kernels.flash import triton_fwd as tf
    shape, torch_dtype, pad = f"{dtype}-rows{rows}-d{d}", DTYPES[dtype], tf.padded_dim(d)
    constexprs = dict(HEAD_DIM=d, HEAD_DIM_PAD=pad, DV=d, DV_PAD=pad, ROWS=rows, CAUSAL=True, HAS_MASK=False,
                      MASK_IS_BOOL=False, DOT_PRECISION=tf.dot_precision(torch_dtype), INTERLEAVED=dec.INTERLEAVED,
                      PDL=dec.triton_launches_pdl())
    types = {**_pointers(dtype, ("Q", "K", "V", "Mask"), ("PartOut", "PartStats")), "qk_scale": "fp32"}
    cases = []
    if _tuned_for(dtype, pad):  # no pruner: the whole list
        cases += _tuned(dec, "_decode_split_kernel", shape, dec.DECODE_CONFIGS, dec.DECODE_CONFIGS, types=types,
                        constexprs=constexprs)
    # where no decode tile fits a wide head, the launcher runs the tiled forward (its chain at this dtype and width)
    handover = f"flash/triton_fwd.py _flash_fwd_kernel fallback chain {dtype}-d{pad}" \
        if pad > DECODE_HANDOVER_ABOVE else None
    group = Group(f"flash/triton_decode.py _decode_split_kernel fallback chain {shape}", handover=handover)
    cases += _chain(dec, "_decode_split_kernel", shape, dec.decode_fallback_configs(), group, types=types,
                    constexprs=constexprs, half=dtype == "bf16")
    return cases, [group]


def _merge(dtype: str, d: int):
    from longattn.kernels.flash import triton_decode as dec
    from longattn.kernels.flash import triton_fwd as tf
    pdl = dec.triton_launches_pdl()
    return [make_case(dec, "_decode_merge_kernel", f"{dtype}-d{d}-splits{splits}", "as launched",
                      types=_pointers(dtype, ("Out",), ("PartOut", "PartStats", "Lse")),
                      constexprs=dict(DV=d, DV_PAD=tf.padded_dim(d), SPLITS_PAD=max(2, splits), PDL=pdl),
                      options={"launch_pdl": True} if pdl else {}, half_precision=dtype == "bf16", must_fit=True)
            for splits in (16, dec.MAX_SPLITS)]


def _warp_specialised():
    from longattn.kernels.flash import triton_fwd_ws as ws
    cfg = dict(ws.WS_CONFIG)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    types = {**_pointers("bf16", ("Q", "K", "V", "Out"), ("Lse",)), "qk_scale": "fp32"}
    return [make_case(ws, "_flash_fwd_ws_kernel", f"bf16-d{d}{'-causal' if causal else ''}",
                      config_label("WS_CONFIG", cfg, options), types=types, options=options,
                      constexprs=dict(HEAD_DIM=d, CAUSAL=causal, EVEN_N=False, WARP_SPEC=True, **cfg),
                      half_precision=True, must_fit=True, needs_mma=True)
            for d in ws.WS_HEAD_DIMS for causal in sorted({False, ws.WS_CAUSAL})]


def _gluon():
    from longattn.kernels.flash import gluon_fwd as g
    if g.gluon is None:  # a Triton without Gluon: the launcher never takes this path
        return []
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type
    cases = []
    for (d, causal), config in g.GLUON_CONFIGS.items():
        kernel, bm, bn, q_rows, kwargs = g.launch_plan(config)
        x = torch.empty(bm, d, dtype=torch.bfloat16)
        desc = lambda rows: mangle_type(  # noqa: E731
            TensorDescriptor.from_tensor(x, [rows, d], g._smem_layout(rows, d, g.gl.bfloat16)))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
        types = {"q_desc": desc(q_rows), "o_desc": desc(q_rows), "k_desc": desc(bn), "v_desc": desc(bn),
                 "Lse": "*fp32", "qk_scale": "fp32"}
        cases.append(make_case(g, kernel.__name__, f"bf16-d{d}{'-causal' if causal else ''}",
                               config_label("GLUON_CONFIGS", {"BLOCK_M": bm, "BLOCK_N": bn, **kwargs}, options),
                               types=types, constexprs={"CAUSAL": causal, **kwargs, "num_warps": options["num_warps"]},
                               options=options, half_precision=True, must_fit=True, needs_mma=True, gluon=True))
    return cases


def cases():
    cases, groups = [], []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for family in (_forward, _backward):
                c, g = family(dtype, d)
                cases, groups = cases + c, groups + g
        cases += _merge(dtype, 80)
    for shape in DECODE_SHAPES:
        c, g = _decode(*shape)
        cases, groups = cases + c, groups + g
    return cases + _warp_specialised() + _gluon(), groups
