"""One layer's fit: the far part's scale c_h and, for hedgehog, its maps, on captured Q/K/V (see the package
docstring); the fits' file and a one-line summary."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..kernels.linear import apply_feature_map, linear_attention
from ..kernels.linear.params_file import save_file

FITTED_MAPS = ("elu", "relu", "favor", "taylor2", "hedgehog", "identity")


@dataclass
class LayerFit:
    layer: int
    params: dict                       # feature_params for this layer: far_scale, q_weight, ...
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    stage1_params: Optional[dict] = None  # with hybrid_steps: the maps after the far-key stage, far_scale fitted
    adapters: dict = field(default_factory=dict)  # distill_model's adapter_rank: {projection: (A, B, row sums)}


# ----------------------------------------------------------------------------------------------- row targets

@dataclass
class _Rows:
    """Sampled causal query rows with far keys, and softmax's view of them (per query head)."""
    pos: torch.Tensor       # (n,) query positions
    q: torch.Tensor         # (Hq, n, D)
    s: torch.Tensor         # (Hq, n, S) scaled scores, -inf where invisible
    exact: torch.Tensor     # (n, S) bool: sink or window key
    far: torch.Tensor       # (n, S) bool
    log_e: torch.Tensor     # (Hq, n) log Σ_exact exp(s)
    log_b: torch.Tensor     # (Hq, n) log Σ_far exp(s)
    t_far: torch.Tensor     # (Hq, n, S) softmax restricted to the far keys (0 elsewhere)
    t_all: torch.Tensor     # (Hq, n, S) softmax over the visible keys
    win: torch.Tensor       # (n,) which calibration sequence (window) each row comes from

    def take(self, idx) -> "_Rows":
        return _Rows(self.pos[idx], self.q[:, idx], self.s[:, idx], self.exact[idx], self.far[idx],
                     self.log_e[:, idx], self.log_b[:, idx], self.t_far[:, idx], self.t_all[:, idx], self.win[idx])

    @staticmethod
    def cat(parts: list) -> "_Rows":
        per_head = ("q", "s", "log_e", "log_b", "t_far", "t_all")  # (Hq, n, ...): rows on dim 1
        return _Rows(*(torch.cat([getattr(x, f) for x in parts], dim=1 if f in per_head else 0)
                       for f in ("pos", "q", "s", "exact", "far", "log_e", "log_b", "t_far", "t_all", "win")))


def _rows(q, k, *, scale, sink_tokens, local_window, rows, generator, win: int = 0) -> _Rows:
    """q (Hq, S, D), k (Hkv, S, D), causal and aligned (Sq = Sk); `win` labels the sequence."""
    Hq, S, _ = q.shape
    G = Hq // k.shape[0]
    first = sink_tokens + local_window   # the first position with a far key
    if first >= S:
        raise ValueError(f"calibrate: {S} tokens leave no far keys for sink_tokens={sink_tokens} + "
                         f"local_window={local_window}; calibrate on a longer text")
    pos = torch.arange(first, S)
    if rows and rows < pos.numel():
        pos = pos[torch.randperm(pos.numel(), generator=generator)[:rows]].sort().values
    j = torch.arange(S)
    p = pos[:, None]
    visible = j[None] <= p
    exact = visible & ((j[None] < sink_tokens) | (j[None] > p - local_window))
    far = visible & ~exact
    kk = k.repeat_interleave(G, dim=0)
    s = torch.einsum("hnd,hsd->hns", q[:, pos], kk) * scale
    s = s.masked_fill(~visible, float("-inf"))
    ninf = torch.tensor(float("-inf"))
    log_e = torch.where(exact, s, ninf).logsumexp(-1)
    log_b = torch.where(far, s, ninf).logsumexp(-1)
    t_far = torch.softmax(s.masked_fill(~far, float("-inf")), -1)
    return _Rows(pos, q[:, pos], s, exact, far, log_e, log_b, t_far, torch.softmax(s, -1),
                 torch.full((pos.numel(),), win, dtype=torch.long))


def _far_phi(rows: _Rows, k, *, feature_map, scale, num_features, seed, feature_params):
    """Σ-free far weights φ(q_i)·φ(k_j) (Hq, n, S) (0 off the far keys), times exp(q_log_scale).
    k (Hkv, S, D), or (W, Hkv, S, D) for rows from W sequences (`rows.win`)."""
    k = k if k.dim() == 4 else k.unsqueeze(0)
    Hq = rows.q.shape[0]
    G = Hq // k.shape[1]
    feats = apply_feature_map(rows.q.unsqueeze(0), k, feature_map=feature_map, scale=scale,
                              num_features=num_features, seed=seed, feature_params=feature_params)
    fk = feats.k.repeat_interleave(G, dim=1)    # (W, Hq, S, F)
    fq = feats.q[0]
    if k.shape[0] == 1:
        phi = torch.einsum("hnf,hsf->hns", fq, fk[0])
    else:
        phi = torch.cat([torch.einsum("hnf,hsf->hns", fq[:, rows.win == w], fk[w]) for w in range(k.shape[0])], 1)
        order = torch.cat([torch.nonzero(rows.win == w).flatten() for w in range(k.shape[0])])
        phi = phi[:, torch.argsort(order)]
    if feats.q_log_scale is not None:
        phi = phi * torch.exp(feats.q_log_scale[0]).unsqueeze(-1)
    return phi * rows.far


def fit_far_scale(rows: _Rows, phi: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-head c minimising Σ_rows (σ(log c + log A − log E) − σ(log B − log E))²; returns (c (Hq,), stats).
    A head whose rows have no exact key (pure linear attention) keeps c = 1: there c cancels in the
    normaliser, every c has the same loss, and the search would return its lower end."""
    log_a = phi.sum(-1).clamp_min(1e-30).log()
    x = (log_a - rows.log_e).double()           # (Hq, n)
    target = torch.sigmoid((rows.log_b - rows.log_e).double())

    def loss(t):                                # t (m,) or (Hq, m) candidates -> (Hq, m)
        t = t if t.dim() == 2 else t.expand(x.shape[0], -1)
        return (torch.sigmoid(t[:, :, None] + x[:, None, :]) - target[:, None, :]).pow(2).mean(-1)

    grid = torch.arange(-40.0, 20.0, 0.1, dtype=torch.float64)
    best = grid[loss(grid).argmin(-1)]          # (Hq,)
    for step in (0.01, 0.001):
        fine = best[:, None] + torch.arange(-10, 11, dtype=torch.float64) * step
        best = fine.gather(1, loss(fine).argmin(-1, keepdim=True)).squeeze(1)
    best = torch.where(torch.isfinite(rows.log_e).any(-1), best, torch.zeros_like(best))
    rms = lambda t: loss(t[:, None]).squeeze(1).sqrt()
    stats = {"far_share": target.mean().item(),
             "share_rms_c1": rms(torch.zeros_like(best)).mean().item(),
             "share_rms_fitted": rms(best).mean().item(),
             "log_far_scale": best.tolist()}
    return torch.exp(best).float(), stats


def far_distillation_loss(rows: _Rows, phi: torch.Tensor) -> torch.Tensor:
    """Hedgehog's loss on far keys: CE(softmax restricted to far keys, φφ normalised over far keys), row mean.
    (Σ_j t_j log(φ_j / Σφ) = Σ_j t_j log φ_j − log Σφ, t summing to 1 over the far keys.)"""
    return -((rows.t_far * phi.clamp_min(1e-30).log()).sum(-1) - phi.sum(-1).clamp_min(1e-30).log()).mean()


def hybrid_loss(rows: _Rows, phi: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """CE(softmax over the whole visible row, hybrid weights: exp(s) on exact keys, c·φφ on far keys)."""
    s, far, exact, target = rows.s, rows.far, rows.exact, rows.t_all
    logw = torch.where(exact, s, torch.where(far, log_c[:, None, None] + phi.clamp_min(1e-30).log(),
                                             torch.tensor(float("-inf"))))
    logp = logw - logw.logsumexp(-1, keepdim=True)
    return -(target * torch.where(exact | far, logp, torch.zeros_like(logp))).sum(-1).mean()


def _rows_times_v(p: torch.Tensor, rows: _Rows, v: torch.Tensor) -> torch.Tensor:
    """p (Hq, n, S) @ each row's sequence's v; v (W, Hq, S, Dv) -> (Hq, n, Dv)."""
    out = p.new_zeros(p.shape[0], p.shape[1], v.shape[-1])
    for w in range(v.shape[0]):
        sel = rows.win == w
        if sel.any():
            out[:, sel] = p[:, sel] @ v[w]
    return out


def output_loss(rows: _Rows, phi: torch.Tensor, log_c: torch.Tensor, v: torch.Tensor, target: torch.Tensor):
    """Σ||o − o*||² / Σ||o*||² of the hybrid's attention output on the rows (v (W, Hq, S, Dv) per sequence,
    target o* (Hq, n, Dv))."""
    s, far, exact = rows.s, rows.far, rows.exact
    logw = torch.where(exact, s, torch.where(far, log_c[:, None, None] + phi.clamp_min(1e-30).log(),
                                             torch.tensor(float("-inf"))))
    out = _rows_times_v(torch.softmax(logw, -1), rows, v)
    return (out - target).pow(2).sum() / target.pow(2).sum()


# ----------------------------------------------------------------------------------------------- one layer

def _hedgehog_phi(rows: _Rows, k, params, scale):
    return _far_phi(rows, k, feature_map="hedgehog", scale=scale, num_features=0, seed=0, feature_params=params)


def fit_layer(q, k, v, *, scale: float, feature_map: str = "hedgehog", sink_tokens: int = 64,
              local_window: int = 256, rows: int = 512, steps: int = 200, lr: float = 2e-2, batch_rows: int = 32,
              hedgehog_dim: Optional[int] = None, hybrid_steps: int = 0, output_steps: int = 0,
              num_features: int = 256, seed: int = 0, layer: int = 0, measure_output: bool = True) -> LayerFit:
    """Fit one causal self-attention layer. q (W, Hq, S, D), k/v (W, Hkv, S, D|Dv): W calibration sequences
    (windows), each its own causal sequence, `rows` query rows sampled from each (3-D tensors: W = 1).

    Returns the layer's feature_params (far_scale, and the hedgehog weights for feature_map="hedgehog") and
    stats: far-key distillation loss before/after training, the far share's RMS error at c = 1 and fitted,
    and (measure_output) the attention output's relative error vs exact for far keys dropped, c = 1 and fitted.
    """
    if feature_map not in FITTED_MAPS:
        raise ValueError(f"calibrate: feature_map must be one of {', '.join(FITTED_MAPS)}, got {feature_map!r}")
    # softmax features and their gradients underflow into subnormal floats as training sharpens the maps,
    # which CPUs compute tens of times slower: flush them to zero while fitting
    flush = torch.set_flush_denormal(True)
    try:
        return _fit_layer(q, k, v, scale=scale, feature_map=feature_map, sink_tokens=sink_tokens,
                          local_window=local_window, rows=rows, steps=steps, lr=lr, batch_rows=batch_rows,
                          hedgehog_dim=hedgehog_dim, hybrid_steps=hybrid_steps, output_steps=output_steps,
                          num_features=num_features, seed=seed, layer=layer, measure_output=measure_output)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _fit_layer(q, k, v, *, scale, feature_map, sink_tokens, local_window, rows, steps, lr, batch_rows, hedgehog_dim,
               hybrid_steps, output_steps, num_features, seed, layer, measure_output) -> LayerFit:
    t0 = time.time()
    q, k, v = (t.detach().float() for t in (q, k, v))
    if q.dim() == 3:
        q, k, v = q[None], k[None], v[None]
    g = torch.Generator().manual_seed(seed)
    # rows from every sequence of the batch (each its own causal window); stats on the output use the first
    r = _Rows.cat([_rows(q[w], k[w], scale=scale, sink_tokens=sink_tokens, local_window=local_window, rows=rows,
                         generator=g, win=w) for w in range(q.shape[0])])
    stats: dict = {"rows": int(r.pos.numel()), "tokens": int(q.shape[0] * q.shape[2])}
    kk, vv_all = k, v
    q, k, v = q[0], k[0], v[0]
    params: dict = {}
    stage1 = None
    if feature_map == "hedgehog":
        Hq, D = q.shape[0], q.shape[-1]
        Hkv = kk.shape[1]
        Fd = hedgehog_dim or D
        eye = torch.eye(D, Fd)
        p = {"q_weight": eye.repeat(Hq, 1, 1).requires_grad_(), "k_weight": eye.repeat(Hkv, 1, 1).requires_grad_(),
             "q_bias": torch.zeros(Hq, Fd, requires_grad=True), "k_bias": torch.zeros(Hkv, Fd, requires_grad=True)}
        with torch.no_grad():
            stats["far_ce_init"] = far_distillation_loss(r, _hedgehog_phi(r, kk, p, scale)).item()
        opt = torch.optim.Adam(list(p.values()), lr=lr)
        n = r.pos.numel()
        for _ in range(steps):
            idx = torch.randint(0, n, (min(batch_rows, n),), generator=g)
            sub = r.take(idx)
            loss = far_distillation_loss(sub, _hedgehog_phi(sub, kk, p, scale))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            phi = _hedgehog_phi(r, kk, p, scale)
            stats["far_ce_trained"] = far_distillation_loss(r, phi).item()
            stats["far_ce_floor"] = _entropy_far(r)
        params = {name: t.detach() for name, t in p.items()}
        if hybrid_steps or output_steps:
            c, _ = fit_far_scale(r, phi)
            stage1 = {**params, "far_scale": c}
            log_c = c.double().log().float().requires_grad_()
            p = {name: t.clone().requires_grad_() for name, t in params.items()}
            G = Hq // Hkv
            vv = vv_all.repeat_interleave(G, dim=1)
            o_star = _rows_times_v(r.t_all, r, vv)
            losses = {"hybrid_ce": lambda sub, idx: hybrid_loss(sub, _hedgehog_phi(sub, kk, p, scale), log_c),
                      "out_mse": lambda sub, idx: output_loss(sub, _hedgehog_phi(sub, kk, p, scale), log_c, vv,
                                                              o_star[:, idx])}
            for name, n_steps in (("hybrid_ce", hybrid_steps), ("out_mse", output_steps)):
                if not n_steps:
                    continue
                opt = torch.optim.Adam([*p.values(), log_c], lr=lr)
                with torch.no_grad():
                    stats[f"{name}_start"] = losses[name](r, slice(None)).item()
                for _ in range(n_steps):
                    idx = torch.randint(0, n, (min(batch_rows, n),), generator=g)
                    loss = losses[name](r.take(idx), idx)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    stats[f"{name}_trained"] = losses[name](r, slice(None)).item()
            params = {name: t.detach() for name, t in p.items()}
            phi = _hedgehog_phi(r, kk, params, scale)
    with torch.no_grad():
        phi = _far_phi(r, kk, feature_map=feature_map, scale=scale, num_features=num_features, seed=seed,
                       feature_params=params or None)
        c, scale_stats = fit_far_scale(r, phi)
        stats.update(scale_stats)
        if feature_map == "hedgehog" and (hybrid_steps or output_steps):
            # the second stage learned log c with the maps: keep it where the whole-row loss says it is better
            learned = log_c.detach().exp()
            judge = (lambda c_: output_loss(r, phi, c_.log(), vv, o_star)) if output_steps else \
                (lambda c_: hybrid_loss(r, phi, c_.log()))
            if judge(learned) < judge(c):
                c = learned
                stats["far_scale_from"] = "hybrid stage"
        stats["hybrid_ce_c1"] = hybrid_loss(r, phi, torch.zeros_like(c)).item()
        stats["hybrid_ce_fitted"] = hybrid_loss(r, phi, c.log()).item()
    params["far_scale"] = c
    if measure_output:
        stats.update(output_errors(q, kk[0], vv_all[0], scale=scale, feature_map=feature_map, sink_tokens=sink_tokens,
                                   local_window=local_window, params=params, num_features=num_features, seed=seed))
    return LayerFit(layer, params, stats, time.time() - t0,
                    stage1_params=stage1)


def _entropy_far(r: _Rows) -> float:
    """The far loss's floor: the entropy of softmax restricted to far keys."""
    p = r.t_far
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1).mean().item()


@torch.no_grad()
def output_errors(q, k, v, *, scale, feature_map, sink_tokens, local_window, params, num_features=256, seed=0,
                  from_position: Optional[int] = None) -> dict:
    """Relative error ||o − o*|| / ||o*|| of the layer's attention output over rows with far keys, vs exact
    softmax, for: far keys dropped (when there is an exact part to keep), the map with c = 1, and the fitted
    parameters."""
    q4, k4, v4 = q[None], k[None], v[None]
    exact = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                                             enable_gqa=True)
    start = sink_tokens + local_window if from_position is None else from_position
    rel = lambda o: ((o - exact)[:, :, start:].norm() / exact[:, :, start:].norm()).item()
    common = dict(scale=scale, causal=True, sink_tokens=sink_tokens, local_window=local_window)
    out = {}
    if sink_tokens or local_window:
        out["out_err_dropped"] = rel(linear_attention(q4, k4, v4, feature_map="none", **common))
    uncal = {k_: v_ for k_, v_ in params.items() if k_ != "far_scale"} or None
    if feature_map != "hedgehog":
        out["out_err_c1"] = rel(linear_attention(q4, k4, v4, feature_map=feature_map, num_features=num_features,
                                                 seed=seed, feature_params=uncal, **common))
    out["out_err_fitted"] = rel(linear_attention(q4, k4, v4, feature_map=feature_map, num_features=num_features,
                                                 seed=seed, feature_params=params, **common))
    return out


def save_calibration(path: str, fits: dict, metadata: Optional[dict] = None) -> None:
    """Write the fitted parameters as per-layer sections (`kernels/linear/params_file.py`), atomically."""
    adapters = {layer: fit.adapters for layer, fit in fits.items() if fit.adapters}
    if adapters:
        metadata = {**(metadata or {}), "adapters": "q/k/v/o projection corrections: merge them into the model "
                    "(longattn.calibrate.merge_adapters) before rewriting it"}
    save_file(path, {layer: fit.params for layer, fit in fits.items()}, metadata or {}, adapters=adapters)


def describe(fit: LayerFit) -> str:
    s = fit.stats
    parts = [f"layer {fit.layer}: {fit.seconds:.1f}s"]
    if "far_ce_init" in s:
        parts.append(f"far CE {s['far_ce_init']:.3f} -> {s['far_ce_trained']:.3f} (floor {s['far_ce_floor']:.3f})")
    parts.append(f"far share {s['far_share']:.3f}, share rms {s['share_rms_c1']:.3f} -> {s['share_rms_fitted']:.3f}")
    c = fit.params["far_scale"]
    parts.append(f"far_scale {c.min().item():.3g}..{c.max().item():.3g}")
    if "out_err_fitted" in s:
        dropped = f"dropped {s['out_err_dropped']:.3f}, " if "out_err_dropped" in s else ""
        c1 = f"c=1 {s['out_err_c1']:.3f}, " if "out_err_c1" in s else ""
        parts.append(f"out err {dropped}{c1}fitted {s['out_err_fitted']:.3f}")
    return "; ".join(parts)
