"""Which layers, and their Q/K/V: a policy's linear layers, a --layers text, activations captured from a
transformers decoder, and the per-layer fits on them."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from ..kernels.linear import linear_attention
from .fit import LayerFit, fit_layer

# ----------------------------------------------------------------------------------------------- a model

def capture_layers(model, ids: torch.Tensor, layers: Iterable[int], converted: Optional[dict] = None) -> dict:
    """{layer index: (q, k, v, scale)} of a transformers decoder's attention layers on `ids` (W, S), causal.

    Records through a `transformers.AttentionInterface` function (k/v as the model keeps them, GQA not
    repeated); the model's attention implementation is restored afterwards. `converted`: {layer: (band options,
    feature_params)} layers that run as the linear kind meanwhile (sequential calibration)."""
    from transformers import AttentionInterface

    from ..quality import attention_in_layers
    layers = set(layers)
    converted = converted or {}
    got = {}

    def record(query, key, value, scale, layer):
        if layer in converted:
            band, params = converted[layer]
            return linear_attention(query, key, value, scale=scale, causal=True, feature_params=params, **band)
        got[layer] = (query.detach().clone(), key.detach().clone(), value.detach().clone(), float(scale))
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                                enable_gqa=True)
    AttentionInterface.register("longattn_capture", attention_in_layers(layers | set(converted), record))
    previous = model.config._attn_implementation
    model.set_attn_implementation("longattn_capture")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    missing = layers - set(got)
    if missing:
        raise ValueError(f"calibrate: the model has no attention layer(s) {sorted(missing)} "
                         f"(found {sorted(got) or 'none'})")
    return got


BAND_KEYS = ("feature_map", "sink_tokens", "local_window", "num_features", "seed")  # fit_layer's and the kernel's


def fit_layers(model, ids: torch.Tensor, settings: dict, *, sequential: bool = False,
               progress: Optional[Callable] = None, **fit_options) -> dict[int, LayerFit]:
    """Fit the layers of `settings` ({layer: band options, BAND_KEYS}) on `ids` (W, S): W calibration windows.

    sequential: fit the layers in order, each on the activations of the model whose earlier layers already
    run as their fitted linear kind (one capture pass per layer), so a layer's maps see the inputs they will
    get after conversion, not the exact model's; otherwise capture all layers from the exact model at once."""
    fits = {}
    pending = {} if sequential else capture_layers(model, ids, settings)
    for layer in sorted(settings):
        if sequential:
            converted = {i: (settings[i], fit.params) for i, fit in fits.items()}
            pending = capture_layers(model, ids, [layer], converted)
        q, k, v, scale = pending.pop(layer)
        fits[layer] = fit_layer(q, k, v, scale=scale, layer=layer, **settings[layer], **fit_options)
        if progress:
            progress(fits[layer])
    return fits


def calibrate_model(model, ids: torch.Tensor, layers: Iterable[int], *, progress: Optional[Callable] = None,
                    sequential: bool = False, **fit_options) -> dict[int, LayerFit]:
    """`fit_layers` with the same band options for every layer (see `fit_layer` for the options)."""
    band = {"feature_map": "hedgehog", "sink_tokens": 64, "local_window": 256}
    band.update({key: fit_options.pop(key) for key in BAND_KEYS if key in fit_options})
    return fit_layers(model, ids, {layer: band for layer in layers}, sequential=sequential, progress=progress,
                      **fit_options)


def linear_layers(policy, num_layers: int, module_path: str = "model.layers.{}.self_attn") -> dict[int, dict]:
    """{layer index: linear band params} for the layers a policy maps to `linear` (any length band)."""
    found = {}
    for i in range(num_layers):
        decision = policy.decide(module_path.format(i), i, num_layers)
        band = next((b for b in decision.bands if b.kind == "linear"), None)
        if band is not None:
            found[i] = dict(band.params)
    return found


def parse_layers(text: str) -> list[int]:
    """"20-29", "3,5,7-9" -> sorted layer indices."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"layers: expected indices and ranges like 20-29 or 3,5,7-9, got {text!r}") from None
    return sorted(out)
