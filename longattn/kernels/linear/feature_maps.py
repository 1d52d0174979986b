"""Feature maps φ for linear attention: exp(q·k·scale) is replaced by φ(q)·φ(k).

Every map returns `Features`: φ(q) (B, Hq, Sq, F), φ(k) (B, Hkv, Sk, F) and an optional
per-query log-scale (B, Hq, Sq): the far part's true weight is exp(q_log_scale) · φ(q)·φ(k).
Only `favor` uses it: its query features are divided by their row maximum so they stay in
(0, 1] whatever the query norm; the factor goes back in when the far part meets the exact
softmax part under one normaliser (and cancels when the output is purely linear).

Which maps see the site's scale: `favor`, `taylor2` and `hedgehog` approximate or learn
exp(scale · q·k), so they take x·√scale; `elu`, `relu` and `identity` are the fixed maps of
models trained linear (Katharopoulos et al. 2020) and take x as it is.

Features are computed in float32 at least (float64 stays float64): exp and squares of
half-precision activations lose digits or overflow before the kernel ever sees them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", "favor", "taylor2", "identity", "hedgehog", "none")


@dataclass
class Features:
    q: torch.Tensor                      # (B, Hq, Sq, F)
    k: torch.Tensor                      # (B, Hkv, Sk, F)
    q_log_scale: Optional[torch.Tensor]  # (B, Hq, Sq) or None (= 0)


def feature_dim(feature_map: str, head_dim: int, num_features: int, feature_params=None) -> int:
    """Size F of φ(x) for a head dimension D."""
    if feature_map in ("elu", "relu", "identity"):
        return head_dim
    if feature_map == "favor":
        return num_features
    if feature_map == "taylor2":
        return 1 + head_dim + head_dim * (head_dim + 1) // 2
    if feature_map == "hedgehog":
        return 2 * _hedgehog_weights(feature_params, "q", 1, head_dim)[0].shape[-1]
    if feature_map == "none":
        return 0
    raise ValueError(f"linear_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")


def favor_projection(head_dim: int, num_features: int, seed: int, device=None, dtype=torch.float32):
    """(num_features, head_dim) Gaussian rows drawn from a local generator seeded with `seed`.

    Drawn on the CPU so every device sees the same features for the same seed.
    """
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"linear_attention: num_features must be a positive integer, got {num_features!r}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    w = torch.randn(num_features, head_dim, generator=g, dtype=torch.float64)
    return w.to(device=device, dtype=dtype)


def _favor(x: torch.Tensor, w: torch.Tensor, is_query: bool):
    """Positive random features (Choromanski et al. 2021): E[φ(q)·φ(k)] = exp(q·k).

    φ_f(x) = exp(w_f·x − |x|²/2) / √m. Keys are divided by exp(|w_f|²/2) and queries multiplied
    by it, which leaves every product φ(q)·φ(k) unchanged but bounds key features by 1
    (w·x − |x|²/2 ≤ |w|²/2); queries are then divided by their row maximum, returned as log-scale.
    """
    half_w2 = 0.5 * (w * w).sum(-1)                     # (m,)
    logits = x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True)
    m = w.shape[0]
    if not is_query:
        return torch.exp(logits - half_w2) / math.sqrt(m), None
    logits = logits + half_w2
    # the row maximum is a constant of the function (it cancels exactly), so no gradient flows through it
    row_max = logits.amax(-1).detach()
    return torch.exp(logits - row_max.unsqueeze(-1)) / math.sqrt(m), row_max


def _taylor2(x: torch.Tensor):
    """[1, x, x_a²/√2, x_a·x_b (a<b)]: φ(q)·φ(k) = 1 + s + s²/2 with s = q·k, exactly."""
    D = x.shape[-1]
    rows, cols = torch.triu_indices(D, D, device=x.device)
    weight = torch.ones(rows.shape, dtype=x.dtype, device=x.device)
    weight[rows == cols] = 1.0 / math.sqrt(2.0)
    second = x[..., rows] * x[..., cols] * weight
    return torch.cat([torch.ones_like(x[..., :1]), x, second], dim=-1)


def _hedgehog_weights(feature_params, which: str, heads: int, head_dim: int):
    """(weight (H or 1, D, F), bias (H or 1, F) or None) for `which` in ('q', 'k')."""
    if not feature_params:
        raise ValueError("linear_attention: feature_map='hedgehog' needs feature_params with a learned map "
                         "('weight' or 'q_weight'/'k_weight' of shape (heads, head_dim, F)); "
                         "run calibration first or choose feature_map='taylor2'")
    key = f"{which}_weight" if f"{which}_weight" in feature_params else "weight"
    if key not in feature_params:
        raise ValueError(f"linear_attention: feature_params has no 'weight' or '{which}_weight' "
                         f"(keys: {sorted(feature_params)})")
    weight = torch.as_tensor(feature_params[key])
    if weight.dim() == 2:
        weight = weight.unsqueeze(0)
    if weight.dim() != 3 or weight.shape[1] != head_dim or weight.shape[0] not in (1, heads):
        raise ValueError(f"linear_attention: feature_params[{key!r}] must have shape ({heads} or 1, {head_dim}, F), "
                         f"got {tuple(weight.shape)}")
    bias_key = key.replace("weight", "bias")
    bias = feature_params.get(bias_key)
    if bias is not None:
        bias = torch.as_tensor(bias)
        bias = bias.reshape(bias.shape[0] if bias.dim() == 2 else 1, weight.shape[-1])
    return weight, bias


def _hedgehog(x: torch.Tensor, feature_params, which: str):
    """Hedgehog map (Zhang et al. 2024): [softmax(xW + b), softmax(−(xW + b))] per head."""
    weight, bias = _hedgehog_weights(feature_params, which, x.shape[1], x.shape[-1])
    z = torch.einsum("bhsd,hdf->bhsf", x, weight.to(device=x.device, dtype=x.dtype))
    if bias is not None:
        z = z + bias.to(device=x.device, dtype=x.dtype)[None, :, None, :]
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1)


def feature_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_feature_map(q: torch.Tensor, k: torch.Tensor, *, feature_map: str, scale: float, num_features: int = 256,
                      seed: int = 0, feature_params: Optional[Mapping[str, Any]] = None) -> Features:
    """φ(q), φ(k) in float32 (float64 for float64 inputs); see the module docstring for the conventions."""
    dtype = feature_dtype(q.dtype)
    q, k = q.to(dtype), k.to(dtype)
    if feature_map == "elu":
        return Features(F.elu(q) + 1.0, F.elu(k) + 1.0, None)
    if feature_map == "relu":
        return Features(F.relu(q), F.relu(k), None)
    if feature_map == "identity":
        return Features(q, k, None)
    root = math.sqrt(scale)
    if feature_map == "favor":
        w = favor_projection(q.shape[-1], num_features, seed, device=q.device, dtype=dtype)
        fq, lq = _favor(q * root, w, is_query=True)
        fk, _ = _favor(k * root, w, is_query=False)
        return Features(fq, fk, lq)
    if feature_map == "taylor2":
        return Features(_taylor2(q * root), _taylor2(k * root), None)
    if feature_map == "hedgehog":
        return Features(_hedgehog(q * root, feature_params, "q"), _hedgehog(k * root, feature_params, "k"), None)
    if feature_map == "none":
        return Features(q.new_zeros(*q.shape[:-1], 0), k.new_zeros(*k.shape[:-1], 0), None)
    raise ValueError(f"linear_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
