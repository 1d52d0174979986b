"""Triton kernels for the far part of linear attention, chunkwise (FlashLinearAttention / DeltaNet form).

The PyTorch side (`reference.py`) applies the feature map, appends the normaliser's column of ones to v and
pads the keys with zero keys so a causal query chunk c reads key chunk c + shift (see `pad_for_chunks`).
Three kernels then do the work, each reading a chunk of C keys as one (C × F) tile:

1. states: H[t] = state over key chunks < t, (F × V) per key head, float32. Additive rule: a running
   Kᵀ V sum, one program per (F block, V block, key head). Delta rule: `_delta_ut_kernel` first turns
   every chunk into its UT form (W, U) in parallel, then `_delta_states_kernel` walks the chunks in order,
   one program per (V block, key head), correcting the values u = U − W H[t] and adding Kᵀu.
2. output: one program per (V block, query chunk, query head): φ(Q_c) H[t] + (φ(Q_c) φ(K_t)ᵀ ⊙ tril) V_t,
   where V_t is v itself (additive) or the corrected values (delta); query heads read their group's key
   head (GQA without repeating K/V).

Backward recomputes the PyTorch chunked form through `torch.func.vjp`: exact for the function computed.
"""
from __future__ import annotations

import os

import torch

from .reference import far_chunked, pad_for_chunks

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; `runs_on` then says no
    triton = None


def runs_on(q: torch.Tensor) -> bool:
    """Whether the Triton path takes these inputs: CUDA tensors (or the interpreter), not float64."""
    if triton is None or q.dtype == torch.float64:
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def unit_lower_inverse(A, C: tl.constexpr, PRECISION: tl.constexpr):
        """(I + A)⁻¹ for A (C × C float32) strictly lower triangular, by block doubling: if X inverts I + A's
        diagonal blocks of size b, then X − X L X inverts its blocks of size 2b, where L keeps A's lower-left
        b × b block inside each 2b block (the 2 × 2 block formula [[X₁, 0], [−X₂ A₂₁ X₁, X₂]]). log2(C) − 1
        steps of two products each: block forward substitution on tensor cores instead of C − 1 serial row steps.
        C is a power of two from 16 to 128."""
        r = tl.arange(0, C)[:, None]
        c = tl.arange(0, C)[None, :]
        # size-2 blocks [[1, 0], [a, 1]] invert to [[1, 0], [-a, 1]]: the first step needs no product
        X = (r == c).to(tl.float32) - tl.where(((r >> 1) == (c >> 1)) & (r > c), A, 0.0)
        for s in tl.static_range(1, 7):
            if (1 << s) < C:
                L = tl.where(((r >> s) == (c >> s) + 1) & ((r >> (s + 1)) == (c >> (s + 1))), A, 0.0)
                X = X - tl.dot(X, tl.dot(L, X, input_precision=PRECISION), input_precision=PRECISION)
        return X

    @triton.jit
    def _add_states_kernel(K, Vals, H, N, F, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_c = tl.arange(0, C)
        offs_k = ik * BK + tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_k, mask_v = offs_k < F, offs_v < V
        k_base = K + bh.to(tl.int64) * N * C * F
        v_base = Vals + bh.to(tl.int64) * N * C * V
        h_base = H + bh.to(tl.int64) * (N + 1) * F * V
        h_ptrs = h_base + offs_k[:, None] * V + offs_v[None, :]
        h_mask = mask_k[:, None] & mask_v[None, :]
        h = tl.zeros((BK, BV), dtype=tl.float32)
        for t in range(N):
            tl.store(h_ptrs + t * F * V, h, mask=h_mask)
            rows = t * C + offs_c
            kt = tl.load(k_base + rows[:, None] * F + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            vt = tl.load(v_base + rows[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0)
            h += tl.dot(tl.trans(kt), vt)
        tl.store(h_ptrs + N * F * V, h, mask=h_mask)

    @triton.jit
    def _delta_ut_kernel(K, Vals, Beta, Wout, Uout, N, F, V, C: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr):
        t, bh = tl.program_id(0), tl.program_id(1)
        offs_c = tl.arange(0, C)
        rows = t * C + offs_c
        base = bh.to(tl.int64) * N * C
        beta = tl.load(Beta + base + rows).to(tl.float32)
        # A = tril(diag(β) K Kᵀ, −1), accumulated over feature blocks
        A = tl.zeros((C, C), dtype=tl.float32)
        for f0 in range(0, F, BK):
            offs_k = f0 + tl.arange(0, BK)
            kt = tl.load(K + (base + rows)[:, None] * F + offs_k[None, :], mask=offs_k[None, :] < F, other=0.0)
            A += tl.dot(kt, tl.trans(kt))
        lower = offs_c[:, None] > offs_c[None, :]
        A = tl.where(lower, A * beta[:, None], 0.0)
        T = unit_lower_inverse(A, C, "tf32x3") * beta[None, :]  # T = (I + A)⁻¹ diag(β), float32-accurate
        for f0 in range(0, F, BK):
            offs_k = f0 + tl.arange(0, BK)
            kt = tl.load(K + (base + rows)[:, None] * F + offs_k[None, :], mask=offs_k[None, :] < F, other=0.0)
            w = tl.dot(T, kt.to(tl.float32))
            tl.store(Wout + (base + rows)[:, None] * F + offs_k[None, :], w, mask=offs_k[None, :] < F)
        for v0 in range(0, V, BV):
            offs_v = v0 + tl.arange(0, BV)
            vt = tl.load(Vals + (base + rows)[:, None] * V + offs_v[None, :], mask=offs_v[None, :] < V, other=0.0)
            u = tl.dot(T, vt.to(tl.float32))
            tl.store(Uout + (base + rows)[:, None] * V + offs_v[None, :], u, mask=offs_v[None, :] < V)

    @triton.jit
    def _delta_states_kernel(K, Wt, Ut, H, Unew, N, F, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        iv, bh = tl.program_id(0), tl.program_id(1)
        offs_c = tl.arange(0, C)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        base = bh.to(tl.int64) * N * C
        h_base = H + bh.to(tl.int64) * (N + 1) * F * V
        for t in range(N):
            rows = base + t * C + offs_c
            u = tl.load(Ut + rows[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0)
            for f0 in range(0, F, BK):
                offs_k = f0 + tl.arange(0, BK)
                mask_k = offs_k < F
                w = tl.load(Wt + rows[:, None] * F + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                h = tl.load(h_base + t * F * V + offs_k[:, None] * V + offs_v[None, :],
                            mask=mask_k[:, None] & mask_v[None, :], other=0.0)
                u -= tl.dot(w, h)
            tl.store(Unew + rows[:, None] * V + offs_v[None, :], u, mask=mask_v[None, :])
            for f0 in range(0, F, BK):
                offs_k = f0 + tl.arange(0, BK)
                mask_k = offs_k < F
                h_ptrs = h_base + offs_k[:, None] * V + offs_v[None, :]
                h_mask = mask_k[:, None] & mask_v[None, :]
                kt = tl.load(K + rows[:, None] * F + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                h = tl.load(h_ptrs + t * F * V, mask=h_mask, other=0.0)
                h += tl.dot(tl.trans(kt.to(tl.float32)), u)
                tl.store(h_ptrs + (t + 1) * F * V, h, mask=h_mask)
            # the next chunk reads H[t + 1] through other threads' lanes: make this chunk's stores visible
            tl.debug_barrier()

    @triton.jit
    def _output_kernel(Q, K, Vals, H, O, N, NQ, F, V, G, shift, C: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr):
        iv, c, bhq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bkv = bhq // G
        offs_c = tl.arange(0, C)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        q_rows = bhq.to(tl.int64) * NQ * C + c * C + offs_c
        t = c + shift  # the key chunk this query chunk reads causally (>= N: every key; < 0: none)
        acc = tl.zeros((C, BV), dtype=tl.float32)
        if t >= 0:
            tt = tl.minimum(t, N)
            k_rows = bkv.to(tl.int64) * N * C + t * C + offs_c
            h_base = H + (bkv.to(tl.int64) * (N + 1) + tt) * F * V
            scores = tl.zeros((C, C), dtype=tl.float32)
            for f0 in range(0, F, BK):
                offs_k = f0 + tl.arange(0, BK)
                mask_k = offs_k < F
                qt = tl.load(Q + q_rows[:, None] * F + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                h = tl.load(h_base + offs_k[:, None] * V + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :],
                            other=0.0)
                acc += tl.dot(qt, h.to(qt.dtype))
                if t < N:
                    kt = tl.load(K + k_rows[:, None] * F + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                    scores += tl.dot(qt, tl.trans(kt))
            if t < N:
                scores = tl.where(offs_c[:, None] >= offs_c[None, :], scores, 0.0)
                vt = tl.load(Vals + k_rows[:, None] * V + offs_v[None, :], mask=mask_v[None, :], other=0.0)
                acc += tl.dot(scores.to(vt.dtype), vt)
        tl.store(O + q_rows[:, None] * V + offs_v[None, :], acc, mask=mask_v[None, :])


# Register spill (bytes) that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90: the
# delta rule's UT and state kernels keep a C x BV float32 tile per correction live (72 and 64-192 bytes measured on
# Triton 3.6 and 3.9), bounded so that it cannot grow unnoticed; none elsewhere.
SPILL_LIMITS = {"*": 0, "_delta_ut_kernel": 72, "_delta_states_kernel": 192}


def _blocks(F: int, V: int):
    BK = min(64, max(16, triton.next_power_of_2(F)))
    BV = min(128, max(16, triton.next_power_of_2(V)))
    return BK, BV


def _far_forward(fq, fk, vals, beta, causal, offset, update_rule, chunk, kernel_dtype):
    """Launch the kernels; fq (B, Hq, Sq, F), fk (B, Hkv, L, F), vals (B, Hkv, L, V) -> (B, Hq, Sq, V) float32."""
    B, Hq, Sq, Fd = fq.shape
    Hkv, V = fk.shape[1], vals.shape[-1]
    G = Hq // Hkv
    fk, vals, beta, shift = pad_for_chunks(fk, vals, beta, causal=causal, offset=offset, chunk=chunk)
    N = fk.shape[2] // chunk
    nq = -(-Sq // chunk)
    if not causal:
        shift = N  # every query chunk reads the state after all keys and no intra-chunk part
    fq = torch.nn.functional.pad(fq, (0, 0, 0, nq * chunk - Sq)).to(kernel_dtype).contiguous()
    fk = fk.to(kernel_dtype).contiguous()
    BK, BV = _blocks(Fd, V)
    H = torch.zeros(B * Hkv, N + 1, Fd, V, dtype=torch.float32, device=fq.device)
    if update_rule == "add":
        vals = vals.to(kernel_dtype).contiguous()
        _add_states_kernel[(triton.cdiv(Fd, BK), triton.cdiv(V, BV), B * Hkv)](
            fk, vals, H, N, Fd, V, C=chunk, BK=BK, BV=BV)
        intra_vals = vals
    else:
        vals = vals.to(kernel_dtype).contiguous()
        beta = beta.to(torch.float32).contiguous()
        Wt = torch.empty(B * Hkv, N * chunk, Fd, dtype=torch.float32, device=fq.device)
        Ut = torch.empty(B * Hkv, N * chunk, V, dtype=torch.float32, device=fq.device)
        _delta_ut_kernel[(N, B * Hkv)](fk, vals, beta, Wt, Ut, N, Fd, V, C=chunk, BK=BK, BV=BV)
        intra_vals = torch.empty_like(Ut)
        _delta_states_kernel[(triton.cdiv(V, BV), B * Hkv)](fk, Wt, Ut, H, intra_vals, N, Fd, V, C=chunk,
                                                              BK=BK, BV=BV)
    out = torch.empty(B, Hq, nq * chunk, V, dtype=torch.float32, device=fq.device)
    _output_kernel[(triton.cdiv(V, BV), nq, B * Hq)](fq, fk, intra_vals, H, out, N, nq, Fd, V, G, shift,
                                                      C=chunk, BK=BK, BV=BV)
    return out[:, :, :Sq]


class _FarChunked(torch.autograd.Function):
    """Forward by the Triton kernels, backward by the PyTorch chunked form under torch.func.vjp."""

    @staticmethod
    def forward(fq, fk, vals, beta, causal, offset, update_rule, chunk, kernel_dtype):
        return _far_forward(fq, fk, vals, beta, causal, offset, update_rule, chunk, kernel_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, vals, beta, causal, offset, update_rule, chunk, _ = inputs
        ctx.save_for_backward(fq, fk, vals, beta)
        ctx.options = dict(causal=causal, offset=offset, update_rule=update_rule, chunk=chunk)
        ctx.has_beta = beta is not None

    @staticmethod
    def backward(ctx, grad_out):
        fq, fk, vals, beta = ctx.saved_tensors
        opts = ctx.options
        if ctx.has_beta:
            _, vjp = torch.func.vjp(lambda a, b, c, d: far_chunked(a, b, c, d, **opts), fq, fk, vals, beta)
            return (*vjp(grad_out.to(fq.dtype)), None, None, None, None, None)
        _, vjp = torch.func.vjp(lambda a, b, c: far_chunked(a, b, c, None, **opts), fq, fk, vals)
        return (*vjp(grad_out.to(fq.dtype)), None, None, None, None, None, None)


def far_chunked_triton(fq, fk, vals, beta, *, causal, offset, update_rule, chunk, input_dtype=torch.float32):
    """Drop-in for `reference.far_chunked` (its contract), computed by the Triton kernels.

    The kernels read features and values in bfloat16 when the site runs in bfloat16 (tensor cores, half the
    bytes; the state stays float32) and in float32 otherwise: float16 cannot hold Σφ(k) over long contexts.
    Chunk sizes other than 16, 32, 64 or 128 run the PyTorch form.
    """
    if chunk not in (16, 32, 64, 128):
        return far_chunked(fq, fk, vals, beta, causal=causal, offset=offset, update_rule=update_rule, chunk=chunk)
    kernel_dtype = torch.bfloat16 if input_dtype == torch.bfloat16 else torch.float32
    return _FarChunked.apply(fq, fk, vals, beta, causal, offset, update_rule, chunk, kernel_dtype)
