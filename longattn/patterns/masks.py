"""Proving a mask causal from how it is built, for every graph kind.

A mask is causal only if (1) its values depend on nothing but sizes and constants (no model
input, parameter or buffer: a mask passed in or stored as state can change, however causal it
looks today) and (2) evaluated at every size its graph offers for the proof
(`matcher.AttentionGraph.proof_sizes`), it equals the bottom-right causal pattern. Both must
hold; a mask that merely looks causal stays a mask. Written against the graph view alone, so the
ONNX front end does not load torch.
"""
from __future__ import annotations

import math

import numpy as np

from .record import MaskTerm

# A mask is evaluated whole (a float one compared in float64): at most 16K x 16K. The same for both front
# ends; a longer one is checked at small lengths instead where its graph can give them (FX: fx_eval.generic_sizes;
# ONNX: the substitutions of its symbolic lengths), and otherwise stays a mask.
MAX_PROOF_ELEMENTS = 1 << 28


class Unprovable(Exception):
    """Raised by a graph's proof_sizes with the reason a mask cannot be checked at all."""


def causal_pattern(sq: int, sk: int) -> np.ndarray:
    """Bool (sq, sk): query i sees key j iff j <= i + sk - sq (bottom-right aligned)."""
    return np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)


def prove_causal(g, term: MaskTerm, q_len, k_len) -> tuple[bool, str]:
    """(True, proof) if `term` is exactly the causal mask for these lengths; else (False, why not).
    `g`: the matcher.AttentionGraph the term was found in."""
    deps = g.data_dependencies(term.node)
    if deps:
        return False, f"mask depends on the values of {', '.join(deps[:3])}"
    try:
        choices = g.proof_sizes(term.node, q_len, k_len)
    except Unprovable as e:
        return False, str(e)
    proofs, too_large = [], []
    for sizes in choices:
        sq, sk = g.size(q_len, sizes), g.size(k_len, sizes)
        if sq is None or sk is None:
            return False, "query or key length is dynamic without a name"
        if sq > sk:
            return False, "more queries than keys: some rows would see no key"
        if sq * sk > MAX_PROOF_ELEMENTS:
            too_large.append(f"{sq}x{sk}")
            continue
        ok, why = _is_causal_at(g, term, sq, sk, sizes)
        if not ok:
            return False, why
        proofs.append(f"{sq}x{sk}")
    if not proofs:
        return False, f"mask too large to evaluate at rewrite time ({', '.join(too_large)})"
    what = "a constant" if g.is_constant(term.node) else "built from sizes alone"
    return True, f"{what} and equal to the causal pattern at " + ", ".join(proofs)


def _is_causal_at(g, term: MaskTerm, sq: int, sk: int, sizes) -> tuple[bool, str]:
    try:
        value = g.evaluate(term.node, sizes)
    except Exception as e:  # noqa: BLE001 - anything we cannot run is simply not proven
        return False, f"mask could not be evaluated ({type(e).__name__}: {e})"
    if value is None or value.ndim < 2 or tuple(value.shape[-2:]) != (sq, sk):
        return False, "mask does not span (q_len, k_len)"
    keep_expected = np.broadcast_to(causal_pattern(sq, sk), value.shape)
    if value.dtype == np.bool_:
        if term.masked_when is None:
            return False, "bool tensor used as an additive mask"
        ok = bool(((value != term.masked_when) == keep_expected).all())
    elif term.fill is not None:  # a where() condition given as float: not a mask we read
        ok = False
    else:
        v = value.astype(np.float64)
        ok = bool((v[keep_expected] == 0).all()) and bool((v[~keep_expected] <= -1e30).all())
    if not ok:
        return False, "mask built from sizes alone but is not the causal pattern"
    return True, f"{sq}x{sk}"


def is_zero_mask(g, term: MaskTerm) -> bool:
    """An additive mask built from constants and sizes alone that is zero everywhere (e.g. the 0 of
    where(keep, 0, min) once split, T5's zero position bias in cross attention, or an all-zero padding
    mask folded by the ONNX exporter), at every size its graph offers for it (`size_choices`)."""
    if term.kind != "additive" or term.fill is not None or g.data_dependencies(term.node):
        return False
    shape = g.shape(term.node) or ()
    try:
        choices = g.size_choices(term.node)
    except Unprovable:
        return False
    for sizes in choices:
        dims = [g.size(d, sizes) for d in shape]
        if None not in dims and math.prod(dims) > MAX_PROOF_ELEMENTS:
            return False
        try:
            value = g.evaluate(term.node, sizes)
        except Exception:  # noqa: BLE001 - not evaluable: not known to be zero
            return False
        if value is None or value.size > MAX_PROOF_ELEMENTS or not np.issubdtype(value.dtype, np.floating) \
                or value.any():
            return False
    return True
