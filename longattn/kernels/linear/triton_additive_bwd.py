"""Backward of the additive chunked kernels (`triton_additive.py`), in Triton.

Write v' = [v, 1] (the normaliser's column), dN' = [dnum, dden] per query, and let query i read key j
(j visible to i). Then
    dφq_i = Σ_j (dN'_i · v'_j) φk_j        — the forward again with dN' as queries and v' as keys,
    dφk_j = Σ_i (dN'_i · v'_j) φq_i,  dv_j = Σ_i (φq_i · φk_j) dnum_i,
and the key-side sums run over the queries of later chunks plus the query chunk that reads key chunk t
causally. So the backward needs the forward states H[t] (recomputed by the forward's segmented walk) and
reverse states R[c] = Σ_{c' ≥ c} φQ_{c'}ᵀ dN_{c'} (and rz[c] = Σ φq dden), which `_rev_states_kernel` builds walking the
query chunks backwards; key chunk t reads R[clamp(t − shift + 1, 0, nq)]. For a pure (divided) output
out = num / (den + eps): dnum = dout / (den + eps), dden = −Σ_v dout·out / (den + eps).
GQA: the dk/dv programs of a key head loop over the query heads of its group.
"""
from __future__ import annotations

import torch

from .triton_additive import FUSED_MAPS, chunk_geometry, launch_walk, rows_addressable, with_grad_buffer

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from .triton_additive import _load_phi, _segment_row

    @triton.jit
    def _dphi(x, FMAP: tl.constexpr):
        if FMAP == 1:
            return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
        elif FMAP == 2:
            return tl.where(x > 0, 1.0, 0.0)
        else:
            return x * 0.0 + 1.0

    @triton.jit
    def _dot(a, b, BF16: tl.constexpr):
        if BF16:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))

    @triton.jit
    def _load_dn(DO, RS, base, i, mask_i, sd_s, offs_v, mask_v, HAS_RS: tl.constexpr, bhq, Sq):
        """dN rows; as loaded (its dtype) unless scaled by RS: the callers only feed it to products (`_load_phi`)."""
        dn = tl.load(DO + base + i[:, None] * sd_s + offs_v[None, :], mask=mask_i[:, None] & mask_v[None, :], other=0.0)
        if HAS_RS:
            dn = dn.to(tl.float32) * tl.load(RS + bhq.to(tl.int64) * Sq + i, mask=mask_i, other=0.0)[:, None]
        return dn

    @triton.jit
    def _rev_states_kernel(Q, DO, RS, DDEN, R, RZ, sq_b, sq_h, sq_s, sd_b, sd_h, sd_s, Hq, Sq, NQ, F, Dv,
                           FMAP: tl.constexpr, HAS_DEN: tl.constexpr, HAS_RS: tl.constexpr, BF16: tl.constexpr,
                           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        ik, iv, bhq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, hq = bhq // Hq, bhq % Hq
        offs_c = tl.arange(0, C)
        offs_k = ik * BK + tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_k, mask_v = offs_k < F, offs_v < Dv
        q_base = Q + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h
        d_base = b.to(tl.int64) * sd_b + hq.to(tl.int64) * sd_h
        r_ptrs = R + bhq.to(tl.int64) * (NQ + 1) * F * Dv + offs_k[:, None] * Dv + offs_v[None, :]
        rz_ptrs = RZ + bhq.to(tl.int64) * (NQ + 1) * F + offs_k
        r_mask = mask_k[:, None] & mask_v[None, :]
        state = tl.zeros((BK, BV), dtype=tl.float32)
        rz = tl.zeros((BK,), dtype=tl.float32)
        tl.store(r_ptrs + NQ * F * Dv, state.to(R.dtype.element_ty), mask=r_mask)
        if HAS_DEN:
            if iv == 0:
                tl.store(rz_ptrs + NQ * F, rz, mask=mask_k)
        for cc in range(NQ):
            c = NQ - 1 - cc
            i = c * C + offs_c
            mask_i = i < Sq
            qmask = mask_i[:, None] & mask_k[None, :]
            qt = _load_phi(q_base + i[:, None] * sq_s + offs_k[None, :], qmask, FMAP, not HAS_DEN)
            dn = _load_dn(DO, RS, d_base, i, mask_i, sd_s, offs_v, mask_v, HAS_RS, bhq, Sq)
            state += _dot(tl.trans(qt), dn, BF16)
            tl.store(r_ptrs + c * F * Dv, state.to(R.dtype.element_ty), mask=r_mask)
            if HAS_DEN:
                if iv == 0:
                    dd = tl.load(DDEN + bhq.to(tl.int64) * Sq + i, mask=mask_i, other=0.0)
                    rz += tl.sum(qt.to(tl.float32) * dd[:, None], 0)
                    tl.store(rz_ptrs + c * F, rz, mask=mask_k)

    @triton.jit
    def _dq_kernel(Q, K, V, H, Z, DO, RS, DDEN, DQ, S0, Z0, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                   sd_b, sd_h, sd_s, Hq, G, Sq, L, P, N, F, Dv, shift, SEG,
                   FMAP: tl.constexpr, HAS_DEN: tl.constexpr, HAS_RS: tl.constexpr, BF16: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, INIT: tl.constexpr = False):
        """INIT: the states are offset by S0 / Z0 per walk segment of SEG chunks (see the forward's output kernel)."""
        ik, c, bhq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, hq = bhq // Hq, bhq % Hq
        hk = hq // G
        bkv = b * (Hq // G) + hk
        offs_c = tl.arange(0, C)
        offs_k = ik * BK + tl.arange(0, BK)
        mask_k = offs_k < F
        i = c * C + offs_c
        mask_i = i < Sq
        d_base = b.to(tl.int64) * sd_b + hq.to(tl.int64) * sd_h
        k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        t = c + shift
        acc = tl.zeros((C, BK), dtype=tl.float32)
        if (t >= 0) | INIT:
            tt = tl.maximum(tl.minimum(t, N), 0)
            seg = _segment_row(bkv, tt, N, SEG)
            h_base = H + (bkv.to(tl.int64) * (N + 1) + tt) * F * Dv
            r = t * C + offs_c - P
            mask_r = (r >= 0) & (r < L)
            s = tl.zeros((C, C), dtype=tl.float32)
            for v0 in range(0, Dv, BV):
                offs_v = v0 + tl.arange(0, BV)
                mask_v = offs_v < Dv
                dn = _load_dn(DO, RS, d_base, i, mask_i, sd_s, offs_v, mask_v, HAS_RS, bhq, Sq)
                hmask = mask_k[:, None] & mask_v[None, :]
                ht = tl.load(h_base + offs_k[:, None] * Dv + offs_v[None, :], mask=hmask, other=0.0)
                if INIT:  # S0 in H's dtype: an fp32 tile more would spill (ptxas, sm_90)
                    ht += tl.load(S0 + seg * F * Dv + offs_k[:, None] * Dv + offs_v[None, :], mask=hmask, other=0.0)
                acc += _dot(dn, tl.trans(ht), BF16)
                if t < N:
                    vt = tl.load(v_base + r[:, None] * sv_s + offs_v[None, :],
                                 mask=mask_r[:, None] & mask_v[None, :], other=0.0)
                    s += _dot(dn, tl.trans(vt), BF16)
            if HAS_DEN:
                dd = tl.load(DDEN + bhq.to(tl.int64) * Sq + i, mask=mask_i, other=0.0)
                zt = tl.load(Z + (bkv.to(tl.int64) * (N + 1) + tt) * F + offs_k, mask=mask_k, other=0.0)
                if INIT:
                    zt += tl.load(Z0 + seg * F + offs_k, mask=mask_k, other=0.0)
                acc += dd[:, None] * zt[None, :]
                s += dd[:, None]  # the ones column; empty key slots have φk = 0 below
            if t < N:
                s = tl.where(offs_c[:, None] >= offs_c[None, :], s, 0.0)
                kmask = mask_r[:, None] & mask_k[None, :]
                kt = _load_phi(k_base + r[:, None] * sk_s + offs_k[None, :], kmask, FMAP, True)
                acc += _dot(s, kt, BF16)
        qmask = mask_i[:, None] & mask_k[None, :]
        q_off = b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + i[:, None] * sq_s + offs_k[None, :]
        qt = tl.load(Q + q_off, mask=qmask, other=0.0).to(tl.float32)
        tl.store(DQ + q_off, (acc * _dphi(qt, FMAP)).to(DQ.dtype.element_ty), mask=qmask)

    @triton.jit
    def _dkv_kernel(Q, K, V, DO, RS, DDEN, R, RZ, DK, DV, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                    sd_b, sd_h, sd_s, Hq, G, Sq, L, P, N, NQ, F, Dv, shift,
                    WANT_DK: tl.constexpr, FMAP: tl.constexpr, HAS_DEN: tl.constexpr, HAS_RS: tl.constexpr,
                    BF16: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """WANT_DK: program (F block, key chunk, key head) -> dk tile; else (V block, ...) -> dv tile."""
        ix, t, bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        Hkv = Hq // G
        b, hk = bkv // Hkv, bkv % Hkv
        offs_c = tl.arange(0, C)
        r = t * C + offs_c - P
        mask_r = (r >= 0) & (r < L)
        k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        c = t - shift  # the query chunk that reads this key chunk with the causal mask
        c0 = tl.minimum(tl.maximum(c + 1, 0), NQ)  # later query chunks see all of it
        has_intra = (c >= 0) & (c < NQ)
        i = c * C + offs_c
        mask_i = (i >= 0) & (i < Sq)  # all False unless has_intra
        if WANT_DK:
            offs_k = ix * BK + tl.arange(0, BK)
            mask_k = offs_k < F
            acc = tl.zeros((C, BK), dtype=tl.float32)
        else:
            offs_v = ix * BV + tl.arange(0, BV)
            mask_v = offs_v < Dv
            acc = tl.zeros((C, BV), dtype=tl.float32)
        for g in range(G):
            hq = hk * G + g
            bhq = b * Hq + hq
            q_base = Q + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h
            d_base = b.to(tl.int64) * sd_b + hq.to(tl.int64) * sd_h
            r_base = R + (bhq.to(tl.int64) * (NQ + 1) + c0) * F * Dv
            s = tl.zeros((C, C), dtype=tl.float32)  # (key, query)
            if WANT_DK:
                for v0 in range(0, Dv, BV):
                    offs_vv = v0 + tl.arange(0, BV)
                    mask_vv = offs_vv < Dv
                    vt = tl.load(v_base + r[:, None] * sv_s + offs_vv[None, :],
                                 mask=mask_r[:, None] & mask_vv[None, :], other=0.0)
                    rt = tl.load(r_base + offs_k[:, None] * Dv + offs_vv[None, :],
                                 mask=mask_k[:, None] & mask_vv[None, :], other=0.0)
                    acc += _dot(vt, tl.trans(rt), BF16)
                    if has_intra:
                        dn = _load_dn(DO, RS, d_base, i, mask_i, sd_s, offs_vv, mask_vv, HAS_RS, bhq, Sq)
                        s += _dot(vt, tl.trans(dn), BF16)
                if HAS_DEN:
                    rz = tl.load(RZ + (bhq.to(tl.int64) * (NQ + 1) + c0) * F + offs_k, mask=mask_k, other=0.0)
                    acc += rz[None, :]
                    if has_intra:
                        dd = tl.load(DDEN + bhq.to(tl.int64) * Sq + i, mask=mask_i, other=0.0)
                        s += dd[None, :]
                if has_intra:
                    s = tl.where(offs_c[:, None] <= offs_c[None, :], s, 0.0)
                    qmask = mask_i[:, None] & mask_k[None, :]
                    qt = _load_phi(q_base + i[:, None] * sq_s + offs_k[None, :], qmask, FMAP, True)
                    acc += _dot(s, qt, BF16)
            else:
                for f0 in range(0, F, BK):
                    offs_kk = f0 + tl.arange(0, BK)
                    mask_kk = offs_kk < F
                    kmask = mask_r[:, None] & mask_kk[None, :]
                    kt = _load_phi(k_base + r[:, None] * sk_s + offs_kk[None, :], kmask, FMAP, True)
                    rt = tl.load(r_base + offs_kk[:, None] * Dv + offs_v[None, :],
                                 mask=mask_kk[:, None] & mask_v[None, :], other=0.0)
                    acc += _dot(kt, rt, BF16)
                    if has_intra:
                        qmask = mask_i[:, None] & mask_kk[None, :]
                        qt = _load_phi(q_base + i[:, None] * sq_s + offs_kk[None, :], qmask, FMAP, True)
                        s += _dot(kt, tl.trans(qt), BF16)
                if has_intra:
                    s = tl.where(offs_c[:, None] <= offs_c[None, :], s, 0.0)
                    dn = _load_dn(DO, RS, d_base, i, mask_i, sd_s, offs_v, mask_v, HAS_RS, bhq, Sq)
                    acc += _dot(s, dn, BF16)
        if WANT_DK:
            kmask = mask_r[:, None] & mask_k[None, :]
            k_off = b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + r[:, None] * sk_s + offs_k[None, :]
            kt = tl.load(K + k_off, mask=kmask, other=0.0).to(tl.float32)
            tl.store(DK + k_off, (acc * _dphi(kt, FMAP)).to(DK.dtype.element_ty), mask=kmask)
        else:
            vmask = mask_r[:, None] & mask_v[None, :]
            v_off = b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h + r[:, None] * sv_s + offs_v[None, :]
            tl.store(DV + v_off, acc.to(DV.dtype.element_ty), mask=vmask)


# (largest feature tile, largest value tile, num_warps, num_stages) per kernel, from
# `benchmarks/sweep_linear_tiles.py` (H200, h32 d64 bf16 32K, every config checked against float32 PyTorch:
# results/2026-12-01-h200-linear-tiles.md). The reverse walk is sequential like the forward's states walk:
# deep pipelining (5 stages) hides its loads (0.18 ms; 16 × 16 tiles, the old heuristic, were slower). The
# others take 8 warps: 4 were 4-5% faster on triton 3.6 but spill registers when triton 3.9 builds them.
REV_TILE = (64, 32, 4, 5)
DQ_TILE = (64, 64, 8, 2)
DK_TILE = (64, 32, 8, 3)
DV_TILE = (32, 64, 8, 3)
SPILL_LIMITS = {"*": 0}  # register spill the compile gate allows in bf16 builds (tests/kernels/compile_gate.py)


def _tile(spec, Fd: int, Dv: int):
    bk, bv, warps, stages = spec
    return dict(BK=min(bk, max(16, triton.next_power_of_2(Fd))), BV=min(bv, max(16, triton.next_power_of_2(Dv))),
                num_warps=warps, num_stages=stages)


def far_additive_backward(grad, fq, fk, v, *, out, den, fmap: str, causal: bool, offset, chunk: int,
                          normalize: bool, divide: bool, eps: float, out_dtype, init=None):
    """(dq, dk, dv, dinit) of `far_additive_triton` for the upstream gradient `grad` (its output's shape).

    out / den: the forward's output and normaliser (B·Hq, Sq), needed when it divided. init: the incoming
    state (or None, dinit None); every query reads it, so dinit = Σ_i φq_iᵀ dN'_i = R[0], summed over the group."""
    B, Hq, Sq, Fd = fq.shape
    Hkv, L, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    G = Hq // Hkv
    P, shift, N, nq = chunk_geometry(Sq, L, causal, offset, chunk)
    bf16 = out_dtype == torch.bfloat16
    fmap_id = FUSED_MAPS.get(fmap, 0)
    dev = fq.device
    (fq, dq), (fk, dk), (v, dv) = (with_grad_buffer(x, n) for x, n in ((fq, "q"), (fk, "k"), (v, "v")))
    rs = dden = None
    if divide and normalize:
        rs = 1.0 / (den + eps)                                               # (B·Hq, Sq)
        dden = -(rs * (grad.float() * out.float()).sum(-1).reshape(B * Hq, Sq))
        do = grad
    elif normalize:
        do, dden = grad[..., :Dv], grad[..., Dv].float().reshape(B * Hq, Sq).contiguous()
    else:
        do = grad
    do = rows_addressable(do, "grad_out")
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    rs_arg, dden_arg = (dummy if rs is None else rs), (dummy if dden is None else dden)
    H, Z, SEG, offsets = launch_walk(fk, v, fmap_id=fmap_id, normalize=normalize, bf16=bf16, chunk=chunk, P=P, N=N,
                                     init=init)
    R = torch.empty(B * Hq, nq + 1, Fd, Dv, dtype=torch.bfloat16 if bf16 else torch.float32, device=dev)
    RZ = torch.empty(B * Hq, nq + 1, Fd if normalize else 1, dtype=torch.float32, device=dev)
    flags = dict(FMAP=fmap_id, HAS_DEN=normalize, HAS_RS=rs is not None, BF16=bf16, C=chunk)
    rev = _tile(REV_TILE, Fd, Dv)
    _rev_states_kernel[(triton.cdiv(Fd, rev["BK"]), triton.cdiv(Dv, rev["BV"]), B * Hq)](
        fq, do, rs_arg, dden_arg, R, RZ, fq.stride(0), fq.stride(1), fq.stride(2), do.stride(0), do.stride(1),
        do.stride(2), Hq, Sq, nq, Fd, Dv, **flags, **rev)
    strides = (fq.stride(0), fq.stride(1), fq.stride(2), fk.stride(0), fk.stride(1), fk.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    s0, z0 = offsets if offsets is not None else (H, Z)
    dq_tile = _tile(DQ_TILE, Fd, Dv)
    _dq_kernel[(triton.cdiv(Fd, dq_tile["BK"]), nq, B * Hq)](
        fq, fk, v, H, Z, do, rs_arg, dden_arg, dq, s0, z0, *strides, Hq, G, Sq, L, P, N, Fd, Dv, shift, SEG,
        **flags, **dq_tile, INIT=offsets is not None)
    _launch_dkv(fq, fk, v, do, rs_arg, dden_arg, R, RZ, dk, dv, strides, Hq, G, Sq, L, P, N, nq, shift, flags)
    dinit = None
    if init is not None:
        dinit = R[:, 0].float().view(B, Hkv, G, Fd, Dv).sum(2)
        if normalize:
            dinit = torch.cat([dinit, RZ[:, 0].view(B, Hkv, G, Fd, 1).sum(2)], dim=-1)
    return dq, dk, dv, dinit


def _launch_dkv(fq, fk, v, do, rs, dden, R, RZ, dk, dv, strides, Hq, G, Sq, L, P, N, nq, shift, flags):
    B, Hkv, _, Fd = fk.shape
    Dv = v.shape[-1]
    for want_dk, spec in ((True, DK_TILE), (False, DV_TILE)):
        tile = _tile(spec, Fd, Dv)
        tiles = triton.cdiv(Fd, tile["BK"]) if want_dk else triton.cdiv(Dv, tile["BV"])
        _dkv_kernel[(tiles, N, B * Hkv)](
            fq, fk, v, do, rs, dden, R, RZ, dk, dv, *strides, Hq, G, Sq, L, P, N, nq, Fd, Dv, shift,
            WANT_DK=want_dk, **flags, **tile)


def fold_additive_backward(dfold, fk, v, *, fmap: str, normalize: bool, chunk: int, bf16: bool):
    """(dk, dv) of the fold φ(k)ᵀ [v | 1] for its upstream gradient dfold (B, Hkv, F, Dv + normalize).

    That is the key side of `far_additive_backward` with no queries and dfold as the reverse state every
    key chunk reads: `_dkv_kernel` with one "query head" per key head (G = 1) and no query chunks."""
    B, Hkv, L, Fd = fk.shape
    Dv = v.shape[-1]
    fk, v = rows_addressable(fk, "k"), rows_addressable(v, "v")
    fk, v = fk.contiguous(), v.contiguous()  # the gradients are written with these strides
    dk, dv = torch.empty_like(fk), torch.empty_like(v)
    R = dfold[..., :Dv].float().reshape(B * Hkv, 1, Fd, Dv).contiguous()
    RZ = dfold[..., Dv].float().reshape(B * Hkv, 1, Fd).contiguous() if normalize else R
    N = max(1, -(-L // chunk))
    strides = (fk.stride(0), fk.stride(1), fk.stride(2)) * 2 + (v.stride(0), v.stride(1), v.stride(2)) * 2
    flags = dict(FMAP=FUSED_MAPS.get(fmap, 0), HAS_DEN=normalize, HAS_RS=False, BF16=bf16, C=chunk)
    # shift N: key chunk t "is read causally" by query chunk t - N < 0, so every key reads R[0] alone
    _launch_dkv(fk, fk, v, v, R, R, R, RZ, dk, dv, strides, Hkv, 1, 0, L, 0, N, 0, N, flags)
    return dk, dv
