"""Triton forward of the hybrid's exact part: softmax pieces over the sink keys and the local window.

One program per (block of BM queries, query head) streams the sink keys [0, sink) and then the window keys
(p − W, p] ∩ [sink, Sk) of its rows with an online softmax (FlashAttention), never touching other keys,
and writes what `reference.exact_part` returns: the row max m (−inf where a row has no exact key),
l = Σ exp(s − m) and acc = Σ exp(s − m) v, all float32. Work per query: (sinks + W + BM) · D.
Backward: `reference.exact_part` recomputed under torch.func.vjp (exact; memory ≈ Sq·(block + W) per head).
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
    BM, BN = 64, 64
    BD, BDV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    _exact_kernel[(triton.cdiv(Sq, BM), B * Hq)](
        q, k, v, m, l, acc, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), Hq, Hq // Hkv, Sq, Sk, D, Dv, sink_tokens, local_window,
        float(scale), CAUSAL=causal, BF16=q.dtype == torch.bfloat16, BM=BM, BN=BN, BD=BD, BDV=BDV,
        num_warps=8 if BD * BDV > 64 * 64 else 4)
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
        ctx.save_for_backward(q, k, v)
        ctx.options = options

    @staticmethod
    def backward(ctx, _dm, dl, dacc):
        q, k, v = ctx.saved_tensors
        _, vjp = torch.func.vjp(lambda a, b, c: exact_part(a, b, c, **ctx.options)[1:], q, k, v)
        zero_l = dl if dl is not None else torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
        zero_acc = dacc if dacc is not None else torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32,
                                                             device=q.device)
        return (*vjp((zero_l, zero_acc)), None)
