"""Proving an ONNX mask causal from how it is built (the ONNX twin of `masks.py`).

A mask is causal only if (1) its value reads no data: nothing but constants and the *shapes* of
tensors (an initializer that a graph input may override is data), and (2) evaluated at every
size substitution tried, it equals the bottom-right causal pattern. A constant mask (the dynamo
exporter folds a static-shape causal mask into an initializer) is proven at its one size.
"""
from __future__ import annotations

import numpy as np

from .masks import causal_pattern
from .onnx_graph import GraphView, NotStatic, resolve, size_choices
from .record import MaskTerm

MAX_PROOF_ELEMENTS = 1 << 26
# Integer-valued constants at least this large are sentinels (a Slice's "to the end"), not lengths or windows;
# below it, one above MAX_PROOF_SIDE cannot be exceeded by the sizes a proof evaluates at.
SENTINEL = 1 << 31
MAX_PROOF_SIDE = 1 << 12


def largest_integer_constant(view: GraphView, name: str) -> int:
    """The largest |integer value| among the constants `name` is computed from (sentinels left out)."""
    nodes, _ = view.ancestors([name])
    largest = 0
    for node in nodes:
        for value in map(view.constant, list(node.input) + list(node.output)):
            if value is None or value.size > 4096 or not np.issubdtype(value.dtype, np.number):
                continue
            v = np.abs(value.astype(np.float64, copy=False).ravel())
            v = v[np.isfinite(v) & (v == np.round(v)) & (v < SENTINEL)]
            if v.size:
                largest = max(largest, int(v.max()))
    return largest


def proof_sizes(view: GraphView, name: str):
    """size_choices above every integer constant of `name`'s construction, or a reason why there are none."""
    largest = largest_integer_constant(view, name)
    if largest > MAX_PROOF_SIDE:
        return f"mask built with the constant {largest}: too large to evaluate beyond at rewrite time"
    return size_choices(view, above=largest)


def prove_causal(view: GraphView, term: MaskTerm, q_len, k_len) -> tuple[bool, str]:
    """(True, proof) if `term` is exactly the causal mask for these lengths; else (False, why not)."""
    deps = view.data_dependencies(term.node)
    if deps:
        return False, f"mask depends on the values of {', '.join(deps[:3])}"
    proofs = []
    choices = proof_sizes(view, term.node)
    if isinstance(choices, str):
        return False, choices
    for sizes in choices:
        sq, sk = resolve(q_len, sizes), resolve(k_len, sizes)
        if sq is None or sk is None:
            return False, "query or key length is dynamic without a name"
        if sq > sk:
            return False, "more queries than keys: some rows would see no key"
        if sq * sk > MAX_PROOF_ELEMENTS:
            return False, f"mask too large to evaluate at rewrite time ({sq}x{sk})"
        try:
            (value,) = view.evaluate([term.node], sizes)
        except NotStatic as e:
            return False, f"mask could not be evaluated ({e})"
        if value.ndim < 2 or tuple(value.shape[-2:]) != (sq, sk):
            return False, "mask does not span (q_len, k_len)"
        keep_expected = np.broadcast_to(causal_pattern(sq, sk).numpy(), value.shape)
        if value.dtype == np.bool_:
            if term.masked_when is None:
                return False, "bool tensor used as an additive mask"
            ok = bool(((value != term.masked_when) == keep_expected).all())
        else:
            v = value.astype(np.float64)
            ok = bool((v[keep_expected] == 0).all()) and bool((v[~keep_expected] <= -1e30).all()
                                                               if term.fill is None else True)
            if term.fill is not None:  # a where() condition given as float: not a mask we read
                ok = False
        if not ok:
            return False, "mask built from sizes alone but is not the causal pattern"
        proofs.append(f"{sq}x{sk}")
        if not any(isinstance(d, str) for d in (q_len, k_len)):
            break  # static lengths: one size to check
    what = "built from sizes alone" if view.op(term.node) is not None and view.constant(term.node) is None \
        else "a constant"
    return True, f"{what} and equal to the causal pattern at " + ", ".join(proofs)


def is_zero_mask(view: GraphView, term: MaskTerm) -> bool:
    """An additive mask built from constants and sizes alone that is zero everywhere (e.g. a zero
    position bias in cross attention, or an all-zero padding mask folded by the exporter)."""
    if term.kind != "additive" or term.fill is not None or view.data_dependencies(term.node):
        return False
    choices = proof_sizes(view, term.node)
    if isinstance(choices, str):
        return False
    for sizes in choices:
        try:
            (value,) = view.evaluate([term.node], sizes)
        except NotStatic:
            return False
        if value.size > MAX_PROOF_ELEMENTS or not np.issubdtype(value.dtype, np.floating) or value.any():
            return False
    return True
