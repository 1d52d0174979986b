"""One fused Triton kernel per decoded token for additive linear attention (elu/relu/identity or a learned
hedgehog map), doing what `decode.py` does with a dozen PyTorch ops.

Each query head's step is split over programs: part 0 folds the key that just left the window into its key
head's far state (far_in + φ(k_old)[v_old, 1]ᵀ; the group's first query head writes far_out) and reads the far
part φ(q)ᵀ far; parts 1.. each run an online softmax over 64 of the cached sink and window keys. Each writes
a partial, and the head's last program to finish merges them under the shared normaliser (a per-head counter
orders it after the others). In steady state (a full window) the programs also move the window along, so
a step is one launch; otherwise the caches are PyTorch slicing, and the state is the same
`LinearAttentionState` either way. Work per token is O(F·Dv + (sinks + window)·D) per head, independent of
the context length.
"""
from __future__ import annotations

import functools
import math

import torch

from .decode import LinearAttentionState
from .feature_maps import _hedgehog_weights, feature_dtype
from .reference import DEFAULT_BETA, beta_per_key, check_options, far_scale_per_head
from .triton_additive import FUSED_MAPS

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from .triton_additive import _phi

    @triton.jit
    def _exact_block(q, K, V, n, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc, BN: tl.constexpr):
        """Online softmax of q against n cached keys (K: (n, D), V: (n, Dv), contiguous)."""
        for n0 in range(0, n, BN):
            rows = n0 + offs_n
            mask_n = rows < n
            kt = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < D),
                         other=0.0).to(tl.float32)
            s = tl.where(mask_n, tl.sum(kt * q[None, :], 1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            vt = tl.load(V + rows[:, None] * Dv + offs_v[None, :], mask=mask_n[:, None] & (offs_v[None, :] < Dv),
                         other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
            m = m_new
        return m, l, acc

    @triton.jit
    def _shift_window(WK, WV, WB, KNEW, VNEW, WK_OUT, WV_OUT, WB_OUT, bkv, part, parts, n_win, D, Dv, beta_new,
                      offs_d, offs_v, BN: tl.constexpr):
        """Rows [part·⌈W/parts⌉, …) of the key head's next window: old rows 1..W−1, then the new key."""
        per = (n_win + parts - 1) // parts
        lo = part * per
        hi = tl.minimum(lo + per, n_win)
        base_k = bkv.to(tl.int64) * n_win * D
        base_v = bkv.to(tl.int64) * n_win * Dv
        k_new = tl.load(KNEW + bkv.to(tl.int64) * D + offs_d, mask=offs_d < D, other=0.0).to(WK_OUT.dtype.element_ty)
        v_new = tl.load(VNEW + bkv.to(tl.int64) * Dv + offs_v, mask=offs_v < Dv, other=0.0).to(WV_OUT.dtype.element_ty)
        for r0 in range(lo, hi, BN):
            rows = r0 + tl.arange(0, BN)
            ok = rows < hi
            old = ok & (rows + 1 < n_win)
            last = (rows == n_win - 1)[:, None]
            kd = ok[:, None] & (offs_d[None, :] < D)
            vd = ok[:, None] & (offs_v[None, :] < Dv)
            ko = tl.load(WK + base_k + (rows[:, None] + 1) * D + offs_d[None, :], mask=old[:, None] & kd, other=0.0)
            vo = tl.load(WV + base_v + (rows[:, None] + 1) * Dv + offs_v[None, :], mask=old[:, None] & vd, other=0.0)
            tl.store(WK_OUT + base_k + rows[:, None] * D + offs_d[None, :], tl.where(last, k_new[None, :], ko), mask=kd)
            tl.store(WV_OUT + base_v + rows[:, None] * Dv + offs_v[None, :], tl.where(last, v_new[None, :], vo), mask=vd)
            bo = tl.load(WB + bkv.to(tl.int64) * n_win + rows + 1, mask=old, other=0.0)
            tl.store(WB_OUT + bkv.to(tl.int64) * n_win + rows, tl.where(rows == n_win - 1, beta_new, bo), mask=ok)

    @triton.jit
    def _exact_segment(q, K, V, seg_start, seg_len, lo, hi, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc,
                       BN: tl.constexpr):
        """The part of keys [lo, hi) of the virtual list (sinks | window | new key) that falls in one segment
        of it, which starts at seg_start and holds seg_len keys."""
        a = tl.minimum(tl.maximum(lo - seg_start, 0), seg_len)
        z = tl.minimum(tl.maximum(hi - seg_start, 0), seg_len)
        return _exact_block(q, K + a * D, V + a * Dv, z - a, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc, BN)

    @triton.jit
    def _features(x, FMAP: tl.constexpr, MAP_W, MAP_B, offs_d, mask_d, offs_f, F, phi_scale, HAS_BIAS: tl.constexpr):
        """φ(x) on the far state's feature rows offs_f, zero past them. Elementwise maps: offs_f is offs_d.
        Hedgehog (FMAP 3): [softmax(z), softmax(−z)] with z = (x·phi_scale) W + b, W (D, F) at MAP_W, b at MAP_B."""
        if FMAP == 3:
            f = offs_f % F
            pos = offs_f < F
            valid = offs_f < 2 * F
            w = tl.load(MAP_W + offs_d[:, None] * F + f[None, :], mask=mask_d[:, None] & valid[None, :], other=0.0)
            z = tl.sum((x * phi_scale)[:, None] * w, 0)
            if HAS_BIAS:
                z = z + tl.load(MAP_B + f, mask=valid, other=0.0)
            z = tl.where(pos, z, -z)
            m = tl.where(pos, tl.max(tl.where(pos, z, float("-inf")), 0),
                         tl.max(tl.where(valid & (offs_f >= F), z, float("-inf")), 0))
            e = tl.where(valid, tl.exp(z - m), 0.0)
            return e / tl.where(pos, tl.sum(tl.where(pos, e, 0.0), 0), tl.sum(tl.where(pos, 0.0, e), 0))
        else:
            return tl.where(mask_d, _phi(x, FMAP), 0.0)

    @triton.jit
    def _decode_kernel(Q, FAR_IN, FAR_OUT, KOLD, VOLD, SK, SV, WK, WV, CFAR, O, WB, KNEW, VNEW, WK_OUT, WV_OUT, WB_OUT,
                       PART, COUNT, QW, KW, QB, KB, qw_h, kw_h, qb_h, kb_h, F, FD, phi_scale,
                       Hq, G, n_sink, n_win, D, Dv, W, scale, eps, c_all, beta_new, FMAP: tl.constexpr,
                       HAS_FAR: tl.constexpr, FOLD: tl.constexpr, NORMALIZE: tl.constexpr, PER_HEAD_C: tl.constexpr,
                       n_parts, SHIFT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                       PARTS: tl.constexpr, BF: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Program (query head, part): part 0 the far part, part j >= 1 keys [(j−1)·BN, j·BN) of the exact
        keys (sinks, then the window, then the new key); each writes a partial to PART, and the head's last
        program to finish (a counter in COUNT, reset by it) merges them and writes the output. Splitting a
        head over PARTS programs instead of walking its ~320 keys in one is what makes a step short.
        The far state has FD feature rows (BF padded): D for the elementwise maps, 2F for hedgehog, whose maps
        QW / KW (heads or 1, D, F) and biases QB / KB the programs read at head strides qw_h, kw_h, qb_h, kb_h.
        c_all: the far part's factor when it is one number (PER_HEAD_C False), else CFAR (Hq,) holds it.
        SHIFT: the window WK / WV / WB is full and does not hold the new key KNEW / VNEW yet. The kernel
        then moves it along itself: it attends to its rows 1..W−1 and the new key, folds row 0 (the
        leaving key) into the far state, and the group's programs write the next window to WK_OUT /
        WV_OUT / WB_OUT (a share each), so a steady-state step is this one launch."""
        bhq = tl.program_id(0)
        part = tl.program_id(1)
        b, hq = bhq // Hq, bhq % Hq
        bkv = b * (Hq // G) + hq // G
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        mask_d, mask_v = offs_d < D, offs_v < Dv
        offs_f = tl.arange(0, BF)
        mask_f = offs_f < FD
        q = tl.load(Q + bhq.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        part_row = PART + (bhq.to(tl.int64) * PARTS + part) * (BDV + 2)
        if SHIFT:  # every program of the key head's group copies a share of the next window
            _shift_window(WK, WV, WB, KNEW, VNEW, WK_OUT, WV_OUT, WB_OUT, bkv, (hq % G) * n_parts + part, G * n_parts,
                          n_win, D, Dv, beta_new, offs_d, offs_v, BN)
        if part == 0:
            num = tl.zeros((BDV,), dtype=tl.float32)
            den = tl.sum(tl.zeros((BDV,), dtype=tl.float32), 0)
            if HAS_FAR:  # far rows hold [Σφ(k)vᵀ | Σφ(k)], W = Dv (+ 1 when normalised) floats
                if SHIFT:  # the key leaving the window is its row 0
                    k_old_ptr = WK + bkv.to(tl.int64) * n_win * D
                    v_old_ptr = WV + bkv.to(tl.int64) * n_win * Dv
                else:
                    k_old_ptr = KOLD + bkv.to(tl.int64) * D
                    v_old_ptr = VOLD + bkv.to(tl.int64) * Dv
                f_ptrs = FAR_IN + bkv.to(tl.int64) * FD * W + offs_f[:, None] * W + offs_v[None, :]
                fmask = mask_f[:, None] & mask_v[None, :]
                far = tl.load(f_ptrs, mask=fmask, other=0.0)
                if NORMALIZE:
                    z = tl.load(FAR_IN + bkv.to(tl.int64) * FD * W + offs_f * W + Dv, mask=mask_f, other=0.0)
                if FOLD:
                    ko = tl.load(k_old_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    hk = bkv % (Hq // G)
                    ko = _features(ko, FMAP, KW + hk * kw_h, KB + hk * kb_h, offs_d, mask_d, offs_f, F, phi_scale,
                                   HAS_BIAS)
                    vo = tl.load(v_old_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                    far = far + ko[:, None] * vo[None, :]
                    if NORMALIZE:
                        z = z + ko
                    if hq % G == 0:  # one writer per key head
                        out_ptrs = FAR_OUT + bkv.to(tl.int64) * FD * W + offs_f[:, None] * W + offs_v[None, :]
                        tl.store(out_ptrs, far, mask=fmask)
                        if NORMALIZE:
                            tl.store(FAR_OUT + bkv.to(tl.int64) * FD * W + offs_f * W + Dv, z, mask=mask_f)
                fq = _features(q, FMAP, QW + hq * qw_h, QB + hq * qb_h, offs_d, mask_d, offs_f, F, phi_scale, HAS_BIAS)
                num = tl.sum(fq[:, None] * far, 0)
                if NORMALIZE:
                    den = tl.sum(fq * z, 0)
            tl.store(part_row + offs_v, num)
            tl.store(part_row + BDV, den)
        else:
            # scalars made by reductions so every loop-carried value has one type on every backend
            m = tl.max(tl.full((BDV,), float("-inf"), tl.float32), 0)
            l = tl.sum(tl.zeros((BDV,), dtype=tl.float32), 0)
            acc = tl.zeros((BDV,), dtype=tl.float32)
            lo = (part - 1) * BN
            hi = lo + BN
            offs_n = tl.arange(0, BN)
            m, l, acc = _exact_segment(q, SK + bkv.to(tl.int64) * n_sink * D, SV + bkv.to(tl.int64) * n_sink * Dv,
                                       0, n_sink, lo, hi, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc, BN)
            if SHIFT:  # the window's rows 1..W−1, then the new key
                m, l, acc = _exact_segment(q, WK + (bkv.to(tl.int64) * n_win + 1) * D,
                                           WV + (bkv.to(tl.int64) * n_win + 1) * Dv, n_sink, n_win - 1, lo, hi,
                                           offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc, BN)
                m, l, acc = _exact_segment(q, KNEW + bkv.to(tl.int64) * D, VNEW + bkv.to(tl.int64) * Dv,
                                           n_sink + n_win - 1, 1, lo, hi, offs_n, offs_d, offs_v, D, Dv, scale,
                                           m, l, acc, BN)
            else:  # the window already holds this token's key
                m, l, acc = _exact_segment(q, WK + bkv.to(tl.int64) * n_win * D, WV + bkv.to(tl.int64) * n_win * Dv,
                                           n_sink, n_win, lo, hi, offs_n, offs_d, offs_v, D, Dv, scale, m, l, acc, BN)
            tl.store(part_row + offs_v, acc)
            tl.store(part_row + BDV, m)
            tl.store(part_row + BDV + 1, l)
        # the last program of this head to get here merges: the barrier orders the CTA's stores before
        # the counter's release, the acquire orders the merge's loads after everyone's
        tl.debug_barrier()
        done = tl.atomic_add(COUNT + bhq, 1, sem="acq_rel")
        if done == n_parts - 1:
            tl.atomic_xchg(COUNT + bhq, 0)  # ready for the next step (and for CUDA-graph replays)
            parts = tl.arange(0, PARTS)
            rows = PART + (bhq.to(tl.int64) * PARTS + parts) * (BDV + 2)
            exact = (parts > 0) & (parts < n_parts)
            tiles = tl.load(rows[:, None] + offs_v[None, :], mask=exact[:, None], other=0.0, cache_modifier=".cg")
            ms = tl.load(rows + BDV, mask=exact, other=float("-inf"), cache_modifier=".cg")
            ls = tl.load(rows + BDV + 1, mask=exact, other=0.0, cache_modifier=".cg")
            m = tl.max(ms, 0)
            w_p = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - tl.where(m == float("-inf"), 0.0, m)))
            acc = tl.sum(w_p[:, None] * tiles, 0)
            l = tl.sum(w_p * ls, 0)
            far_row = PART + bhq.to(tl.int64) * PARTS * (BDV + 2)
            num = tl.load(far_row + offs_v, cache_modifier=".cg")
            den = tl.load(far_row + BDV, cache_modifier=".cg")
            if PER_HEAD_C:
                c = tl.load(CFAR + hq)
            else:
                c = c_all
            if NORMALIZE:
                M = tl.maximum(m, 0.0)
                we = tl.exp(m - M)  # 0 when there is no exact key (m = −inf)
                wf = c * tl.exp(-M)
                out = (we * acc + wf * num) / (we * l + wf * den + eps * tl.exp(-M))
            else:
                out = c * num
            tl.store(O + bhq.to(tl.int64) * Dv + offs_v, out.to(O.dtype.element_ty), mask=mask_v)


KEYS_PER_PROGRAM = 64  # exact keys per program of a decode step (a power of two)
_counter_buffers: dict = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """n int32 zeros, one per query head: the decode kernel's finish counters. Each step's merging program
    resets its counter, so one buffer per device serves every step (and CUDA-graph replays)."""
    buf = _counter_buffers.get(device)
    if buf is None or buf.numel() < n:
        buf = _counter_buffers[device] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return buf


HEDGEHOG = 3  # the kernel's FMAP for the learned hedgehog map (the elementwise maps keep FUSED_MAPS' ids)
# Register spill (bytes) that the compile gate (tests/kernels/compile_gate.py) allows in bf16 builds for sm_90: with
# a hedgehog map (a D x F map tile and a 2F x Dv far state, 8 warps) 0-32 bytes: one vector of work per program, so a
# few stack slots do not show against its launch; none with the elementwise maps.
SPILL_LIMITS = {"_decode_kernel": 0, f"_decode_kernel FMAP={HEDGEHOG}": 48}
_device_copies: dict = {}


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t as contiguous float32 on device, copied once per source tensor (a decode step must not copy the
    map's weights from the host every token). The cache keeps the source alive, so its id stays its own."""
    if t.device == device and t.dtype == torch.float32 and t.is_contiguous():
        return t
    key = (id(t), device)
    hit = _device_copies.get(key)
    if hit is None or hit[0] is not t:
        if len(_device_copies) > 4096:  # a bound, far above a model's layers × 4 maps
            _device_copies.clear()
        hit = _device_copies[key] = (t, t.detach().to(device=device, dtype=torch.float32).contiguous())
    return hit[1]


@functools.lru_cache(maxsize=16)
def _zero_bias(heads: int, F: int) -> torch.Tensor:
    return torch.zeros(heads, F)


def _map_arguments(feature_map, feature_params, Hq, Hkv, D, scale, device, dummy):
    """(QW, KW, QB, KB, qw_h, kw_h, qb_h, kb_h, F, FD, phi_scale, HAS_BIAS, BF) for the decode kernel."""
    if feature_map != "hedgehog":
        bd = max(16, triton.next_power_of_2(D))
        return (dummy,) * 4 + (0, 0, 0, 0, 1, D, 1.0, False, bd)
    wq, bq = _hedgehog_weights(feature_params, "q", Hq, D)
    wk, bk = _hedgehog_weights(feature_params, "k", Hkv, D)
    F = wq.shape[-1]
    if wk.shape[-1] != F:
        raise ValueError(f"linear_attention_step: hedgehog q and k maps differ in width ({F} vs {wk.shape[-1]})")
    wq, wk = _on_device(wq, device), _on_device(wk, device)
    if (bq is None) != (bk is None):  # one of the two: the other is zeros (made once, cached by its source)
        bq, bk = (b if b is not None else _zero_bias(w.shape[0], F) for b, w in ((bq, wq), (bk, wk)))
    has_bias = bq is not None
    bq, bk = (_on_device(b, device) if has_bias else w for b, w in ((bq, wq), (bk, wk)))  # else never read
    head = lambda t, per_head: per_head if t.shape[0] > 1 else 0  # noqa: E731  (one map shared by all heads)
    return (wq, wk, bq, bk, head(wq, D * F), head(wk, D * F), head(bq, F), head(bk, F), F, 2 * F,
            math.sqrt(scale), has_bias, max(16, triton.next_power_of_2(2 * F)))


def decode_warps(D: int, FD: int, Dv: int) -> int:
    """num_warps of a decode step: 8 once the far state (FD x Dv) or the key tiles outgrow 64 x 64."""
    return 8 if max(D, FD) * Dv > 64 * 64 else 4


def supports(q, feature_map: str, update_rule: str) -> bool:
    import os
    if triton is None or q.dtype == torch.float64 or update_rule != "add":
        return False
    if feature_map not in FUSED_MAPS and feature_map != "hedgehog":
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def linear_attention_step_triton(q, k, v, state, *, scale=None, causal=True, feature_map="elu", num_features=256,
                                 seed=0, sink_tokens=0, local_window=0, normalize=True, eps=1e-6,
                                 update_rule="add", beta=None, chunk_size=64, feature_params=None):
    """`linear_attention_step` (same arguments, state and result) for the additive rule with elu/relu/identity
    or a learned hedgehog map."""
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule=update_rule, chunk_size=chunk_size,
                  where="linear_attention_step")
    if not causal:
        raise ValueError("linear_attention_step: decoding is causal; got causal=False")
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = feature_dtype(q.dtype)
    state = LinearAttentionState.empty(k.to(dt), v.to(dt)) if state is None else state
    betas = None  # carried in the window for the delta path's sake, made when a key enters the window
    c_value = (feature_params or {}).get("far_scale", 1.0)
    per_head_c = not isinstance(c_value, (int, float))  # one number: a kernel argument, no tensor per step
    c = far_scale_per_head(feature_params, Hq, q.device, torch.float32).contiguous() if per_head_c else None
    width = Dv + int(normalize)
    maps = _map_arguments(feature_map, feature_params, Hq, Hkv, D, scale, q.device, q)
    FD = maps[9]
    beta_value = DEFAULT_BETA if beta is None else beta
    scalar_beta = isinstance(beta_value, (int, float)) and 0.0 <= beta_value <= 2.0
    outs = []
    for t in range(S):
        p = state.position
        sk, sv = state.sink_k, state.sink_v
        wk, wv, wb = state.window_k, state.window_v, state.window_beta
        # steady state: a full window that the kernel moves along itself (one launch, no cache ops)
        shift = local_window > 0 and p >= sink_tokens and wk.shape[2] == local_window and scalar_beta
        k_new = v_new = wk_out = wv_out = wb_out = None
        if shift:
            fold = True
            k_old = v_old = None
            k_new, v_new = (x[:, :, t] if x[:, :, t].is_contiguous() else x[:, :, t].contiguous() for x in (k, v))
            wk, wv, wb = (x if x.is_contiguous() else x.contiguous() for x in (wk, wv, wb))
            wk_out, wv_out, wb_out = torch.empty_like(wk), torch.empty_like(wv), torch.empty_like(wb)
        elif p >= sink_tokens and local_window == 0:
            # no window: the new key folds into the far state at once, read where it lies (the kernel converts)
            fold = True
            k_old, v_old = k[:, :, t], v[:, :, t]
            k_old = k_old if k_old.is_contiguous() else k_old.contiguous()
            v_old = v_old if v_old.is_contiguous() else v_old.contiguous()
        else:
            kt, vt = k[:, :, t:t + 1].to(dt), v[:, :, t:t + 1].to(dt)
            if p < sink_tokens:
                sk, sv = torch.cat([sk, kt], 2), torch.cat([sv, vt], 2)
            else:
                betas = beta_per_key(beta, B, Hkv, S, q.device, dt) if betas is None else betas
                wk, wv, wb = torch.cat([wk, kt], 2), torch.cat([wv, vt], 2), torch.cat([wb, betas[:, :, t:t + 1]], 2)
            fold = wk.shape[2] > local_window
            k_old = v_old = None
            if fold:
                k_old, v_old = wk[:, :, 0].contiguous(), wv[:, :, 0].contiguous()
                wk, wv, wb = wk[:, :, 1:], wv[:, :, 1:], wb[:, :, 1:]
        far_in = state.far
        if fold and far_in is None:
            far_in = torch.zeros(B, Hkv, FD, width, dtype=dt, device=q.device)
        far_out = torch.empty_like(far_in) if fold else far_in
        sk, sv, wk, wv = (x if x.is_contiguous() else x.contiguous() for x in (sk, sv, wk, wv))
        out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
        qt = q[:, :, t:t + 1]
        bdv = max(16, triton.next_power_of_2(Dv))
        n_parts = 1 + triton.cdiv(sk.shape[2] + wk.shape[2], KEYS_PER_PROGRAM)  # the far part + exact key slices
        parts = triton.next_power_of_2(n_parts)
        partials = torch.empty(B * Hq, parts, bdv + 2, dtype=torch.float32, device=q.device)
        _decode_kernel[(B * Hq, n_parts)](
            qt if qt.is_contiguous() else qt.contiguous(), *(out if x is None else x for x in (
                far_in, far_out, k_old, v_old, sk, sv, wk, wv, c, out, wb, k_new, v_new, wk_out, wv_out, wb_out)),
            partials, _counters(B * Hq, q.device), *maps[:11],
            Hq, G, sk.shape[2], wk.shape[2], D, Dv, width, scale, float(eps), 1.0 if per_head_c else float(c_value),
            float(beta_value) if scalar_beta else 1.0,
            FMAP=HEDGEHOG if feature_map == "hedgehog" else FUSED_MAPS[feature_map], HAS_FAR=far_in is not None, FOLD=fold, NORMALIZE=normalize,
            PER_HEAD_C=per_head_c, n_parts=n_parts, SHIFT=shift, BD=max(16, triton.next_power_of_2(D)), BDV=bdv,
            BN=KEYS_PER_PROGRAM, PARTS=parts, HAS_BIAS=maps[11], BF=maps[12],
            num_warps=decode_warps(D, FD, Dv))
        outs.append(out)
        if shift:
            wk, wv, wb = wk_out, wv_out, wb_out
        state = LinearAttentionState(p + 1, far_out, sk, sv, wk, wv, wb)
    return torch.cat(outs, dim=2) if S > 1 else outs[0], state
