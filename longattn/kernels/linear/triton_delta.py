"""Delta-rule chunked forward that reads raw q/k/v (the unnormalised form; `triton_chunk.py` covers the rest).

`triton_chunk.py` gets its features, unit rows and padding from PyTorch, several passes over (B, H, S, F)
float32 tensors. Here:
1. `_delta_inverse_kernel`, one program per (key chunk, key head), loads the raw key rows, applies φ (elu + 1,
   relu, identity; or reads float32 features), makes them unit length, stores them (kn), and stores the
   chunk's T = (I + tril(diag(β) Kn Knᵀ, −1))⁻¹ diag(β), the inverse by block doubling
   (`triton_chunk.unit_lower_inverse`); `_delta_wu_kernel` then forms the UT form W = T Kn, U = T V
   (Yang et al. 2024, §3);
2. `_delta_h_kernel`, one program per (V block, key head), walks the chunks in order with the state in
   registers: u = U − W h (stored), h += Knᵀ u, and stores h before each chunk;
3. the additive path's output kernel reads φ(q) made unit length (QL2), the stored kn, the corrected values
   u and the states: φ(Q_c) h[t] + (φ(Q_c) Kn_tᵀ ⊙ tril) u_t.
kn, W, U, u and h live in the chunk-padded key coordinates (P empty slots in front, zero rows: β = 0 there,
so T has zero rows and columns for them). Backward: `triton_delta_bwd.py` where `triton_backward_trusted` says so,
else the PyTorch form (`far_delta_torch`) under torch.func.vjp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import far_chunked
from .triton_additive import FUSED_MAPS, chunk_geometry, needs_grad, rows_addressable

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from .triton_additive import _output_kernel, _phi
    from .triton_chunk import unit_lower_inverse

    @triton.jit
    def _chunk_coords(Hkv, L, P, F, C: tl.constexpr, BF: tl.constexpr):
        """The (key chunk t, key head bh) program's coordinates: batch b, head h, chunk rows, features, and the
        key index r of each row (the first P slots of the padded sequence are empty) with its validity."""
        t, bh = tl.program_id(0), tl.program_id(1)
        offs_c = tl.arange(0, C)
        offs_f = tl.arange(0, BF)
        r = t * C + offs_c - P
        return t, bh, bh // Hkv, bh % Hkv, offs_c, offs_f, offs_f < F, r, (r >= 0) & (r < L)

    @triton.jit
    def _delta_inverse_kernel(K, BETA, KN, TT, sk_b, sk_h, sk_s, sb_b, sb_h, sb_s, Hkv, L, P, N, F,
                              FMAP: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, PRECISION: tl.constexpr):
        """One (key chunk, key head): unit keys kn (stored) and T = (I + tril(diag(β) Kn Knᵀ, −1))⁻¹ diag(β)."""
        t, bh, b, h, offs_c, offs_f, mask_f, r, mask_r = _chunk_coords(Hkv, L, P, F, C, BF)
        kmask = mask_r[:, None] & mask_f[None, :]
        kt = tl.load(K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h + r[:, None] * sk_s + offs_f[None, :],
                     mask=kmask, other=0.0)
        kt = tl.where(kmask, _phi(kt.to(tl.float32), FMAP), 0.0)
        # unit rows keep every I − β k kᵀ a contraction (F.normalize's 1e-12 floor: zero rows stay zero)
        kt = kt / tl.maximum(tl.sqrt(tl.sum(kt * kt, 1)), 1e-12)[:, None]
        rows = bh.to(tl.int64) * N * C + t * C + offs_c  # padded coordinates
        tl.store(KN + rows[:, None] * F + offs_f[None, :], kt.to(KN.dtype.element_ty), mask=mask_f[None, :])
        beta = tl.load(BETA + b.to(tl.int64) * sb_b + h.to(tl.int64) * sb_h + r.to(tl.int64) * sb_s,
                       mask=mask_r, other=0.0).to(tl.float32)
        A = tl.dot(kt, tl.trans(kt), input_precision=PRECISION)
        A = tl.where(offs_c[:, None] > offs_c[None, :], A * beta[:, None], 0.0)
        T = unit_lower_inverse(A, C, PRECISION) * beta[None, :]
        tl.store(TT + rows[:, None] * C + offs_c[None, :], T.to(TT.dtype.element_ty))

    @triton.jit
    def _delta_wu_kernel(KN, V, TT, WT, UT, sv_b, sv_h, sv_s, Hkv, L, P, N, F, Dv, C: tl.constexpr,
                         BF: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
        """One (key chunk, key head): W = T Kn, U = T V (a kernel of its own: beside the inversion, the
        products' tiles would spill registers)."""
        t, bh, b, h, offs_c, offs_f, mask_f, r, mask_r = _chunk_coords(Hkv, L, P, F, C, BF)
        rows = bh.to(tl.int64) * N * C + t * C + offs_c
        T = tl.load(TT + rows[:, None] * C + offs_c[None, :])
        kt = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
        w = tl.dot(T, kt, input_precision=PRECISION)
        tl.store(WT + rows[:, None] * F + offs_f[None, :], w.to(WT.dtype.element_ty), mask=mask_f[None, :])
        for v0 in range(0, Dv, BV):
            offs_v = v0 + tl.arange(0, BV)
            mask_v = offs_v < Dv
            vt = tl.load(V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h + r[:, None] * sv_s
                         + offs_v[None, :], mask=mask_r[:, None] & mask_v[None, :], other=0.0)
            u = tl.dot(T, vt.to(T.dtype), input_precision=PRECISION)
            tl.store(UT + rows[:, None] * Dv + offs_v[None, :], u.to(UT.dtype.element_ty), mask=mask_v[None, :])

    @triton.jit
    def _delta_h_kernel(KN, WT, UT, H, UNEW, N, F, Dv, BF16: tl.constexpr, C: tl.constexpr, BF: tl.constexpr,
                        BV: tl.constexpr):
        iv, bh = tl.program_id(0), tl.program_id(1)
        offs_c = tl.arange(0, C)
        offs_f = tl.arange(0, BF)
        offs_v = iv * BV + tl.arange(0, BV)
        mask_f, mask_v = offs_f < F, offs_v < Dv
        h_ptrs = H + bh.to(tl.int64) * (N + 1) * F * Dv + offs_f[:, None] * Dv + offs_v[None, :]
        h_mask = mask_f[:, None] & mask_v[None, :]
        state = tl.zeros((BF, BV), dtype=tl.float32)
        for t in range(N):
            tl.store(h_ptrs + t * F * Dv, state.to(H.dtype.element_ty), mask=h_mask)
            rows = bh.to(tl.int64) * N * C + t * C + offs_c
            w = tl.load(WT + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
            u = tl.load(UT + rows[:, None] * Dv + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
            kt = tl.load(KN + rows[:, None] * F + offs_f[None, :], mask=mask_f[None, :], other=0.0)
            if BF16:
                u -= tl.dot(w.to(tl.bfloat16), state.to(tl.bfloat16))
            else:
                u -= tl.dot(w.to(tl.float32), state)
            tl.store(UNEW + rows[:, None] * Dv + offs_v[None, :], u.to(UNEW.dtype.element_ty), mask=mask_v[None, :])
            if BF16:
                state += tl.dot(tl.trans(kt.to(tl.bfloat16)), u.to(tl.bfloat16))
            else:
                state += tl.dot(tl.trans(kt.to(tl.float32)), u)
        tl.store(h_ptrs + N * F * Dv, state.to(H.dtype.element_ty), mask=h_mask)


SPILL_LIMITS = {"*": 0}  # register spill the compile gate allows in bf16 builds (tests/kernels/compile_gate.py)
MAX_FEATURES = 256  # one feature tile per chunk row: unit-length rows need the whole row
# launch settings from `benchmarks/sweep_linear_tiles.py`, which also checks each config's result (H200, h32 d64
# bf16 32K: results/2026-12-01-h200-linear-tiles.md): the output kernel's (largest value tile, num_warps,
# num_stages; 8 warps: 0.27 ms, 4 warps 0.22 but they spill registers on triton 3.9), the inverse's num_warps
# (4: 0.46 ms, 8: 1.22), the walk's (value tile, num_warps, num_stages). Pinned, not autotuned: on triton 3.6
# some configs compute wrong results (the walk at 32 × 4 warps × 1 stage faults) and the autotuner would not notice.
OUTPUT_TILE = (64, 8, 1)
INVERSE_WARPS = 4
WU_WARPS = 4  # `_delta_wu_kernel`, not swept
WALK_TILE = (32, 4, 3)


def delta_states(fk, v, beta, *, fmap_id: int, P: int, N: int, chunk: int, bf16: bool):
    """The chunks' unit keys KN, T, corrected values u (UNEW) and states H, in padded key coordinates:
    KN (B·Hkv, N·C, F), TT (B·Hkv, N·C, C), UNEW (B·Hkv, N·C, Dv), H (B·Hkv, N + 1, F, Dv)."""
    B, Hkv, L, Fd = fk.shape
    Dv = v.shape[-1]
    kdt = torch.bfloat16 if bf16 else torch.float32
    dev = fk.device
    BF = max(16, triton.next_power_of_2(Fd))
    BV = min(64, max(16, triton.next_power_of_2(Dv)))
    KN = torch.empty(B * Hkv, N * chunk, Fd, dtype=kdt, device=dev)
    WT = torch.empty_like(KN)
    UT = torch.empty(B * Hkv, N * chunk, Dv, dtype=kdt, device=dev)
    TT = torch.empty(B * Hkv, N * chunk, chunk, dtype=kdt, device=dev)
    precision = products_precision(bf16)
    _delta_inverse_kernel[(N, B * Hkv)](
        fk, beta, KN, TT, fk.stride(0), fk.stride(1), fk.stride(2), beta.stride(0), beta.stride(1), beta.stride(2),
        Hkv, L, P, N, Fd, FMAP=fmap_id, C=chunk, BF=BF, PRECISION=precision, num_warps=INVERSE_WARPS)
    _delta_wu_kernel[(N, B * Hkv)](
        KN, v, TT, WT, UT, v.stride(0), v.stride(1), v.stride(2), Hkv, L, P, N, Fd, Dv, C=chunk, BF=BF, BV=BV,
        PRECISION=precision, num_warps=WU_WARPS)
    H = torch.empty(B * Hkv, N + 1, Fd, Dv, dtype=kdt, device=dev)
    UNEW = torch.empty_like(UT)
    HV = min(WALK_TILE[0], BV)  # more programs for the sequential walk
    _delta_h_kernel[(triton.cdiv(Dv, HV), B * Hkv)](KN, WT, UT, H, UNEW, N, Fd, Dv, BF16=bf16, C=chunk, BF=BF, BV=HV,
                                                    num_warps=WALK_TILE[1], num_stages=WALK_TILE[2])
    return KN, TT, UNEW, H


def products_precision(bf16: bool) -> str:
    """float32 runs: products as 3 tf32 passes (float32 accuracy); bfloat16 runs: one tf32 pass for the
    inversion (relative error ~1e-3, under bfloat16's), bfloat16 operands elsewhere."""
    return "tf32" if bf16 else "tf32x3"


def far_delta_triton(fq, fk, v, beta, *, fmap: str, causal: bool, offset, chunk: int, out_dtype, pure: bool,
                     keep_states: bool = False):
    """Unnormalised delta-rule far part. fq (B, Hq, Sq, F) / fk (B, Hkv, L, F) raw (fused maps) or features,
    v (B, Hkv, L, Dv), beta (B, Hkv, L). Returns (B, Hq, Sq, Dv): in out_dtype when `pure`, else float32;
    keep_states: (that, the chunk states (KN, TT, UNEW, H) of `delta_states`), which the backward then reads
    instead of recomputing them."""
    B, Hq, Sq, Fd = fq.shape
    Hkv, L, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    G = Hq // Hkv
    P, shift, N, nq = chunk_geometry(Sq, L, causal, offset, chunk)
    fq, fk, v = rows_addressable(fq, "q"), rows_addressable(fk, "k"), rows_addressable(v, "v")
    bf16 = out_dtype == torch.bfloat16
    fmap_id = FUSED_MAPS.get(fmap, 0)
    KN, TT, UNEW, H = delta_states(fk, v, beta, fmap_id=fmap_id, P=P, N=N, chunk=chunk, bf16=bf16)
    out = torch.empty(B, Hq, Sq, Dv, dtype=out_dtype if pure else torch.float32, device=fq.device)
    BF = max(16, triton.next_power_of_2(Fd))
    OV, warps, stages = OUTPUT_TILE
    OV = min(OV, max(16, triton.next_power_of_2(Dv)))
    # kn and u are (B·Hkv, N·C, ·) in padded coordinates: strides (N·C·F·Hkv, N·C·F, F), P = 0, L = N·C
    _output_kernel[(triton.cdiv(Dv, OV), nq, B * Hq)](
        fq, KN, UNEW, H, H, out, out, H, H, fq.stride(0), fq.stride(1), fq.stride(2), Hkv * N * chunk * Fd,
        N * chunk * Fd, Fd, Hkv * N * chunk * Dv, N * chunk * Dv, Dv, out.stride(0), out.stride(1), out.stride(2),
        Hq, G, Sq, N * chunk, 0, N, Fd, Dv, shift, 0.0, N, FMAP=fmap_id, HAS_DEN=False, DIVIDE=False, BF16=bf16,
        C=chunk, BK=BF, BV=OV, KMAP=0, QL2=True, num_warps=warps, num_stages=stages)
    return (out, (KN, TT, UNEW, H)) if keep_states else out


def far_delta_torch(fq, fk, v, beta, *, fmap: str, causal: bool, offset, chunk: int, out_dtype, pure: bool):
    """The same function in PyTorch (float32): what the backward differentiates."""
    dt = torch.float64 if fq.dtype == torch.float64 else torch.float32
    fq, fk, v, beta = fq.to(dt), fk.to(dt), v.to(dt), beta.to(dt)
    if fmap == "elu":
        fq, fk = F.elu(fq) + 1.0, F.elu(fk) + 1.0
    elif fmap == "relu":
        fq, fk = F.relu(fq), F.relu(fk)
    fq, fk = F.normalize(fq, dim=-1), F.normalize(fk, dim=-1)
    out = far_chunked(fq, fk, v, beta, causal=causal, offset=offset, update_rule="delta", chunk=chunk)
    return out.to(out_dtype) if pure else out


def triton_backward_trusted(x: torch.Tensor) -> bool:
    """Whether the Triton backward (`triton_delta_bwd.py`) runs. It matches float64 autograd in the interpreter
    (tests/kernels/test_linear_triton.py) and, in bf16 on an H200, to 5e-3 (identity map) and 1.4e-2 (elu), the
    forward's own level (`benchmarks/check_linear_cuda.py`). LONGATTN_DELTA_BWD=torch takes the float32 PyTorch
    recompute instead: 3-4x more accurate in bf16 runs, about 60x slower."""
    import os
    return os.environ.get("LONGATTN_DELTA_BWD", "triton") != "torch"


class _FarDelta(torch.autograd.Function):
    """(out, KN, TT, UNEW, H): the far part and, not differentiable, the chunk states its backward reads. Keeping
    them costs about four times k's memory per site and saves the backward their recompute (the inverse, W/u and
    state kernels: ~1.1 ms of a 32K fwd+bwd on an H200, `results/2026-12-01-h200-profile-sampling.md`)."""
    @staticmethod
    def forward(fq, fk, v, beta, options):
        out, states = far_delta_triton(fq, fk, v, beta, keep_states=True, **options)
        return (out, *states)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, v, beta, options = inputs
        ctx.save_for_backward(fq, fk, v, beta, *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.options = options

    @staticmethod
    def backward(ctx, grad_out, *_):
        from .triton_additive import _functorch_wrapped
        from .triton_delta_bwd import far_delta_backward
        fq, fk, v, beta, *states = ctx.saved_tensors
        if any(_functorch_wrapped(t) for t in (grad_out, fq, fk, v, beta)) or not triton_backward_trusted(fq):
            # under torch.func transforms Triton cannot read the wrapped tensors: the same function in PyTorch
            _, vjp = torch.func.vjp(lambda a, b, c, d: far_delta_torch(a, b, c, d, **ctx.options), fq, fk, v, beta)
            return (*vjp(grad_out), None)
        return (*far_delta_backward(grad_out, fq, fk, v, beta, states=states, **ctx.options), None)


def linear_attention_delta_triton(q, k, v, *, scale=None, causal=False, feature_map="elu", num_features=256,
                                  seed=0, sink_tokens=0, local_window=0, normalize=True, eps=1e-6, beta=None,
                                  chunk_size=64, feature_params=None):
    """`linear_attention` with update_rule="delta", normalize=False, on these kernels (mirrors the reference)."""
    import math

    from ..masks import check_qkv
    from .feature_maps import apply_feature_map
    from .reference import beta_per_key, check_options, combine, exact_part, far_keys, far_scale_per_head

    check_qkv(q, k, v, "linear_attention")
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule="delta", chunk_size=chunk_size)
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    exact = exact_part(q, k, v, scale=scale, causal=causal, sink_tokens=sink_tokens, local_window=local_window)
    fr = far_keys(Sq, Sk, causal, sink_tokens, local_window)
    if feature_map == "none" or fr.stop <= fr.start:
        return q.new_zeros(B, Hq, Sq, Dv)  # unnormalised (normalize=False is required here): no far key, no output
    fk = k[:, :, fr.start:fr.stop]
    fq = q
    if feature_map not in FUSED_MAPS:
        feats = apply_feature_map(q, fk, feature_map=feature_map, scale=scale, num_features=num_features,
                                  seed=seed, feature_params=feature_params)
        fq, fk = feats.q, feats.k  # the log-scale drops out: rows are made unit length
    b = beta_per_key(beta, B, Hkv, Sk, q.device, torch.float32)[:, :, fr.start:fr.stop]
    pure = exact is None and "far_scale" not in (feature_params or {})
    options = dict(fmap=feature_map, causal=causal, offset=fr.offset, chunk=chunk_size, out_dtype=q.dtype, pure=pure)
    fv = v[:, :, fr.start:fr.stop]
    far = _FarDelta.apply(fq, fk, fv, b, options)[0] if needs_grad(fq, fk, fv, b) else \
        far_delta_triton(fq, fk, fv, b, **options)
    if pure:
        return far
    c = far_scale_per_head(feature_params, Hq, q.device, torch.float32)
    return combine(exact, far, None, c, normalize=False, eps=eps, Dv=Dv).to(q.dtype)
