"""Recurrent decode: one token at a time with a state whose size does not grow with the context.

The state holds the far part's recurrent matrix (d_φ × (Dv + 1) per key head, the last column being the
normaliser) plus the raw keys/values of the sinks and of the local window (the exact part needs them).
A key enters the far state when it leaves the window, so after any number of steps the output equals
`linear_attention(..., causal=True)` over the whole sequence at that position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..masks import check_qkv
from .feature_maps import feature_dtype
from .reference import (_partial_softmax, beta_per_key, check_options, combine, far_scale_per_head,
                        prepare_features)


@dataclass
class LinearAttentionState:
    """Carried between decode calls. position: keys seen so far; far: (B, Hkv, F, Dv [+1]) or None before
    the first far key; sink_k/sink_v (B, Hkv, ≤ sink_tokens, D/Dv); window_k/window_v (B, Hkv, ≤ local_window,
    D/Dv) and window_beta (B, Hkv, ≤ local_window), oldest first."""
    position: int
    far: Optional[torch.Tensor]
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_beta: torch.Tensor

    def as_tensors(self) -> list[torch.Tensor]:
        """Plain tensors for an op boundary (torch.library ops take no dataclasses): [position (int64 scalar),
        far (empty when None), sink_k, sink_v, window_k, window_v, window_beta]. Inverse: `from_tensors`."""
        far = self.far if self.far is not None else self.sink_k.new_empty(0)
        return [torch.tensor(self.position, dtype=torch.int64), far, self.sink_k, self.sink_v, self.window_k,
                self.window_v, self.window_beta]

    @staticmethod
    def from_tensors(tensors) -> "LinearAttentionState":
        position, far, sink_k, sink_v, window_k, window_v, window_beta = tensors
        return LinearAttentionState(int(position), far if far.numel() else None, sink_k, sink_v, window_k,
                                    window_v, window_beta)

    @staticmethod
    def empty(k: torch.Tensor, v: torch.Tensor) -> "LinearAttentionState":
        B, Hkv = k.shape[:2]
        return LinearAttentionState(0, None, k[:, :, :0], v[:, :, :0], k[:, :, :0], v[:, :, :0],
                                    k.new_zeros(B, Hkv, 0, dtype=feature_dtype(k.dtype)))


def linear_attention_step(q, k, v, state: Optional[LinearAttentionState] = None, *, scale=None, causal=True,
                          feature_map="elu", num_features=256, seed=0, sink_tokens=0, local_window=0,
                          normalize=True, eps=1e-6, update_rule="add", beta=None, chunk_size=64,
                          feature_params=None):
    """Append S new tokens and attend with them, causally, one at a time.

    q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) for the new positions; beta as in `linear_attention`
    with S as the sequence length; state None starts a sequence. Returns (out (B, Hq, S, Dv) in q's dtype,
    new state). `causal` must be True (a step sees only the past); chunk_size is accepted for symmetry.
    """
    check_qkv(q, k, v, "linear_attention_step")
    check_options(causal=causal, feature_map=feature_map, sink_tokens=sink_tokens, local_window=local_window,
                  normalize=normalize, eps=eps, update_rule=update_rule, chunk_size=chunk_size,
                  where="linear_attention_step")
    if not causal:
        raise ValueError("linear_attention_step: decoding is causal; got causal=False")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"linear_attention_step: q has {q.shape[2]} new positions but k has {k.shape[2]}")
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = feature_dtype(q.dtype)
    state = LinearAttentionState.empty(k.to(dt), v.to(dt)) if state is None else state
    betas = beta_per_key(beta, B, Hkv, S, q.device, dt)
    c = far_scale_per_head(feature_params, Hq, q.device, dt)
    feature_kw = dict(feature_map=feature_map, scale=scale, num_features=num_features, seed=seed,
                      feature_params=feature_params, update_rule=update_rule)
    outs = []
    for t in range(S):
        qt, kt, vt, bt = q[:, :, t:t + 1].to(dt), k[:, :, t:t + 1].to(dt), v[:, :, t:t + 1].to(dt), betas[:, :, t:t + 1]
        state = _fold_leaving_key(state, qt, kt, vt, bt, sink_tokens, local_window, normalize, feature_kw)
        out = _read(state, qt, scale, c, normalize, eps, Dv, feature_kw)
        outs.append(out)
    return torch.cat(outs, dim=2).to(q.dtype), state


def _fold_leaving_key(state, qt, kt, vt, bt, sink_tokens, local_window, normalize, feature_kw):
    """Move position p's key into the caches, and the key at p − W (now out of the window) into the far state."""
    p = state.position
    wk, wv, wb = (torch.cat([state.window_k, kt], 2), torch.cat([state.window_v, vt], 2),
                  torch.cat([state.window_beta, bt], 2)) if p >= sink_tokens else \
        (state.window_k, state.window_v, state.window_beta)
    sk, sv = (torch.cat([state.sink_k, kt], 2), torch.cat([state.sink_v, vt], 2)) if p < sink_tokens else \
        (state.sink_k, state.sink_v)
    far = state.far
    if wk.shape[2] > local_window:  # the oldest window key (position p − W ≥ sink) becomes a far key
        ok, ov, ob = wk[:, :, :1], wv[:, :, :1], wb[:, :, :1]
        wk, wv, wb = wk[:, :, 1:], wv[:, :, 1:], wb[:, :, 1:]
        if feature_kw["feature_map"] != "none":
            far = _update(far, qt, ok, ov, ob, normalize, feature_kw)
    return replace(state, position=p + 1, far=far, sink_k=sk, sink_v=sv, window_k=wk, window_v=wv, window_beta=wb)


def _update(far, qt, kt, vt, bt, normalize, feature_kw):
    fk = prepare_features(qt, kt, **feature_kw).k[:, :, 0]          # (B, Hkv, F)
    val = vt[:, :, 0]
    if normalize:
        val = torch.cat([val, torch.ones_like(val[..., :1])], dim=-1)
    if far is None:
        far = fk.new_zeros(*fk.shape, val.shape[-1])
    if feature_kw["update_rule"] == "add":
        return far + fk.unsqueeze(-1) * val.unsqueeze(-2)
    residual = val - torch.einsum("bhf,bhfv->bhv", fk, far)
    return far + bt[:, :, 0, None, None] * fk.unsqueeze(-1) * residual.unsqueeze(-2)


def _read(state, qt, scale, c, normalize, eps, Dv, feature_kw):
    B, Hq, _, D = qt.shape
    Hkv = state.sink_k.shape[1]
    G = Hq // Hkv
    keys = torch.cat([state.sink_k, state.window_k], 2)
    vals = torch.cat([state.sink_v, state.window_v], 2)
    exact = None
    if keys.shape[2] > 0:
        scores = torch.einsum("bhgd,bhkd->bhgk", qt.view(B, Hkv, G, D) * scale, keys)
        m, l, acc = _partial_softmax(scores, vals, "bhgk,bhkv->bhgv")
        exact = (m.reshape(B, Hq, 1), l.reshape(B, Hq, 1), acc.reshape(B, Hq, 1, -1))
    far_num, lq = None, None
    if state.far is not None:
        feats = prepare_features(qt, state.sink_k.new_zeros(B, Hkv, 1, D), **feature_kw)
        fq = feats.q.view(B, Hkv, G, -1)
        far_num = torch.einsum("bhgf,bhfv->bhgv", fq, state.far).reshape(B, Hq, 1, -1)
        lq = feats.q_log_scale
    if exact is None and far_num is None:
        return qt.new_zeros(B, Hq, 1, Dv)
    return combine(exact, far_num, lq, c, normalize=normalize, eps=eps, Dv=Dv)
