"""Proving a mask causal from how it is built.

A mask is causal only if (1) its values depend on nothing but sizes and constants (no model
input, parameter or buffer: a mask passed in or stored as state can change, however causal it
looks today) and (2) evaluated, it equals the bottom-right causal pattern. Both must hold; a
mask that merely looks causal stays a mask.
"""
from __future__ import annotations

import torch

from .fx_eval import ancestors, data_inputs, evaluate, generic_sizes, hint, is_symbolic, meta_value
from .record import MaskTerm

# Evaluating a mask costs Sq*Sk elements; above this the mask is kept rather than proven.
MAX_PROOF_ELEMENTS = 1 << 28


def causal_pattern(sq: int, sk: int) -> torch.Tensor:
    rows = torch.arange(sq).unsqueeze(-1)
    cols = torch.arange(sk).unsqueeze(0)
    return cols <= rows + (sk - sq)


def prove_causal(term: MaskTerm, q_len, k_len) -> tuple[bool, str]:
    """(True, proof) if `term` is exactly the causal mask for these lengths; else (False, why not)."""
    deps = data_inputs(term.node)
    if deps:
        return False, f"mask depends on the values of {', '.join(d.name for d in deps[:3])}"
    # check it at the traced lengths (when small enough) and, for a dynamic graph (one construction for every
    # length) or one too long to evaluate, as the same construction at small lengths (fx_eval.generic_sizes)
    candidates = [hint]
    if is_symbolic(q_len) or is_symbolic(k_len) or hint(q_len) * hint(k_len) > MAX_PROOF_ELEMENTS:
        small = generic_sizes((q_len, k_len), ancestors(term.node), _other_dims(term))
        if small is None:
            return False, "mask lengths equal another of its dims: cannot be checked at small lengths"
        candidates.append(small)
    proofs = []
    for sizes in candidates:
        ok, why = _check_at(term, q_len, k_len, sizes)
        if not ok and not why.startswith("too large"):
            return False, why
        if ok:
            proofs.append(why)
    if not proofs:
        return False, "mask too large to evaluate at rewrite time, even at small lengths"
    return True, "built from sizes alone and equal to the causal pattern at " + ", ".join(proofs)


def _other_dims(term: MaskTerm) -> tuple:
    shape = tuple(meta_value(term.node).shape)
    return shape[:-2]


def _check_at(term: MaskTerm, q_len, k_len, sizes) -> tuple[bool, str]:
    sq, sk = int(sizes(q_len)), int(sizes(k_len))
    if sq > sk:
        return False, "more queries than keys: some rows would see no key"
    if sq * sk > MAX_PROOF_ELEMENTS:
        return False, f"too large: {sq}x{sk}"
    try:
        (value,) = evaluate([term.node], {}, sizes)
    except Exception as e:  # anything we cannot run is simply not proven
        return False, f"mask could not be evaluated ({type(e).__name__}: {e})"
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[-2:]) != (sq, sk):
        return False, "mask does not span (q_len, k_len)"
    value = value.cpu()  # built on the model's device; the pattern is compared on the CPU
    keep_expected = causal_pattern(sq, sk)
    if value.dtype == torch.bool:
        if term.masked_when is None:
            return False, "bool tensor used as an additive mask"
        keep = value != term.masked_when
        ok = bool((keep == keep_expected).all())
    else:
        v = value.double()
        ok = bool((v.masked_select(keep_expected.expand_as(v)) == 0).all()) and bool(
            (v.masked_select(~keep_expected.expand_as(v)) <= -1e30).all())
    if not ok:
        return False, "mask built from sizes alone but is not the causal pattern"
    return True, f"{sq}x{sk}"


def is_zero_mask(term: MaskTerm) -> bool:
    """An additive mask built from constants alone that is zero everywhere (e.g. the 0 of
    where(keep, 0, min) once split, or T5's zero position bias in cross attention)."""
    if term.kind != "additive" or term.fill is not None or data_inputs(term.node):
        return False
    val = term.node.meta.get("example_value", term.node.meta.get("val"))
    try:
        if val.numel() > MAX_PROOF_ELEMENTS:
            return False
        (value,) = evaluate([term.node], {})
    except Exception:
        return False
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.any())
