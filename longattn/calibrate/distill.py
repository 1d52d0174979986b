"""The end-to-end stage: every converted layer's feature params (and optional adapters) trained together on the
KL between the converted and the exact model's next-token distributions."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch.nn.utils import parametrize

from ..kernels.linear import linear_attention
from .adapters import _add_adapters, _row_sums
from .capture import BAND_KEYS
from .fit import LayerFit


def distill_model(model, ids: torch.Tensor, settings: dict, fits: dict, *, steps: int = 60, lr: float = 1e-2,
                  adapter_rank: int = 0, adapter_lr: float = 1e-3, module_path: str = "model.layers.{}.self_attn",
                  teacher_top_k: int = 0, kl_windows: int = 16,
                  progress: Optional[Callable] = None) -> dict[int, LayerFit]:
    """End-to-end stage after the per-layer fits: train every converted layer's feature params (the maps'
    weights and log far_scale) together so that the converted model's next-token distributions match the
    exact model's: KL(exact || converted), mean over the positions that have far keys, on `ids` (W, S), one
    window a step. The model's weights stay frozen (restored afterwards); only the fits' params change.

    The exact model's log-probabilities are kept for every window: W · S · vocabulary floats (SmolLM2:
    0.35 GB a 2K window). With `teacher_top_k` k > 0 only each position's k most likely tokens and the mass of
    the rest are kept (SmolLM2, k 256: 5 MB a 2K window), and the loss is the KL between the two distributions
    coarsened to those k tokens + "any other" (a lower bound of the full KL, equal to it when the rest has no
    mass). Returns new LayerFits with `kl_start` / `kl_trained` (the loss, mean over the first `kl_windows`
    windows) in stats.

    With `adapter_rank` r > 0 the converted layers' projections (`module_path`.format(layer) + q/k/v/o_proj)
    also get trainable rank-r corrections (LoRA; LoLCATs, Zhang et al. 2024, pairs them with linearised
    attention), trained with `adapter_lr`; each LayerFit's `adapters` then holds {projection: (A, B, row sums
    of the weight trained on)}; the model itself is left unchanged: `merge_adapters` applies them."""
    from transformers import AttentionInterface

    from ..quality import attention_in_layers
    missing = sorted(set(settings) - set(fits))
    if missing:
        raise ValueError(f"distill: no per-layer fit for layer(s) {missing}: run fit_layers first")
    start = min(s_["sink_tokens"] + s_["local_window"] for s_ in settings.values())
    if start >= ids.shape[1] - 1:
        raise ValueError(f"distill: {ids.shape[1]} tokens leave no position with far keys (first at {start})")
    trainable = {layer: {name: (t.log() if name == "far_scale" else t).detach().float().clone().requires_grad_()
                         for name, t in fits[layer].params.items()} for layer in settings}
    band = {layer: {key: s_[key] for key in BAND_KEYS if key in s_} for layer, s_ in settings.items()}

    def feature_params(layer):
        return {name: t.exp() if name == "far_scale" else t for name, t in trainable[layer].items()}

    def converted(query, key, value, scale, layer):
        return linear_attention(query, key, value, scale=scale, causal=True, feature_params=feature_params(layer),
                                **band[layer])

    def log_probs(window):
        logits = getattr(model(ids[window:window + 1]), "logits", None)
        if logits is None:
            raise ValueError(f"distill: {type(model).__name__} gives no logits; it needs a causal LM "
                             "(e.g. LlamaForCausalLM, not LlamaModel)")
        return torch.log_softmax(logits[0, start:].float(), -1)

    def teacher_of(window):
        full = log_probs(window)
        return top_k_teacher(full, teacher_top_k) if 0 < teacher_top_k < full.shape[-1] else full

    n_kl = max(1, min(kl_windows, ids.shape[0]))

    def mean_kl():  # over the first n_kl windows, with the params as they are now
        with torch.no_grad():
            return sum(teacher_kl(teacher[w], log_probs(w)).item() for w in range(n_kl)) / n_kl

    previous = model.config._attn_implementation
    frozen = [p_ for p_ in model.parameters() if p_.requires_grad]
    adapters = {}   # (layer, projection name) -> (module, LowRankDelta)
    t0 = time.time()
    try:
        with torch.no_grad():
            teacher = [teacher_of(w) for w in range(ids.shape[0])]
        AttentionInterface.register("longattn_distill", attention_in_layers(set(settings), converted))
        model.set_attn_implementation("longattn_distill")
        for p_ in frozen:
            p_.requires_grad_(False)
        if adapter_rank:
            adapters = _add_adapters(model, sorted(settings), adapter_rank, module_path)
        kl_start = mean_kl()
        groups = [{"params": [t for params in trainable.values() for t in params.values()], "lr": lr}]
        if adapters:
            groups.append({"params": [p_ for _, delta in adapters.values() for p_ in delta.parameters()],
                           "lr": adapter_lr})
        opt = torch.optim.Adam(groups)
        with torch.enable_grad():
            for step in range(steps):
                w = step % ids.shape[0]
                loss = teacher_kl(teacher[w], log_probs(w))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if progress:
                    progress(step, loss.item())
        kl_end = mean_kl()
    finally:
        model.set_attn_implementation(previous)
        for module, _ in adapters.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for p_ in frozen:
            p_.requires_grad_(True)
    seconds = time.time() - t0
    out = {}
    for layer, fit in fits.items():
        params = {name: t.detach().clone() for name, t in feature_params(layer).items()} if layer in trainable \
            else fit.params
        stats = {**fit.stats, "kl_start": kl_start, "kl_trained": kl_end, "distill_seconds": seconds}
        layer_adapters = {name: (delta.A.detach().clone(), delta.B.detach().clone(), _row_sums(module.weight))
                          for (at, name), (module, delta) in adapters.items() if at == layer}
        out[layer] = LayerFit(layer, params, stats, fit.seconds, stage1_params=fit.stage1_params,
                              adapters=layer_adapters or fit.adapters)
    return out


def top_k_teacher(log_probs: torch.Tensor, k: int) -> tuple:
    """A teacher distribution kept as its k most likely tokens (log-probs, indices) and the log-mass of the rest."""
    top, index = log_probs.topk(k, -1)
    return top, index, _log_rest(log_probs, index)


def teacher_kl(teacher, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), mean over positions; `student` holds full log-probs, `teacher` too or is a
    `top_k_teacher`: then both are coarsened to its k tokens + "any other"."""
    if isinstance(teacher, torch.Tensor):
        return (teacher.exp() * (teacher - student)).sum(-1).mean()
    top, index, rest = teacher
    on_top = (top.exp() * (top - student.gather(-1, index))).sum(-1)
    return (on_top + rest.exp() * (rest - _log_rest(student, index))).mean()


def _log_rest(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `index` (last dim), from the log-probabilities themselves: no
    cancellation in 1 - sum(top)."""
    return log_probs.scatter(-1, index, float("-inf")).logsumexp(-1)
