"""Each longattn site as its reference computation in standard ATen ops, for the lowered MLIR outputs.

torch-mlir lowers only the ops it knows to linalg / StableHLO / TOSA, so before a rewritten graph is imported
for one of those, every `torch.ops.longattn.attention` call is swapped for `attention_reference`, a plain
function of the same arguments that torch.export traces into matmuls, reductions and elementwise ops. The
export is static, so the key length, and with it the band the op would run, is known at trace time.

- exact / flash: exact attention (`exact_attention`), written without `isfinite` (torch-mlir lowers it to neither
  linalg nor TOSA) and with the op's convention for rows that see no key (0, where softmax gives NaN);
- linear, additive rule, maps elu / relu / identity / taylor2 / hedgehog: the kind's dense definition
  (`kernels.linear.linear_attention_quadratic`, what the kernel's own tests check its other forms against);
- anything else (hyper, the delta rule, favor, the sinks-and-window-only map, dropout) is refused by `why_not`,
  which names what cannot be expressed; the caller names the site.

`check_site` runs the op and the reference on the same random inputs before the swap: a site whose reference
disagrees is an error, never a silently different model.
"""
from __future__ import annotations

import torch

from ... import kernels  # noqa: F401  (registers torch.ops.longattn.attention)
from ...kernels.linear import linear_attention_quadratic
from ...kernels.masks import as_additive
from ...plan import Band, band_for_length, encode_plan

OP = torch.ops.longattn.attention.default
# linear maps whose dense form is deterministic ATen code with no zero-sized tensor
LINEAR_MAPS = ("elu", "relu", "identity", "taylor2", "hedgehog")
# params the dense form does not take: how the far part is computed (chunks) or where it runs, not what it is
_SCHEDULE_PARAMS = ("chunk_size", "update_rule", "beta", "context_parallel", "site")
# random inputs for the check: at most this many scores; longer sites are checked at a shorter length
MAX_CHECK_SCORES = 1 << 22


def band_at(plan: str, key_length: int) -> Band:
    return band_for_length(plan, key_length)


def why_not(band: Band, dropout_p: float, has_seed: bool) -> str | None:
    """Why this band cannot be written in standard ops (None when it can)."""
    if dropout_p > 0 or has_seed:
        return f"dropout (p={dropout_p}) draws a random mask at run time; export the model in eval mode"
    if band.kind in ("exact", "flash"):
        return None
    if band.kind == "hyper":
        return ("hyper: its key blocks come from a data-dependent LSH sort and its sampled keys from a seeded "
                "generator at run time; no static standard-op form is given")
    p = band.params
    if p.get("update_rule", "add") != "add":
        return "linear with update_rule=delta: its state is a sequential recurrence (triangular solves per chunk)"
    fmap = p.get("feature_map", "elu")
    if fmap not in LINEAR_MAPS:
        reason = {"favor": "its random features are drawn from a seeded generator, which torch.export records as a "
                           "random op", "none": "sinks and window only: torch-mlir crashes on its zero-width "
                                                "feature tensors"}.get(fmap, "unknown map")
        return f"linear with feature_map={fmap}: {reason}"
    if p.get("beta") is not None:
        return "linear with a per-token beta"
    return None


def exact_attention(q, k, v, attn_mask, scale: float, causal: bool):
    """softmax(q·kᵀ·scale + mask)·v with the op's conventions: GQA (query head h reads key head h // groups),
    bottom-right causal, bool mask = keep, float mask added; rows with no visible key give 0. Accumulates in
    float32 (float64 stays float64) and returns q's dtype, as the kernels do."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if groups > 1:  # the reference spells GQA out; a downstream kernel reads the grouping from the attributes
        k = k[:, :, None].expand(B, Hkv, groups, Sk, D).reshape(B, Hq, Sk, D)
        v = v[:, :, None].expand(B, Hkv, groups, Sk, Dv).reshape(B, Hq, Sk, Dv)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s + as_additive(attn_mask, acc)
    if causal:
        rows = torch.arange(Sq, device=q.device)[:, None]
        cols = torch.arange(Sk, device=q.device)[None, :]
        s = s.masked_fill(cols > rows + (Sk - Sq), float("-inf"))
    # a row of -inf has max -inf: clamping it to the lowest finite value keeps exp(s - m) at 0, not NaN
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(acc)) / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(q.dtype)


def run_reference(band: Band, q, k, v, attn_mask, scale: float, causal: bool):
    if band.kind in ("exact", "flash"):
        return exact_attention(q, k, v, attn_mask, scale, causal)
    params = {n: p for n, p in band.params.items() if n not in _SCHEDULE_PARAMS}
    if isinstance(params.get("feature_params"), str):  # a calibration file reference, read as the op reads it
        from ...kernels.linear.params_file import feature_params_from_file
        params["feature_params"] = feature_params_from_file(params["feature_params"])
    return linear_attention_quadratic(q, k, v, scale=scale, causal=causal, **params)


def attention_reference(q, k, v, attn_mask, scale, causal, dropout_p, seed, plan):
    """Drop-in for `torch.ops.longattn.attention` (same arguments) in standard ops, at static shapes."""
    band = band_at(plan, k.shape[-2])
    reason = why_not(band, dropout_p, seed is not None)
    if reason is not None:  # the exporter checks every site first; this guards direct use
        raise ValueError(f"longattn: cannot write this attention in standard ops: {reason}")
    return run_reference(band, q, k, v, attn_mask, scale, causal)


def _check_sizes(q, k, v, mask) -> tuple:
    """Shapes to check at: the traced ones, or, past MAX_CHECK_SCORES, lengths cut to at most 128 keys with
    the same query/key offset where it fits (a mask's length dims follow)."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if B * Hq * Sq * Sk <= MAX_CHECK_SCORES:
        return q.shape, k.shape, v.shape, None if mask is None else mask.shape
    sk = min(Sk, 128)
    sq = min(Sq, max(1, sk - (Sk - Sq))) if Sq <= Sk else sk + min(Sq - Sk, 32)

    def cut(shape, length_dims):
        shape = list(shape)
        for dim, (old, new) in length_dims.items():
            if shape[dim] == old:
                shape[dim] = new
        return torch.Size(shape)
    q_shape = cut(q.shape, {2: (Sq, sq)})
    return (q_shape, cut(k.shape, {2: (Sk, sk)}), cut(v.shape, {2: (Sk, sk)}),
            None if mask is None else cut(mask.shape, {-2: (Sq, sq), -1: (Sk, sk)}))


def check_site(band: Band, q, k, v, mask, scale: float, causal: bool) -> float:
    """Run the op (this band alone) and `run_reference` on random inputs shaped like the site's (q, k, v, mask:
    tensors or fake tensors, only shapes and dtypes are read); return the largest difference, raise ValueError
    when it is beyond float rounding."""
    gen = torch.Generator().manual_seed(0)
    q_shape, k_shape, v_shape, m_shape = _check_sizes(q, k, v, mask)
    rq, rk, rv = (torch.randn(s, generator=gen).to(t.dtype) for s, t in ((q_shape, q), (k_shape, k), (v_shape, v)))
    rm = None
    if mask is not None:
        if mask.dtype == torch.bool:
            rm = torch.rand(m_shape, generator=gen) > 0.3
            rm[..., 0] = True  # every row keeps a key: fully masked rows are a convention, checked in the tests
        else:
            rm = torch.randn(m_shape, generator=gen).to(mask.dtype)
    with torch.no_grad():
        want = OP(rq, rk, rv, rm, float(scale), bool(causal), 0.0, None, encode_plan([Band(band.kind, None,
                                                                                         band.params)]))
        got = run_reference(band, rq, rk, rv, rm, float(scale), bool(causal))
    tol = 1e-4 if q.dtype in (torch.float32, torch.float64) else 2e-2
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise ValueError(f"the standard-op reference of the {band.kind} band disagrees with the op on random inputs "
                         f"(max err {err:.3g}, shapes {tuple(q_shape)} / {tuple(k_shape)})")
    return err
