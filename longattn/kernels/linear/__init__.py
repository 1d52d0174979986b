"""The "linear" kind: linearised attention, hybrid with exact sinks and a sliding window.

Defaults (the kernel's own, used when a policy names no parameter): pure normalised linear attention with the
`elu` (elu + 1) map, additive state, chunks of 64. The hybrid the issue recommends for converted softmax models
is a policy choice, `HYBRID_DEFAULTS` below (64 sinks + a 256-key window, exact, under one normaliser with
the far linear part); with `feature_map="none"` it is sinks + sliding window alone.

Calibration hooks (`longattn.calibrate` fits them; `params_file.py` reads its files, and the dispatcher turns a
band's reference string "FILE#layers.N" into the mapping): `feature_params` is a mapping of tensors (or nested
lists, as JSON gives them):
- "weight" or "q_weight"/"k_weight" (heads or 1, D, F) and optional "bias"/"q_bias"/"k_bias" (heads or 1, F):
  the Hedgehog map φ(x) = [softmax(x√scale·W + b), softmax(−(x√scale·W + b))];
- "far_scale" (scalar or (Hq,)): the per-query-head factor c_h on the far part's weights (default 1).
`beta` (delta rule) is a scalar, per key head (Hkv,) or per token (B, Hkv, Sk).
"""
from __future__ import annotations

import torch

from .decode import LinearAttentionState
from .decode import linear_attention_step as linear_attention_step_reference
from .feature_maps import FEATURE_MAPS, apply_feature_map, feature_dim
from .reference import linear_attention_quadratic, linear_attention_reference

HYBRID_DEFAULTS = {"feature_map": "elu", "sink_tokens": 64, "local_window": 256}


def linear_attention(q, k, v, *, scale=None, causal=False, feature_map="elu", num_features=256, seed=0,
                     sink_tokens=0, local_window=0, normalize=True, eps=1e-6, update_rule="add",
                     beta=None, chunk_size=64, feature_params=None):
    """Hybrid linear attention; q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, Hq, Sq, Dv) in q's dtype.

    Causal is bottom-right aligned; non-causal works for any Sq, Sk. The far part runs the Triton chunked
    kernels where they run (CUDA tensors or TRITON_INTERPRET=1, not float64, chunk_size 16/32/64/128;
    `triton_additive` for the additive rule, `triton_delta` for the unnormalised delta rule with at most 256
    features, `triton_chunk` for the other delta cases; `triton_exact` for the sinks and window), else the
    PyTorch chunked form. Differentiable: the additive far part, the exact part and the delta-rule far part
    have Triton backward kernels (the delta rule's opt-in on CUDA: `triton_delta.triton_backward_trusted`).
    See `reference.py` for the exact definition and `linear_attention_reference` for every argument.
    """
    kwargs = dict(scale=scale, causal=causal, feature_map=feature_map, num_features=num_features, seed=seed,
                  sink_tokens=sink_tokens, local_window=local_window, normalize=normalize, eps=eps,
                  update_rule=update_rule, beta=beta, chunk_size=chunk_size, feature_params=feature_params)
    from . import triton_chunk
    if not triton_chunk.runs_on(q) or chunk_size not in (16, 32, 64, 128):
        return linear_attention_reference(q, k, v, **kwargs)
    if update_rule == "add":
        from .triton_additive import linear_attention_additive_triton
        kwargs.pop("update_rule"), kwargs.pop("beta")
        return linear_attention_additive_triton(q, k, v, **kwargs)
    from .triton_delta import MAX_FEATURES, linear_attention_delta_triton
    if not normalize and feature_map != "none" and \
            feature_dim(feature_map, q.shape[-1], num_features, feature_params) <= MAX_FEATURES:
        kwargs.pop("update_rule")
        return linear_attention_delta_triton(q, k, v, **kwargs)
    from .triton_exact import exact_part_triton
    return linear_attention_reference(q, k, v, far_fn=triton_chunk.far_chunked_triton, exact_fn=exact_part_triton,
                                      **kwargs)


def linear_attention_step(q, k, v, state=None, *, scale=None, causal=True, feature_map="elu", num_features=256,
                          seed=0, sink_tokens=0, local_window=0, normalize=True, eps=1e-6, update_rule="add",
                          beta=None, chunk_size=64, feature_params=None):
    """Recurrent decode: attend with S new tokens given the state of the tokens before them.

    q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (out (B, Hq, S, Dv) in q's dtype, new
    `LinearAttentionState`); state None starts a sequence. Equals `linear_attention(..., causal=True)` over
    the whole sequence at those positions. One fused Triton kernel per token for the additive rule with
    elu/relu/identity or learned hedgehog maps (`triton_decode.py`), the PyTorch step (`decode.py`) otherwise.
    """
    kwargs = dict(scale=scale, causal=causal, feature_map=feature_map, num_features=num_features, seed=seed,
                  sink_tokens=sink_tokens, local_window=local_window, normalize=normalize, eps=eps,
                  update_rule=update_rule, beta=beta, chunk_size=chunk_size, feature_params=feature_params)
    from . import triton_decode
    if triton_decode.supports(q, feature_map, update_rule) and not torch.is_grad_enabled():
        return triton_decode.linear_attention_step_triton(q, k, v, state, **kwargs)
    return linear_attention_step_reference(q, k, v, state, **kwargs)


__all__ = ["linear_attention", "linear_attention_step", "linear_attention_step_reference", "LinearAttentionState",
           "linear_attention_reference", "linear_attention_quadratic", "apply_feature_map", "feature_dim",
           "FEATURE_MAPS", "HYBRID_DEFAULTS"]
