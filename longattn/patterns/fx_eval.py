"""Evaluating parts of an FX graph on concrete values.

Used twice: to prove a mask causal (a mask that depends on nothing but sizes is evaluated and
compared with the causal pattern) and to verify a rewrite (the matched subgraph and its
replacement run on the same random inputs). Sizes come from the trace's example values;
symbolic sizes are replaced by their hints or, to keep proofs cheap, by small substitutes.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

_METADATA_METHODS = ("size", "dim", "numel")
_METADATA_ATTRS = ("shape", "device", "dtype", "ndim", "is_cuda")


def meta_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def hint(x):
    """Concrete int/float for a SymInt/SymFloat (its hint), else x unchanged."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        h = x.node.hint
        if h is None:
            raise ValueError(f"unbacked symbolic value {x}")
        return h
    return x


def concrete_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    val = meta_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(hint(d)) for d in val.shape)
    except ValueError:
        return None


def is_metadata_access(node: fx.Node) -> bool:
    """Reads only a tensor's metadata (size, dtype, device), never its values."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRS:
        return True
    return node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default)


def _metadata_value(node: fx.Node, sizes: Callable[[Any], Any]):
    src = meta_value(node.args[0])
    if node.op == "call_method":
        shape = torch.Size([sizes(d) for d in src.shape])
        if node.target == "size":
            return shape if len(node.args) < 2 else shape[node.args[1]]
        return len(shape) if node.target == "dim" else shape.numel()
    if node.target is getattr:
        attr = node.args[1]
        if attr == "shape":
            return torch.Size([sizes(d) for d in src.shape])
        return src.dim() if attr == "ndim" else getattr(src, attr)
    if node.target is torch.ops.aten.sym_size.int:
        return sizes(src.shape[node.args[1]])
    return sizes(src.numel())


def ancestors(node: fx.Node, stop: Callable[[fx.Node], bool] = lambda n: False) -> list[fx.Node]:
    """All nodes `node` depends on (itself included), in graph order, not looking past `stop` nodes."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop(n) or is_metadata_access(n):
            continue
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Placeholders / attributes whose *values* `node` depends on (sizes and metadata do not count)."""
    out = []
    for n in ancestors(node):
        if n.op == "get_attr":
            out.append(n)
        elif n.op == "placeholder" and isinstance(meta_value(n), torch.Tensor):
            out.append(n)
    return out


def evaluate(targets: Iterable[fx.Node], env: dict[fx.Node, Any],
             sizes: Callable[[Any], Any] = hint) -> list[Any]:
    """Evaluate `targets` from the values in `env`; SymInt placeholders and metadata reads are
    answered from the trace through `sizes` (hint by default). Raises KeyError for a data input
    missing from env."""
    targets = list(targets)
    values = dict(env)
    needed: list[fx.Node] = []
    for t in targets:
        needed.extend(ancestors(t, stop=lambda n: n in values))
    order = {n: i for i, n in enumerate(targets[0].graph.nodes)} if targets else {}
    for n in sorted(set(needed), key=order.__getitem__):
        if n in values:
            continue
        if is_metadata_access(n):
            values[n] = _metadata_value(n, sizes)
        elif n.op == "placeholder":
            val = meta_value(n)
            if isinstance(val, (torch.SymInt, torch.SymFloat, int, float)):
                values[n] = sizes(val)
            else:
                raise KeyError(f"no value for graph input {n.name}")
        elif n.op in ("call_function", "call_method"):
            args = fx.node.map_arg(n.args, values.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, values.__getitem__)
            args = _concrete(args, sizes)
            kwargs = _concrete(kwargs, sizes)
            if n.op == "call_function":
                values[n] = n.target(*args, **kwargs)
            else:
                values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise KeyError(f"cannot evaluate {n.op} node {n.name}")
    return [values[t] for t in targets]


def _concrete(x, sizes):
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return sizes(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_concrete(i, sizes) for i in x)
    if isinstance(x, dict):
        return {k: _concrete(v, sizes) for k, v in x.items()}
    return x


def small_sizes(first: int = 23, step: int = 4) -> Callable[[Any], Any]:
    """A `sizes` function that evaluates symbolic sizes with each free symbol set to a small
    value (first, first+step, ...), so a dynamic-shape subgraph can be checked cheaply at a
    length other than the traced one. Concrete values pass through."""
    chosen: dict = {}

    def sizes(x):
        if not isinstance(x, (torch.SymInt, torch.SymFloat)):
            return x
        expr = x.node.expr
        for sym in sorted(expr.free_symbols, key=str):
            chosen.setdefault(sym, first + step * len(chosen))
        value = expr.xreplace({s: chosen[s] for s in expr.free_symbols})
        return int(value) if isinstance(x, torch.SymInt) else float(value)

    return sizes


def is_symbolic(x) -> bool:
    return isinstance(x, (torch.SymInt, torch.SymFloat))
