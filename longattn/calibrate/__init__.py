"""Calibration of the linear kind's far part on a model's own activations.

The hybrid linear kind (`kernels/linear/reference.py`) attends exactly to `sink_tokens` first keys and a
`local_window` of recent keys, and gives every older ("far") key the weight c_h · φ(q)·φ(k) under the same
normaliser. With a fixed map and c_h = 1 the far part's mass has nothing to do with what softmax gives those
keys (measured on SmolLM2: worse than dropping them). Per layer, on Q/K/V captured from the exact model:

- `far_scale` c_h (per query head): chosen so that the far part's share of each row's mass,
  c·A/(E + c·A), matches softmax's share B/(E + B) in least squares over sampled rows (E: exact keys'
  Σexp(s), B: far keys' Σexp(s), A: far keys' Σφ(q)·φ(k)). One scalar per head: a 1-D search in log c.
- `hedgehog` maps (Zhang et al. 2024, "The Hedgehog & the Porcupine"): φ(x) = [softmax(x√s·W + b),
  softmax(−(x√s·W + b))], W per query head for queries and per key head for keys, started at the identity
  and trained with Adam on the attention-distillation loss: cross-entropy between softmax attention
  restricted to the far keys (renormalised) and the map's normalised far weights, on sampled query rows.
  Then c_h is fitted for the trained map as above. Optionally (`hybrid_steps`) a second stage trains the
  maps and log c_h together on the whole hybrid row (exact + far keys under one normaliser) against
  softmax's full row.
- Optionally (`distill_model`, `longattn calibrate --distill-steps`) a last stage trains every layer's
  maps and far_scale together, end to end, on the KL between the converted and the exact model's next-token
  distributions: each layer's fit then accounts for what the converted layers before and after it do.

The result is a file of per-layer sections (`kernels/linear/params_file.py`) that a policy's linear band
references as `feature_params: FILE`; the rewriter picks each site's section.

    fits = calibrate_model(model, ids, layers=range(20, 30), feature_map="hedgehog", sink_tokens=64,
                           local_window=256)
    save_calibration("calib.safetensors", fits, metadata={...})

The parts: `fit` (one layer), `capture` (which layers, their activations, the per-layer fits), `distill` (the
end-to-end stage), `adapters` (its low-rank projection corrections).
"""
from __future__ import annotations

from .adapters import ADAPTED_PROJECTIONS, LowRankDelta, merge_adapters
from .capture import BAND_KEYS, calibrate_model, capture_layers, fit_layers, linear_layers, parse_layers
from .distill import distill_model, teacher_kl, top_k_teacher
from .fit import (FITTED_MAPS, LayerFit, describe, far_distillation_loss, fit_far_scale, fit_layer, hybrid_loss,
                  output_errors, save_calibration)

__all__ = ["LayerFit", "fit_layer", "fit_far_scale", "far_distillation_loss", "hybrid_loss", "output_errors",
           "capture_layers", "fit_layers", "calibrate_model", "distill_model", "merge_adapters", "LowRankDelta",
           "save_calibration", "linear_layers", "parse_layers", "describe", "teacher_kl", "top_k_teacher",
           "FITTED_MAPS", "BAND_KEYS", "ADAPTED_PROJECTIONS"]
