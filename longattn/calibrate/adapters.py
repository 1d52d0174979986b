"""Low-rank corrections (LoRA) of the converted layers' q/k/v/o projections, trained by `distill_model` and
merged into a model once."""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize


class LowRankDelta(torch.nn.Module):
    """A projection's weight W as W + B·A (LoRA, Hu et al. 2021): B starts at zero, so training starts from
    the model as it is. Registered as a `torch.nn.utils.parametrize` parametrization of a frozen weight."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        self.A = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype)


ADAPTED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _row_sums(weight: torch.Tensor) -> torch.Tensor:
    """A fingerprint of a projection's weight: tells the weight an adapter was trained on from a merged one."""
    return weight.detach().double().sum(1).float()


def _projections(model, layer: int, module_path: str) -> dict[str, torch.nn.Linear]:
    path = module_path.format(layer)
    try:
        attention = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"adapters: {type(model).__name__} has no module {path!r} (module_path)") from None
    found = {name: getattr(attention, name, None) for name in ADAPTED_PROJECTIONS}
    missing = [name for name, m in found.items() if not isinstance(m, torch.nn.Linear)]
    if missing:
        raise ValueError(f"adapters: {path} has no nn.Linear {', '.join(missing)}")
    return found


def _add_adapters(model, layers, rank: int, module_path: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    for layer in layers:
        for name, module in _projections(model, layer, module_path).items():
            delta = LowRankDelta(module.weight.detach(), rank, generator)
            parametrize.register_parametrization(module, "weight", delta)
            adapters[layer, name] = module, delta
    return adapters


@torch.no_grad()
def merge_adapters(model, fits, module_path: str = "model.layers.{}.self_attn") -> int:
    """Add the adapters of `fits` ({layer: LayerFit}, or a calibration file's path) to the model's projections
    (W += B·A), in place; returns how many were merged. The fitted feature params were trained with these
    corrections: use both or neither, and merge once."""
    if isinstance(fits, str):
        from ..kernels.linear.params_file import adapters_from_file
        adapters = adapters_from_file(fits)
    else:
        adapters = {layer: fit.adapters for layer, fit in fits.items()}
    planned = []  # every adapter is checked before any weight changes: a refused merge leaves the model as it was
    for layer, layer_adapters in adapters.items():
        projections = _projections(model, layer, module_path) if layer_adapters else {}
        for name, (a, b, row_sums) in layer_adapters.items():
            weight = projections[name].weight
            where = f"merge_adapters: layer {layer} {name}"
            if weight.shape != (b.shape[0], a.shape[1]):
                raise ValueError(f"{where}: weight {tuple(weight.shape)} does not match the adapter's "
                                 f"{(b.shape[0], a.shape[1])}")
            delta = b @ a
            now = _row_sums(weight)
            if not torch.allclose(now, row_sums, rtol=1e-4, atol=1e-4):
                merged_already = torch.allclose(now, row_sums + delta.double().sum(1).float(), rtol=1e-4, atol=1e-4)
                raise ValueError(f"{where}: " + ("the adapters are merged already" if merged_already else
                                 "the weight is not the one the adapters were trained on (another model?)"))
            planned.append((weight, delta))
    for weight, delta in planned:
        weight += delta.to(weight)
    return len(planned)
