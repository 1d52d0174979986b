"""Forward flash attention in Triton: one program per (query block, batch·query head).

Each program keeps its query tile in registers and streams K/V tiles through an online softmax
(FlashAttention-2): running row max m, denominator l and an unnormalised fp32 accumulator,
rescaled by 2^(m_old - m_new) when the max grows. Scores are kept in base 2 (the scale is
multiplied by log2(e)) so the exponentials are exp2, one instruction each.

Key tiles fall in two ranges so that the hot loop carries no masking work:
  [0, full)  tiles every row of the block sees completely (no causal cut, inside Sk);
  [full, hi) tiles cut by the causal diagonal or by the end of the keys: masked.
Tiles past `hi` (above the diagonal) are never loaded.

GQA: query head h reads key/value head h // group through its strides (no repeat).
attn_mask is read through its own strides, so broadcast dimensions (stride 0) cost nothing.
The head dim is padded to a power of two with masked loads (80 -> 128, 24 -> 32).
"""
from __future__ import annotations

import functools
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without triton; __init__ falls back to the reference
    triton = None
try:
    from triton.runtime.errors import OutOfResources
except ImportError:
    OutOfResources = RuntimeError
try:  # host-side TMA descriptors (Triton >= 3.4); without them the pointer path runs everywhere
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Register spill that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90, per kernel:
# no bound on the forward kernel. The autotuner times each config on the GPU, so one that spills merely loses
# (tuned configs spill 0-400 bytes at d128 on Triton 3.6 and 3.9); the fallback chain is there to fit, not to be fast.
SPILL_LIMITS = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    """Autotune on a real GPU unless LONGATTN_FLASH_AUTOTUNE=0 (tests: one compile per variant)."""
    return not interpreting() and os.environ.get("LONGATTN_FLASH_AUTOTUNE", "1") != "0"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: three-pass tf32 (about fp32 accuracy; one tf32 pass misses 1e-3 relative error).
    Half inputs ignore it."""
    return "tf32x3" if dtype == torch.float32 else None


def padded_dim(d: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(d))


if triton is not None:

    @triton.jit
    def _load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
        """Load a tile, masking only along the dimensions that can run past the tensor."""
        if CHECK_ROWS and CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        elif CHECK_ROWS:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        elif CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def additive_mask_base2(m):
        """A float mask in base-2 units (times log2 e). The dtype minimum that HF fills masked positions with
        (-3.4e38) would overflow to -inf there, and a row masked throughout would give 0 instead of the uniform
        mean: finite values are first held above -2.3e38 (x log2 e = -3.3e38, still finite). -inf stays -inf."""
        m = m.to(tl.float32)
        return tl.where(m == float("-inf"), m, tl.maximum(m, -2.3e38)) * 1.4426950408889634

    @triton.jit
    def _score_bias(qk, mask_ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr,
                    MASK_IS_BOOL: tl.constexpr):
        """Apply attn_mask to base-2 scores: bool masks cut to -inf, float masks add (`additive_mask_base2`)."""
        m = _load_2d(mask_ptrs, rows_ok, cols_ok, CHECK_ROWS, CHECK_COLS)
        if MASK_IS_BOOL:
            qk = tl.where(m != 0, qk, float("-inf"))
        else:
            qk = qk + additive_mask_base2(m)
        return qk

    @triton.jit
    def softmax_step(qk, m_i, l_i, acc, tile_scale, GUARD: tl.constexpr):
        """One online-softmax step over a tile of scores qk (base 2 once multiplied by tile_scale > 0): the
        tile's probabilities p, the new running max, and l and acc rescaled to it (p·V not yet added).
        GUARD: a row may have seen no key yet and keep m = -inf; subtract 0 then (avoids -inf - -inf)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1) * tile_scale)
        if GUARD:
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(qk * tile_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]

    @triton.jit
    def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_row0, mask_base, offs_m, lo, hi,
                   stride_kn, stride_vn, stride_mask_n, qk_scale, Sq, Sk, causal_offset,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   MASK_IS_BOOL: tl.constexpr, EVEN_M: tl.constexpr, USE_TMA: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        d_ok = offs_d < HEAD_DIM
        dv_ok = offs_dv < DV
        rows_ok = offs_m < Sq
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            cols_ok = cols < Sk
            if USE_TMA:
                # the copy engine reads the tile; rows past this head's keys are masked below (p = 0)
                k = k_desc.load([kv_row0 + start_n, 0])
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            else:
                # K loaded transposed (HEAD_DIM_PAD, BLOCK_N): the product below is a plain q @ kT
                kt = _load_2d(k_base + offs_d[:, None] + cols[None, :] * stride_kn, d_ok, cols_ok,
                              HEAD_DIM != HEAD_DIM_PAD, MASKED)
                qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
            if HAS_MASK:
                qk = _score_bias(qk * qk_scale, mask_base + cols[None, :] * stride_mask_n, rows_ok, cols_ok,
                                 not EVEN_M, MASKED, MASK_IS_BOOL)
                tile_scale = 1.0
            else:
                # scale folded into the exponent: one FMA per score (qk_scale > 0, so max commutes)
                tile_scale = qk_scale
            if MASKED:
                keep = cols_ok[None, :]
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + causal_offset)
                qk = tl.where(keep, qk, float("-inf"))
            p, m_new, l_i, acc = softmax_step(qk, m_i, l_i, acc, tile_scale, MASKED or HAS_MASK)
            if USE_TMA:
                v = v_desc.load([kv_row0 + start_n, 0])
            else:
                v = _load_2d(v_base + cols[:, None] * stride_vn + offs_dv[None, :], cols_ok, dv_ok,
                             MASKED, DV != DV_PAD)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _flash_fwd_kernel(
        Q, K, V, K_desc, V_desc, Mask, Out, Lse,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_ob, stride_oh, stride_om,
        Hq, Sq, Sk, GROUP, qk_scale, causal_offset,
        SQ_BUCKET, SK_BUCKET,  # autotune keys only: one tuning per power-of-two length
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
        TMA_OK: tl.constexpr, DOT_PRECISION: tl.constexpr,  # TMA_OK: read by the config pruner only
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    ):
        num_m = tl.cdiv(Sq, BLOCK_M)
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = num_m - 1 - pid_m  # longest rows first: better tail balance under causal
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // GROUP
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        rows_ok = offs_m < Sq

        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], rows_ok, offs_d < HEAD_DIM,
                     not EVEN_M, HEAD_DIM != HEAD_DIM_PAD)
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + offs_m[:, None] * stride_mm
        kv_row0 = (b * (Hq // GROUP) + hk) * Sk  # first row of this kv head in the (B·Hkv·Sk, D) TMA view

        # key ranges: [0, full) unmasked, [full, hi) masked (see module docstring)
        if CAUSAL:
            hi = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), Sk)
            full = tl.maximum(m0 + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
            full = tl.minimum(full, hi)
        else:
            hi = Sk
            full = Sk
        if not EVEN_N:
            full = tl.minimum(full, Sk // BLOCK_N * BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, kv_row0, mask_base, offs_m, 0, full,
                                   stride_kn, stride_vn, stride_mn, qk_scale, Sq, Sk, causal_offset,
                                   HEAD_DIM, HEAD_DIM_PAD, DV, DV_PAD, BLOCK_N, False, CAUSAL, HAS_MASK,
                                   MASK_IS_BOOL, EVEN_M, USE_TMA, DOT_PRECISION)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, kv_row0, mask_base, offs_m, full, hi,
                                   stride_kn, stride_vn, stride_mn, qk_scale, Sq, Sk, causal_offset,
                                   HEAD_DIM, HEAD_DIM_PAD, DV, DV_PAD, BLOCK_N, True, CAUSAL, HAS_MASK,
                                   MASK_IS_BOOL, EVEN_M, USE_TMA, DOT_PRECISION)

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        o_ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :]
        out = out.to(Out.dtype.element_ty)
        if EVEN_M and DV == DV_PAD:
            tl.store(o_ptrs, out)
        else:
            tl.store(o_ptrs, out, mask=rows_ok[:, None] & (offs_dv < DV)[None, :])
        lse_ptrs = Lse + pid_bh.to(tl.int64) * Sq + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=rows_ok)

    def _even_heuristics(kernel):
        return triton.heuristics({
            "EVEN_M": lambda a: a["Sq"] % a["BLOCK_M"] == 0,
            "EVEN_N": lambda a: a["Sk"] % a["BLOCK_N"] == 0,
        })(kernel)

    def _prune_by_shared_memory(configs, named_args, **kwargs):
        """Drop configs whose K/V pipeline cannot fit Hopper's 228 KB of shared memory, and TMA
        configs where the inputs do not allow TMA."""
        args = {**named_args, **kwargs}
        d, dv = args["HEAD_DIM_PAD"], args["DV_PAD"]
        elem = args["Q"].element_size()
        kept = []
        for c in configs:
            if c.kwargs["USE_TMA"] and not args["TMA_OK"]:
                continue
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            smem = elem * (bm * d + max(c.num_stages - 1, 1) * bn * (d + dv))
            if smem <= 200 * 1024 and not (d >= 256 and bm * bn > 128 * 64):
                kept.append(c)
        return kept or configs[-1:]

    def _set_tma_block_shapes(nargs):
        """Config pre-hook: the descriptors' tile shape follows the config's BLOCK_N."""
        if nargs.get("USE_TMA"):
            nargs["K_desc"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
            nargs["V_desc"].block_shape = [nargs["BLOCK_N"], nargs["DV"]]

    # Hopper: 128-row query tiles feed wgmma; 64/128 key tiles, 2-4 stages of cp.async, or the same
    # tiles read by the copy engine (TMA). The autotuner picks per shape; the pruner drops TMA
    # configs where the inputs do not allow it. (64, 32, 4, 2) is the fallback that fits any GPU.
    FWD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=s,
                      pre_hook=_set_tma_block_shapes)
        for bm, bn, w, s, tma in [
            (128, 128, 8, 3, False), (128, 64, 4, 4, False), (128, 64, 4, 3, False), (128, 64, 8, 3, False),
            (128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True),
            (128, 64, 8, 3, True), (64, 64, 4, 3, False), (64, 32, 4, 2, False),
        ]
    ]
    INTERPRETER_FWD_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "USE_TMA": False, "num_warps": 4, "num_stages": 1}

    _fwd_heuristic = _even_heuristics(_flash_fwd_kernel)
    _fwd_tuned = triton.autotune(
        configs=FWD_CONFIGS,
        # TMA_OK: the pruner keeps TMA configs only where the inputs allow them
        key=["SQ_BUCKET", "SK_BUCKET", "HEAD_DIM_PAD", "DV_PAD", "CAUSAL", "HAS_MASK", "MASK_IS_BOOL", "TMA_OK"],
        prune_configs_by={"early_config_prune": _prune_by_shared_memory},
    )(_fwd_heuristic)


def default_fwd_config(head_dim_pad: int, element_size: int = 2) -> dict:
    """The config used without autotuning; `fallback_configs` shrinks it where it does not fit."""
    if interpreting():
        return INTERPRETER_FWD_CONFIG
    if element_size > 2:  # fp32 tiles take twice the registers and shared memory
        return {"BLOCK_M": 64, "BLOCK_N": 32 if head_dim_pad >= 128 else 64, "USE_TMA": False,
                "num_warps": 4, "num_stages": 2}
    if head_dim_pad <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "USE_TMA": False, "num_warps": 4, "num_stages": 3}
    if head_dim_pad <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "USE_TMA": False, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "USE_TMA": False, "num_warps": 4, "num_stages": 2}


def fallback_configs(first: dict) -> list[dict]:
    """`first`, then ever smaller tiles with fewer stages: the first that compiles runs."""
    chain = [dict(first)]
    bm, bn = first["BLOCK_M"], first["BLOCK_N"]
    while bm > 16 or bn > 16:
        bm, bn = (bm, max(bn // 2, 16)) if bn > bm // 2 and bn > 16 else (max(bm // 2, 16), bn)
        chain.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1,
                      **({"USE_TMA": False} if "USE_TMA" in first else {})})
    return chain


def launch_first_that_fits(kernel, grid, args, meta, configs: list[dict]):
    """Launch `kernel` with the first config that fits the GPU (shared memory / registers)."""
    error = None
    for cfg in configs:
        try:
            kernel[grid(cfg)](*args, **meta, **cfg)
            return cfg
        except OutOfResources as e:  # compile-time: nothing ran, so retrying is safe
            error = e
    raise error


@functools.lru_cache(maxsize=16)
def _compute_capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def tma_allowed(k: torch.Tensor, v: torch.Tensor) -> bool:
    """TMA reads K/V as one (B·Hkv·Sk, D) matrix: contiguous, power-of-two head dims, Hopper or newer."""
    if TensorDescriptor is None or interpreting() or not k.is_cuda:
        return False
    if os.environ.get("LONGATTN_FLASH_TMA", "1") == "0":
        return False
    d, dv = k.shape[-1], v.shape[-1]
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0
    return (k.is_contiguous() and v.is_contiguous() and pow2(d) and pow2(dv) and d <= 256 and dv <= 256
            and _compute_capability(k.device.index if k.device.index is not None else 0) >= 9)


_context_bound = threading.local()


def bind_cuda_context(device: torch.device) -> None:
    """Host TMA descriptors are encoded through the CUDA driver, which needs the thread's context
    current. Autograd's backward thread may not have it yet (Triton binds it only at launch, after
    encoding the descriptors), so one runtime call per thread binds the primary context."""
    bound = _context_bound.__dict__.setdefault("devices", set())
    if device.type == "cuda" and device.index not in bound:
        torch.cuda.current_stream(device).query()
        bound.add(device.index)


def mask_as_4d(attn_mask: torch.Tensor | None, B: int, Hq: int, Sq: int, Sk: int, where: str):
    """View attn_mask as (B, Hq, Sq, Sk) with stride 0 on broadcast dims (no copy); bool -> uint8 view."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dim() > 4:
        raise ValueError(f"{where}: attn_mask must have at most 4 dims, got shape {tuple(m.shape)}")
    try:
        m = m.expand(B, Hq, Sq, Sk)
    except RuntimeError:
        raise ValueError(f"{where}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(B, Hq, Sq, Sk) = {(B, Hq, Sq, Sk)}") from None
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return m


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """Host TMA descriptors reading K and V as (B·Hkv·Sk, D) matrices in tiles of block_n rows."""
    bind_cuda_context(k.device)
    rows, d, dv = k.shape[0] * k.shape[1] * k.shape[2], k.shape[-1], v.shape[-1]
    return (TensorDescriptor(k, [rows, d], [d, 1], [block_n, d]),
            TensorDescriptor(v, [rows, dv], [dv, 1], [block_n, dv]))


class ChosenConfigs:
    """Triton's autotuner for the first call of each key, then the config it chose launched on the plain
    kernel. Its wrappers (autotuner, heuristics) cost about a quarter of an eager call's host time
    (cProfile on the H200's host, 1K tokens: ~60 of ~250 µs). The key must hold everything the tuner's
    key and pruning see."""

    def __init__(self, tuned, kernel):
        self.tuned, self.kernel, self.chosen, self.lock = tuned, kernel, {}, threading.Lock()

    def launch(self, key, grid, args_for, meta, lengths=None, fallback=None) -> None:
        """`args_for(cfg)`: the positional arguments for a chosen config, or for the tuner (cfg None).
        `lengths` (Sq, Sk): set EVEN_M / EVEN_N as the kernels' heuristics would. `fallback()`: launches with
        smaller tiles and returns the config it used, for keys where no tuned config fits the GPU (the tuner
        skips configs that do not fit, then raises when none does); that config is kept for the key."""
        cfg = self.chosen.get(key)
        if cfg is None:
            with self.lock:  # best_config is the tuner's last choice: read it before another call tunes
                try:
                    self.tuned[grid](*args_for(None), **meta)
                except OutOfResources:  # compile-time: nothing ran, so the fallback may launch
                    if fallback is None:
                        raise
                    self.chosen[key] = fallback()
                    return
                best = getattr(self.tuned, "best_config", None)
                if best is not None:
                    self.chosen[key] = best.all_kwargs()
            return
        launch_with(self.kernel, grid, args_for(cfg), meta, cfg, lengths)


def launch_with(kernel, grid, args, meta, cfg: dict, lengths=None) -> None:
    """`kernel` (without the heuristics wrapper) with config `cfg`; lengths (Sq, Sk) set EVEN_M / EVEN_N."""
    even = {} if lengths is None else {"EVEN_M": lengths[0] % cfg["BLOCK_M"] == 0,
                                       "EVEN_N": lengths[1] % cfg["BLOCK_N"] == 0}
    kernel[grid(cfg)](*args, **meta, **cfg, **even)


_fwd_chosen = ChosenConfigs(_fwd_tuned, _flash_fwd_kernel) if triton is not None else None


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_forward(q, k, v, scale: float, causal: bool, attn_mask=None, config: dict | None = None):
    """Launch the forward kernel. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), one dtype
    among fp16/bf16/fp32; attn_mask bool or float, broadcastable to (B, Hq, Sq, Sk).
    scale must be > 0 (it is folded into the exponent). `config` (BLOCK_M, BLOCK_N, USE_TMA, num_warps,
    num_stages) bypasses the autotuner. Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty(B, Hq, Sq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if Sq == 0 or B * Hq == 0:
        return out, lse
    mask = mask_as_4d(attn_mask, B, Hq, Sq, Sk, "flash_attention")
    mask_arg = mask if mask is not None else q  # never read when HAS_MASK is False
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    tma_ok = tma_allowed(k, v)
    kv_desc = lambda block_n: _kv_descriptors(k, v, block_n) if tma_ok else (k, v)
    buckets = (triton.next_power_of_2(Sq), triton.next_power_of_2(max(Sk, 1)))
    args = lambda descs: (q, k, v, *descs, mask_arg, out, lse,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3],
                          Hq, Sq, Sk, Hq // Hkv, scale * LOG2E, Sk - Sq, *buckets)
    meta = dict(HEAD_DIM=D, HEAD_DIM_PAD=padded_dim(D), DV=Dv, DV_PAD=padded_dim(Dv), CAUSAL=bool(causal),
                HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.uint8,
                TMA_OK=tma_ok, DOT_PRECISION=dot_precision(q.dtype))
    grid = lambda c: (triton.cdiv(Sq, c["BLOCK_M"]), B * Hq)

    def args_for(cfg):
        """The tuner (cfg None) gets descriptors wherever TMA is allowed (its pre-hook sets their tiles);
        a chosen config only when it reads through TMA."""
        if cfg is None:
            return args(kv_desc(16))
        return args(kv_desc(cfg["BLOCK_N"]) if cfg["USE_TMA"] else (k, v))

    if config is not None:
        if config["USE_TMA"] and not tma_ok:
            raise ValueError(f"flash_forward: config {config} asks for TMA, which these inputs do not allow")
        launch_with(_flash_fwd_kernel, grid, args_for(config), meta, dict(config), (Sq, Sk))
        return out, lse
    first = default_fwd_config(max(meta["HEAD_DIM_PAD"], meta["DV_PAD"]), q.element_size())
    shrink = lambda: launch_first_that_fits(_fwd_heuristic, grid, args((k, v)), meta, fallback_configs(first))
    if autotuning():  # no tuned config fits (e.g. fp32 with d256): shrink
        _fwd_chosen.launch((q.device.index, q.dtype, *buckets, *meta.values()), grid, args_for, meta, (Sq, Sk),
                           fallback=shrink)
    else:
        shrink()
    return out, lse
