"""Forward flash attention for Hopper with warp specialisation: a producer warp group feeds the copy
engine (TMA) while two consumer warp groups, 64 query rows each, run the matmuls and the softmax.

Triton 3.6 builds this from `tl.range(..., warp_specialize=True)` when every tile the loop reads comes
through a tensor descriptor built on the device, Q included, and the loop is the kernel's only one
(Triton 3.9's pass fails on it: the launch then falls back, see `flash_forward_ws`). Hence one loop:
under causal, and where the keys end inside a tile, each score is compared with its row's last visible
key (one compare and select per score, no branch: a branch in the loop turns the specialisation off). K and V come through 4-d (B, H, S, D) descriptors on their own strides, so
transposed layouts and GQA need no copy, and the copy engine zero-fills reads past a head's last row;
Q through a 2-d one on a contiguous copy (a 4-d Q descriptor hung the GPU).

Measured on an H200 (`benchmarks/results/2026-12-04-h200-flash.md`): 4–11% faster than the pointer
kernel at d128 non-causal (8K–131K), no faster at d64 or under causal. Where this path does not apply
(causal, masks, fp32, head dims other than 128, unaligned K/V, GPUs other than Hopper) `triton_fwd` runs.
Two stages only: with three, Triton 3.6 built a kernel that returned NaN in the probe.
"""
from __future__ import annotations

import functools
import os

import torch

from .triton_fwd import LOG2E, OutOfResources, _compute_capability, interpreting, triton

if triton is not None:
    import triton.language as tl

    from .triton_fwd import softmax_step

    @triton.jit
    def _flash_fwd_ws_kernel(
        Q, K, V, Out, Lse,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        B, Hq, Hkv, Sq, Sk, qk_scale, causal_offset,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
    ):
        num_m = tl.cdiv(Sq, BLOCK_M)
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = num_m - 1 - pid_m  # longest rows first: better tail balance
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // (Hq // Hkv)
        m0 = pid_m * BLOCK_M

        # Q as one (B·Hq·Sq, D) matrix: a 4-d Q descriptor hung the GPU (Triton 3.6, H200). Rows past Sq
        # belong to the next head or are zero-filled; they are computed but never stored.
        q_desc = tl.make_tensor_descriptor(Q, [B * Hq * Sq, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(K, [B, Hkv, Sk, HEAD_DIM], [stride_kb, stride_kh, stride_kn, 1],
                                           [1, 1, BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(V, [B, Hkv, Sk, HEAD_DIM], [stride_vb, stride_vh, stride_vn, 1],
                                           [1, 1, BLOCK_N, HEAD_DIM])
        q = q_desc.load([pid_bh * Sq + m0, 0])

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        if CAUSAL:
            hi = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), Sk)
            last = tl.minimum(offs_m + causal_offset, Sk - 1)  # each row's last visible key
        else:
            hi = Sk
            last = tl.zeros([BLOCK_M], tl.int32) + (Sk - 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPEC):
            k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            qk = tl.dot(q, k.T)
            if CAUSAL or not EVEN_N:
                qk = tl.where((start_n + offs_n)[None, :] <= last[:, None], qk, float("-inf"))
            p, m_new, l_i, acc = softmax_step(qk, m_i, l_i, acc, qk_scale, CAUSAL)
            v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        # stored through pointers: a 4-d descriptor store stops Triton 3.6's data partitioning
        rows_ok = offs_m < Sq
        o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
                  + tl.arange(0, HEAD_DIM)[None, :])
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None])
        tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=rows_ok)

# Measured tiles (H200, triton 3.6): 128 x 128, two stages; 4 warps per group (12 in all).
WS_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
INTERPRETER_WS_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
WS_HEAD_DIMS = (128,)  # d64 measured no faster (the probe in the results file)
# Causal measured −6% … +11% against the pointer kernel (1K–131K, mean +0.3%): the per-score compare runs
# on every tile here, on the diagonal tiles only there. So causal stays on the pointer kernel.
WS_CAUSAL = False
SPILL_LIMITS = {"_flash_fwd_ws_kernel": 0}  # register spill the compile gate allows (tests/kernels/compile_gate.py)


@functools.lru_cache(maxsize=None)
def _hopper_with_warp_specialisation(device_index: int) -> bool:
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    return _compute_capability(device_index) == 9 and version >= (3, 6)


def _aligned(t: torch.Tensor) -> bool:
    """What a TMA descriptor needs: 16-byte base and strides (the last stride 1)."""
    e = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:-1])


def ws_applies(q, k, v, attn_mask, causal: bool) -> bool:
    """The warp-specialised kernel computes this call: no mask, not causal, fp16/bf16, a head dim it was
    measured faster at, TMA-aligned K/V, a Hopper GPU (or the interpreter, for the tests)."""
    if triton is None or attn_mask is not None or os.environ.get("LONGATTN_FLASH_WS", "1") == "0":
        return False
    if causal and not WS_CAUSAL:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = q.shape[-1]
    if not (d in WS_HEAD_DIMS and k.shape[-1] == d and v.shape[-1] == d):
        return False
    if interpreting():
        return q.device.type == "cpu"
    if not q.is_cuda or not _hopper_with_warp_specialisation(q.device.index or 0):
        return False
    return all(_aligned(t) for t in (k, v)) and (not q.is_contiguous() or _aligned(q))  # q is copied if strided


_broken: set = set()  # (causal, head dim, dtype) whose build failed: never retried


def flash_forward_ws(q, k, v, scale: float, causal: bool, config: dict | None = None):
    """(out, lse) as `triton_fwd.flash_forward` returns them, or None when this build of Triton cannot
    compile the kernel for these arguments (the caller then runs the pointer kernel)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    key = (bool(causal), D, q.dtype)
    if key in _broken:
        return None
    cfg = dict(config or (INTERPRETER_WS_CONFIG if interpreting() else WS_CONFIG))
    out = torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if Sq == 0 or B * Hq == 0:
        return out, lse
    if Sk == 0:  # no key: nothing to read; the rows see nothing
        return out.zero_(), lse.fill_(float("-inf"))
    if not interpreting():
        _ensure_allocator()
    q = q.contiguous()  # the kernel reads Q as one matrix; a copy costs ~1% of the attention at 8K
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * Hq)
    try:
        _flash_fwd_ws_kernel[grid](
            q, k, v, out, lse, *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            B, Hq, Hkv, Sq, Sk, scale * LOG2E, Sk - Sq,
            HEAD_DIM=D, CAUSAL=bool(causal), EVEN_N=Sk % cfg["BLOCK_N"] == 0, WARP_SPEC=not interpreting(),
            **cfg)
    except (RuntimeError, OutOfResources) as e:  # a compile failure (Triton's passes, resources): nothing ran
        if not isinstance(e, OutOfResources) and "PassManager" not in str(e):
            raise
        _broken.add(key)
        return None
    return out, lse


def _ensure_allocator():
    """Device-built descriptors need scratch memory from Triton's allocator; set a torch-backed one
    unless the application set its own."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
