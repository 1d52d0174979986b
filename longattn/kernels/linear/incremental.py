"""Decode steps through the op without recomputing the prefix: a recurrent state kept per site.

The op sees a decode step as q of a few new tokens against the whole K/V cache (transformers keeps
the cache; the op keeps nothing between calls). For a linear site that would recompute the prefix,
O(n) per token. Here each site (named by the rewriter) keeps the `LinearAttentionState` of the keys it
saw last, and a later call that provably continues them only folds the new tokens in: O(1) per token.

"Provably continues" (else the state is rebuilt from the cached prefix in one pass, so a result is never
taken from a state that does not belong to these keys):
* the op's forward (its backward recomputes), causal (or one query), no mask, no per-token β, batch
  size 1 (beam search reorders cache rows between steps, which a per-row state would not see), same
  dtype, device and shapes;
* the new tokens start where the state ends: Sk - Sq equals the state's position (a cropped cache,
  e.g. in speculative decoding, starts earlier and fails this);
* the state's sink and window keys and values equal the cache's at those positions (a different
  sequence of the same length fails this; in layers past the first, every key depends on the whole
  prefix, so a different prefix shows in the window). This compare is one host sync per call.
"""
from __future__ import annotations

from typing import Optional

import torch

from .decode import LinearAttentionState, linear_attention_step
from .feature_maps import feature_dtype
from .reference import beta_per_key, chunk_states, pad_for_chunks, prepare_features

DECODE_MAX_NEW = 16  # more new tokens than this is a prefill: recomputed, and the site's state dropped
_states: dict[str, LinearAttentionState] = {}


def clear() -> None:
    """Forget every site's state (they hold a few window keys and a d_φ × d_v matrix per head)."""
    _states.clear()


def _eligible(q, causal, attn_mask, params) -> bool:
    """Calls a kept state may serve. Grad mode is off in the op's forward; the op's recomputing backward
    runs with it on, so it always recomputes."""
    # one query: non-causal is the causal result (the keys all precede it), as decode steps are traced
    return ((causal or q.shape[2] == 1) and attn_mask is None and not torch.is_grad_enabled() and q.shape[0] == 1
            and not isinstance(params.get("beta"), torch.Tensor))


def _continues(state: Optional[LinearAttentionState], q, k, v, p: int) -> bool:
    """The state ends at position p and its sinks and window are the cache's keys/values there."""
    if state is None or state.position != p or state.sink_k.dtype != feature_dtype(q.dtype):
        return False
    ns, nw, dt = state.sink_k.shape[2], state.window_k.shape[2], state.sink_k.dtype
    if state.sink_k.device != k.device or state.sink_k.shape[:2] != k.shape[:2] or k.shape[2] < p:
        return False
    pairs = ((state.sink_k, k[:, :, :ns]), (state.sink_v, v[:, :, :ns]),
             (state.window_k, k[:, :, p - nw:p]), (state.window_v, v[:, :, p - nw:p]))
    if any(a.shape != b.shape for a, b in pairs):
        return False
    # one flag on the device and one host sync for all four compares
    differs = torch.stack([(a != b.to(dt)).any() for a, b in pairs]).any()
    return not bool(differs)


def state_of(q, k, v, *, scale, feature_map="elu", num_features=256, seed=0, sink_tokens=0, local_window=0,
             normalize=True, eps=1e-6, update_rule="add", beta=None, chunk_size=64, feature_params=None):
    """The decode state after the keys k/v (B, Hkv, P, D/Dv), in one pass: sinks and window kept raw, the keys
    between them folded into the far matrix (additive rule: Σ φ(k)ᵀ [v | 1]; delta rule: the chunked UT-form
    recurrence's last state). q lends its head count and dtype to the feature maps."""
    dt = feature_dtype(q.dtype)
    kd, vd = k.to(dt), v.to(dt)
    B, Hkv, P, _ = k.shape
    ns = min(sink_tokens, P)
    nw = min(local_window, P - ns)
    betas = beta_per_key(beta, B, Hkv, P, k.device, dt)
    far_k, far_v = kd[:, :, ns:P - nw], vd[:, :, ns:P - nw]
    far = None
    if far_k.shape[2] and feature_map != "none":
        fk = prepare_features(q[:, :, :1].to(dt), far_k, feature_map=feature_map, scale=scale,
                              num_features=num_features, seed=seed, feature_params=feature_params,
                              update_rule=update_rule).k
        vals = torch.cat([far_v, torch.ones_like(far_v[..., :1])], -1) if normalize else far_v
        if update_rule == "add":
            far = torch.einsum("bhsf,bhsv->bhfv", fk, vals)
        else:
            fk, vals, bk, _ = pad_for_chunks(fk, vals, betas[:, :, ns:P - nw], causal=False, offset=None,
                                             chunk=chunk_size)
            n = fk.shape[2] // chunk_size
            states, _ = chunk_states(fk.view(B, Hkv, n, chunk_size, -1), vals.view(B, Hkv, n, chunk_size, -1),
                                     bk.reshape(B, Hkv, n, chunk_size), update_rule)
            far = states[:, :, n]
    return LinearAttentionState(P, far, kd[:, :, :ns], vd[:, :, :ns], kd[:, :, P - nw:P], vd[:, :, P - nw:P],
                                betas[:, :, P - nw:P])


def attend(site: str, q, k, v, *, scale, causal, attn_mask, params, full) -> torch.Tensor:
    """Linear attention of q against k/v at `site`. A decode-shaped call (at most DECODE_MAX_NEW new tokens
    after a cached prefix) folds the new tokens into the site's kept state when that state provably belongs to
    the prefix, else into a state built from the prefix in one pass; any other call is `full(q, k, v)`."""
    sq, sk = q.shape[2], k.shape[2]
    if not _eligible(q, causal, attn_mask, params) or sq > DECODE_MAX_NEW or sq >= sk:
        _states.pop(site, None)  # a prefill starts another sequence: whatever was kept belongs to an older one
        return full(q, k, v)
    p = sk - sq
    state = _states.get(site)
    if not _continues(state, q, k, v, p):
        state = state_of(q, k[:, :, :p], v[:, :, :p], scale=scale, **params)
    out, _states[site] = linear_attention_step(q, k[:, :, p:], v[:, :, p:], state, scale=scale, causal=True,
                                               **params)
    return out
