"""HyperAttention in plain PyTorch: slow, obviously correct, what the tests and the backward trust.

Parts of the approximation (see `pattern.py` for the definitions) are each a softmax over their own
keys, (out, lse); they cover disjoint key (multi)sets of a row, so merging by log-sum-exp combines them into
the attention over the union. Accumulation is float32 (float64 stays float64).
"""
from __future__ import annotations

import math

import torch

from ..flash import flash_attention
from ..lse import merge_by_lse
from ..masks import check_qkv
from .pattern import HyperPattern, build_pattern, check_params, num_blocks


def _softmax_part(scores, values):
    """scores (..., q, n) with -inf for skipped keys, values (..., n, Dv) with batch dims broadcasting
    against the scores' -> (out (..., q, Dv), lse (..., q)); empty rows -> (0, -inf)."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe.unsqueeze(-1))
    return torch.matmul(p, values), lse


def _excluded(key, lo, hi, sinks):
    """Keys the exact part already counts for the row: the sinks and [lo, hi). Broadcasts."""
    return (key < sinks) | ((key >= lo) & (key < hi))


def _exact_part(q, k, v, pattern: HyperPattern, scale, causal, acc_dtype, row_block=256):
    """Each row against the sinks and its range [exact_lo, exact_hi), each key once."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = q.new_zeros(B, Hq, Sq, v.shape[-1], dtype=acc_dtype)
    lse = q.new_full((B, Hq, Sq), float("-inf"), dtype=acc_dtype)
    sinks = pattern.sinks
    for r0 in range(0, Sq, row_block):
        r1 = min(r0 + row_block, Sq)
        lo, hi = pattern.exact_lo[r0:r1], pattern.exact_hi[r0:r1]
        c0, c1 = max(int(lo.min()), sinks), int(hi.max())
        keys = torch.cat([torch.arange(sinks, device=q.device), torch.arange(c0, max(c0, c1), device=q.device)])
        if keys.numel() == 0:
            continue
        take = _excluded(keys[None, :], lo[:, None], hi[:, None], sinks)
        if causal:
            pos = torch.arange(r0, r1, device=q.device) + (Sk - Sq)
            take &= keys[None, :] <= pos[:, None]
        kb = k[:, :, keys].to(acc_dtype)
        vb = v[:, :, keys].to(acc_dtype)
        qb = q[:, :, r0:r1].to(acc_dtype).reshape(B, Hkv, group, r1 - r0, -1)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qb, kb) * scale
        s = s.masked_fill(~take, float("-inf"))
        o, l = _softmax_part(s, vb[:, :, None])
        out[:, :, r0:r1] = o.reshape(B, Hq, r1 - r0, -1)
        lse[:, :, r0:r1] = l.reshape(B, Hq, r1 - r0)
    return out, lse


def _rectangle(q, k, v, pattern: HyperPattern, level, r, scale, acc_dtype):
    """Blocks + samples of rectangle r of a level for its queries: (rows (B, Hq, ql), out, lse)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    qs, ql, ks, kl = level.rect_list[r]
    nb = num_blocks(kl, pattern.block_size)
    dev = q.device
    # balanced blocks along the sorted order; pad each to the largest block with a validity mask
    def blocks(length):
        starts = (torch.arange(nb + 1, device=dev) * length) // nb
        width = int((starts[1:] - starts[:-1]).max())
        idx = starts[:-1, None] + torch.arange(width, device=dev)
        return idx.clamp(max=length - 1), idx < starts[1:, None]
    qi, q_ok = blocks(ql)  # (nb, mq) sorted ranks
    ki, k_ok = blocks(kl)
    rows = level.q_order[:, :, qs:qs + ql][:, :, qi]          # (B, Hq, nb, mq) original query indices
    keys = level.k_order[:, :, ks:ks + kl][:, :, ki]          # (B, Hkv, nb, mk)
    samples = level.samples[:, :, r]                          # (B, Hkv, m)
    sample_block = level.sample_block[:, :, r]

    def gather(x, idx):  # x (B, H, S, D), idx (B, H, ...) -> (B, H, ..., D)
        flat = idx.reshape(idx.shape[0], idx.shape[1], -1)
        return x.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])).reshape(*idx.shape, x.shape[-1])
    qb = gather(q, rows).to(acc_dtype).reshape(B, Hkv, group, nb, -1, D)
    kb, vb = gather(k, keys).to(acc_dtype), gather(v, keys).to(acc_dtype)
    ksm, vsm = gather(k, samples).to(acc_dtype), gather(v, samples).to(acc_dtype)

    lo = pattern.exact_lo[rows].reshape(B, Hkv, group, nb, -1, 1)
    hi = pattern.exact_hi[rows].reshape(B, Hkv, group, nb, -1, 1)
    s_block = torch.einsum("bhgnqd,bhnkd->bhgnqk", qb, kb) * scale
    skip = ~k_ok[:, None, :] | _excluded(keys[:, :, None, :, None, :], lo, hi, pattern.sinks)
    s_block = s_block.masked_fill(skip, float("-inf"))
    # each sample stands for exp(logw) keys of the rectangle (kl/m for a uniform draw with replacement)
    logw = level.sample_logw[:, :, r].to(acc_dtype)[:, :, None, None, None, :]
    s_samp = torch.einsum("bhgnqd,bhkd->bhgnqk", qb, ksm) * scale + logw
    own = sample_block[:, :, None, None, None, :] == torch.arange(nb, device=dev)[:, None, None]
    skip = own | _excluded(samples[:, :, None, None, None, :], lo, hi, pattern.sinks)
    s_samp = s_samp.masked_fill(skip, float("-inf"))

    s = torch.cat([s_block, s_samp], dim=-1)
    vals = torch.cat([vb, vsm[:, :, None].expand(-1, -1, nb, -1, -1)], dim=-2)[:, :, None]  # (B, Hkv, 1, nb, n, Dv)
    out, lse = _softmax_part(s, vals)                     # (B, Hkv, group, nb, mq, Dv)
    keep = q_ok.reshape(-1)
    rows = rows.reshape(B, Hq, -1)[:, :, keep]
    out = out.reshape(B, Hq, -1, out.shape[-1])[:, :, keep]
    lse = lse.reshape(B, Hq, -1)[:, :, keep]
    return rows, out, lse


def hyper_attention_from_pattern(q, k, v, pattern: HyperPattern, *, scale, causal):
    """HyperAttention for a fixed pattern. Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32)."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = _exact_part(q, k, v, pattern, scale, causal, acc_dtype)
    for level in pattern.levels:
        part_out = torch.zeros_like(out)
        part_lse = torch.full_like(lse, float("-inf"))
        for r in range(len(level.rect_list)):
            rows, o, l = _rectangle(q, k, v, pattern, level, r, scale, acc_dtype)
            part_out = part_out.scatter(2, rows.unsqueeze(-1).expand(-1, -1, -1, o.shape[-1]), o)
            part_lse = part_lse.scatter(2, rows, l)
        out, lse = merge_by_lse(out, lse, part_out, part_lse)
    return out.to(q.dtype), lse.float()


def hyper_attention_reference(q, k, v, *, scale=None, causal=False, block_size=256, sample_size=256, lsh_bits=7,
                              min_seq_len=4096, sink_tokens=64, local_window=256, variant="default",
                              sampling=None, seed=0, return_lse=True, pattern: HyperPattern | None = None):
    """HyperAttention (Han et al. 2023), plus exact sinks and local window unless variant="paper".

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); Hq a multiple of Hkv. causal is
    bottom-right aligned and needs Sq <= Sk. Below `min_seq_len` keys the result is exact attention.
    `pattern` (from `build_pattern`) overrides the hashes and samples drawn from `seed`.
    Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32): lse is the log of the
    estimated softmax normaliser.
    """
    check_qkv(q, k, v, "hyper_attention")
    check_params(block_size=block_size, sample_size=sample_size, lsh_bits=lsh_bits, min_seq_len=min_seq_len,
                 sink_tokens=sink_tokens, local_window=local_window, variant=variant, sampling=sampling)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    Sq, Sk = q.shape[2], k.shape[2]
    if pattern is None and (Sk < min_seq_len or Sk == 0 or Sq == 0):
        return flash_attention(q, k, v, scale=scale, causal=causal)
    if causal and Sq > Sk:
        raise ValueError(f"hyper_attention: causal needs Sq <= Sk (bottom-right aligned), got Sq={Sq}, Sk={Sk}")
    if pattern is None:
        pattern = build_pattern(q, k, causal=causal, block_size=block_size, sample_size=sample_size,
                                lsh_bits=lsh_bits, min_seq_len=min_seq_len, sink_tokens=sink_tokens,
                                local_window=local_window, variant=variant, sampling=sampling, seed=seed,
                                scale=scale)
    return hyper_attention_from_pattern(q, k, v, pattern, scale=scale, causal=causal)
