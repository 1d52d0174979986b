"""Triton forward of the hybrid's exact part: softmax pieces over the sink keys and the local window.

One program per (block of BM queries, query head) streams the sink keys [0, sink) and then the window keys
(p − W, p] ∩ [sink, Sk) of its rows with an online softmax (FlashAttention), never touching other keys,
and writes what `reference.exact_part` returns: the row max m (−inf where a row has no exact key),
l = Σ exp(s − m) and acc = Σ exp(s − m) v, all float32. Work per query: (sinks + W + BM) · D.
Backward: `_exact_dq_kernel` (per query block, the same key blocks) and `_exact_dkv_kernel` (per key block,
the query blocks that can see it, looping over the key head's query heads), recomputing
p = e^{s − m} from the forward's m: dv = pᵀ dacc, ds = p ⊙ (dacc vᵀ + dl), dq = ds k·scale, dk = dsᵀ q·scale.
Under torch.func transforms (the dispatcher's backward) it recomputes `reference.exact_part` instead.
"""
from __future__ import annotations

import torch

from .reference import exact_part
from .triton_additive import rows_addressable

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _softmax_block(q, K, V, j, valid, sk_s, sv_s, offs_d, offs_v, D, Dv, BF16: tl.constexpr):
        """Scores of the BM query rows against the keys j, and those keys' values."""
        kt = tl.load(K + j[:, None] * sk_s + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D),
                     other=0.0)
        vt = tl.load(V + j[:, None] * sv_s + offs_v[None, :], mask=valid[:, None] & (offs_v[None, :] < Dv),
                     other=0.0)
        if BF16:
            s = tl.dot(q.to(tl.bfloat16), tl.trans(kt.to(tl.bfloat16)))
        else:
            s = tl.dot(q, tl.trans(kt.to(tl.float32)))
        return s, vt

    @triton.jit
    def _update(s, keep, vt, m, l, acc, BF16: tl.constexpr):
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: any finite reference
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, 1)
        if BF16:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), vt.to(tl.bfloat16))
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32))
        return m_new, l, acc

    @triton.jit
    def _exact_kernel(Q, K, V, M_OUT, L_OUT, ACC_OUT, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                      Hq, G, Sq, Sk, D, Dv, sink, W, scale, CAUSAL: tl.constexpr, BF16: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        im, bhq = tl.program_id(0), tl.program_id(1)
        b, hq = bhq // Hq, bhq % Hq
        hk = hq // G
        i = im * BM + tl.arange(0, BM)
        mask_i = i < Sq
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        offs_n = tl.arange(0, BN)
        q = tl.load(Q + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + i[:, None] * sq_s + offs_d[None, :],
                    mask=mask_i[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
        k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        if CAUSAL:
            p = i + (Sk - Sq)  # each row's key position
        else:
            p = i * 0 + (Sk - 1)
        m = tl.full((BM,), float("-inf"), tl.float32)
        l = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, BDV), dtype=tl.float32)
        n_sink = tl.minimum(sink, Sk)
        for n0 in range(0, n_sink, BN):
            j = n0 + offs_n
            valid = j < n_sink
            s, vt = _softmax_block(q, k_base, v_base, j, valid, sk_s, sv_s, offs_d, offs_v, D, Dv, BF16)
            keep = valid[None, :] & (j[None, :] <= p[:, None]) & mask_i[:, None]
            m, l, acc = _update(s, keep, vt, m, l, acc, BF16)
        # window keys of this block's rows: (p_first − W, p_last], from the sinks on
        p_first = im * BM + (Sk - Sq) if CAUSAL else Sk - 1
        p_last = tl.minimum(im * BM + BM - 1, Sq - 1) + (Sk - Sq) if CAUSAL else Sk - 1
        lo = tl.maximum(tl.maximum(p_first - W + 1, n_sink), 0)
        hi = tl.minimum(p_last + 1, Sk)
        for n0 in range(lo, hi, BN):
            j = n0 + offs_n
            valid = j < hi
            s, vt = _softmax_block(q, k_base, v_base, j, valid, sk_s, sv_s, offs_d, offs_v, D, Dv, BF16)
            keep = valid[None, :] & (j[None, :] <= p[:, None]) & (j[None, :] > p[:, None] - W) & mask_i[:, None]
            m, l, acc = _update(s, keep, vt, m, l, acc, BF16)
        rows = bhq.to(tl.int64) * Sq + i
        tl.store(M_OUT + rows, m, mask=mask_i)
        tl.store(L_OUT + rows, l, mask=mask_i)
        tl.store(ACC_OUT + rows[:, None] * Dv + offs_v[None, :], acc, mask=mask_i[:, None] & (offs_v[None, :] < Dv))

    @triton.jit
    def _keep(i, j, mask_i, Sq, Sk, n_sink, W, CAUSAL: tl.constexpr):
        """Which (query row, key) pairs are exact: the key is visible and a sink or inside the window."""
        if CAUSAL:
            p = i + (Sk - Sq)
        else:
            p = i * 0 + (Sk - 1)
        return (mask_i[:, None] & (j[None, :] >= 0) & (j[None, :] < Sk) & (j[None, :] <= p[:, None])
                & ((j[None, :] < n_sink) | (j[None, :] > p[:, None] - W)))

    @triton.jit
    def _exact_dq_kernel(Q, K, V, M_IN, DL, DACC, DQ, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                         Hq, G, Sq, Sk, D, Dv, sink, W, scale, CAUSAL: tl.constexpr, BF16: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        im, bhq = tl.program_id(0), tl.program_id(1)
        b, hq = bhq // Hq, bhq % Hq
        hk = hq // G
        i = im * BM + tl.arange(0, BM)
        mask_i = i < Sq
        offs_d, offs_v, offs_n = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BN)
        q_off = b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + i[:, None] * sq_s + offs_d[None, :]
        qmask = mask_i[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + q_off, mask=qmask, other=0.0).to(tl.float32) * scale
        rows = bhq.to(tl.int64) * Sq + i
        m = tl.load(M_IN + rows, mask=mask_i, other=0.0)
        m = tl.where(m == float("-inf"), 0.0, m)
        dl = tl.load(DL + rows, mask=mask_i, other=0.0)
        dacc = tl.load(DACC + rows[:, None] * Dv + offs_v[None, :], mask=mask_i[:, None] & (offs_v[None, :] < Dv),
                       other=0.0)
        k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        n_sink = tl.minimum(sink, Sk)
        p_first = im * BM + (Sk - Sq) if CAUSAL else Sk - 1
        p_last = tl.minimum(im * BM + BM - 1, Sq - 1) + (Sk - Sq) if CAUSAL else Sk - 1
        lo = tl.maximum(tl.maximum(p_first - W + 1, n_sink), 0)
        hi = tl.minimum(p_last + 1, Sk)
        dq = tl.zeros((BM, BD), dtype=tl.float32)
        for part in tl.static_range(2):  # the sinks, then the window
            start = 0 if part == 0 else lo
            stop = n_sink if part == 0 else hi
            for n0 in range(start, stop, BN):
                j = n0 + offs_n
                valid = j < stop
                s, vt = _softmax_block(q, k_base, v_base, j, valid, sk_s, sv_s, offs_d, offs_v, D, Dv, BF16)
                keep = _keep(i, j, mask_i, Sq, Sk, n_sink, W, CAUSAL) & valid[None, :]
                pr = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
                dp = tl.dot(dacc, tl.trans(vt.to(tl.float32))) + dl[:, None]
                kt = tl.load(k_base + j[:, None] * sk_s + offs_d[None, :],
                             mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
                dq += tl.dot(pr * dp, kt.to(tl.float32))
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)

    @triton.jit
    def _exact_dkv_kernel(Q, K, V, M_IN, DL, DACC, DK, DV, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                          Hq, G, Sq, Sk, D, Dv, sink, W, scale, CAUSAL: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
        jn, bkv = tl.program_id(0), tl.program_id(1)
        Hkv = Hq // G
        b, hk = bkv // Hkv, bkv % Hkv
        j = jn * BN + tl.arange(0, BN)
        mask_j = j < Sk
        offs_d, offs_v, offs_m = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BM)
        k_off = b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + j[:, None] * sk_s + offs_d[None, :]
        v_off = b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h + j[:, None] * sv_s + offs_v[None, :]
        kmask = mask_j[:, None] & (offs_d[None, :] < D)
        vmask = mask_j[:, None] & (offs_v[None, :] < Dv)
        kt = tl.load(K + k_off, mask=kmask, other=0.0).to(tl.float32)
        vt = tl.load(V + v_off, mask=vmask, other=0.0).to(tl.float32)
        n_sink = tl.minimum(sink, Sk)
        delta = Sk - Sq
        # query rows that can see a key of this block exactly
        if CAUSAL:
            i_lo = tl.maximum(jn * BN - delta, 0)
            i_hi = tl.where(jn * BN < n_sink, Sq, tl.minimum(jn * BN + BN - 1 + W - delta, Sq))
        else:
            i_lo = 0
            i_hi = Sq
        i_lo = (i_lo // BM) * BM
        dk = tl.zeros((BN, BD), dtype=tl.float32)
        dv = tl.zeros((BN, BDV), dtype=tl.float32)
        for g in range(G):
            hq = hk * G + g
            bhq = b * Hq + hq
            for m0 in range(i_lo, i_hi, BM):
                i = m0 + offs_m
                mask_i = i < Sq
                q = tl.load(Q + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + i[:, None] * sq_s + offs_d[None, :],
                            mask=mask_i[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
                rows = bhq.to(tl.int64) * Sq + i
                m = tl.load(M_IN + rows, mask=mask_i, other=0.0)
                m = tl.where(m == float("-inf"), 0.0, m)
                dl = tl.load(DL + rows, mask=mask_i, other=0.0)
                dacc = tl.load(DACC + rows[:, None] * Dv + offs_v[None, :],
                               mask=mask_i[:, None] & (offs_v[None, :] < Dv), other=0.0)
                s = tl.dot(q, tl.trans(kt))
                keep = _keep(i, j, mask_i, Sq, Sk, n_sink, W, CAUSAL)
                pr = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
                dv += tl.dot(tl.trans(pr), dacc)
                dp = tl.dot(dacc, tl.trans(vt)) + dl[:, None]
                dk += tl.dot(tl.trans(pr * dp), q)
        tl.store(DK + k_off, dk.to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=vmask)



EXACT_TILE = (64, 64)  # (BM queries, BN keys) a program's tiles, forward and backward
# Register spill (bytes) that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90, bounded
# so that it cannot grow unnoticed: the backward's dK/dV kernel holds q, do, k, v, dk and dv tiles at once (0-112 bytes
# at d64, 304 (Triton 3.9) to 672 (3.6) at d128); dQ spills 8-64 bytes at d128.
SPILL_LIMITS = {"*": 0, "_exact_dkv_kernel": 112, "_exact_dkv_kernel BD=128": 672, "_exact_dq_kernel BD=128": 64}
BACKWARD_WARPS = 8  # 4 warps spill registers at d64 (ptxas, sm_90)


def forward_warps(block_d: int, block_dv: int) -> int:
    """The forward's num_warps: 8 once the value tile outgrows 64 x 64."""
    return 8 if block_d * block_dv > 64 * 64 else 4


def exact_part_triton(q, k, v, *, scale: float, causal: bool, sink_tokens: int, local_window: int):
    """Same contract as `reference.exact_part` (None when there are no exact keys), forward by Triton."""
    if min(sink_tokens, k.shape[2]) == 0 and local_window == 0:
        return None
    return _ExactPart.apply(q, k, v, dict(scale=scale, causal=causal, sink_tokens=sink_tokens,
                                          local_window=local_window))


def _exact_forward(q, k, v, scale, causal, sink_tokens, local_window):
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = rows_addressable(q, "q"), rows_addressable(k, "k"), rows_addressable(v, "v")
    dev = q.device
    m = torch.empty(B, Hq, Sq, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, Sq, Dv, dtype=torch.float32, device=dev)
    BM, BN = EXACT_TILE
    BD, BDV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    _exact_kernel[(triton.cdiv(Sq, BM), B * Hq)](
        q, k, v, m, l, acc, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), Hq, Hq // Hkv, Sq, Sk, D, Dv, sink_tokens, local_window,
        float(scale), CAUSAL=causal, BF16=q.dtype == torch.bfloat16, BM=BM, BN=BN, BD=BD, BDV=BDV,
        num_warps=forward_warps(BD, BDV))
    return m, l, acc


class _ExactPart(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, options):
        return _exact_forward(q, k, v, options["scale"], options["causal"], options["sink_tokens"],
                              options["local_window"])

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, options = inputs
        ctx.mark_non_differentiable(output[0])  # the max is a reference point, as in the reference
        ctx.save_for_backward(q, k, v, output[0])
        ctx.options = options

    @staticmethod
    def backward(ctx, _dm, dl, dacc):
        q, k, v, m = ctx.saved_tensors
        if not any(_functorch_wrapped(t) for t in (q, k, v, dl, dacc)):
            return (*_exact_backward(q, k, v, m, dl, dacc, **ctx.options), None)
        _, vjp = torch.func.vjp(lambda a, b, c: exact_part(a, b, c, **ctx.options)[1:], q, k, v)
        zero_l = dl if dl is not None else torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
        zero_acc = dacc if dacc is not None else torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32,
                                                             device=q.device)
        return (*vjp((zero_l, zero_acc)), None)


def _exact_backward(q, k, v, m, dl, dacc, *, scale, causal, sink_tokens, local_window):
    """dq, dk, dv of (l, acc) = Σ_exact e^{s − m} (1, v) for upstream (dl, dacc); m is the forward's reference."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = rows_addressable(q, "q"), rows_addressable(k, "k"), rows_addressable(v, "v")
    dl = torch.zeros_like(m) if dl is None else dl.float().contiguous()
    dacc = torch.zeros(B, Hq, Sq, Dv, dtype=torch.float32, device=q.device) if dacc is None else \
        dacc.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.stride() != q.stride() or dk.stride() != k.stride() or dv.stride() != v.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BM, BN = EXACT_TILE
    BD, BDV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    common = (Hq, Hq // Hkv, Sq, Sk, D, Dv, sink_tokens, local_window, float(scale))
    warps = BACKWARD_WARPS
    _exact_dq_kernel[(triton.cdiv(Sq, BM), B * Hq)](
        q, k, v, m, dl, dacc, dq, *strides, *common, CAUSAL=causal, BF16=q.dtype == torch.bfloat16,
        BM=BM, BN=BN, BD=BD, BDV=BDV, num_warps=warps)
    _exact_dkv_kernel[(triton.cdiv(Sk, BN), B * Hkv)](
        q, k, v, m, dl, dacc, dk, dv, *strides, *common, CAUSAL=causal, BM=BM, BN=BN, BD=BD, BDV=BDV,
        num_warps=warps)
    return dq, dk, dv


def _functorch_wrapped(t) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and t is not None and check(t))
