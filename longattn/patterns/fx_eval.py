"""Evaluating parts of an FX graph on concrete values.

Used twice: to prove a mask causal (a mask that depends on nothing but sizes is evaluated and
compared with the causal pattern) and to verify a rewrite (the matched subgraph and its
replacement run on the same random inputs). Sizes come from the trace's example values, or,
where those are too long to evaluate, from `generic_sizes`: the same subgraph at small lengths.

Evaluating at small lengths is sound only for a subgraph that computes the same function of its
lengths at every length. A static trace (torch.compile's default) writes lengths as constants
into the ops (`view(1, 8192, 9, 64)`, `arange(8192)`), so the traced lengths are replaced by small
ones wherever they appear as integers, and then every evaluated node must have its traced shape
with the same replacement: a constant that depends on the length in another way (8191, a slice
to 4096 of 8192) breaks that and the evaluation is refused. Constants that compare with
positions (a window of 4096 keys) only show above their value, so the small lengths are chosen
above every integer constant of the subgraph.
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
            if sizes is not hint:
                _check_resized_shape(n, values[n], sizes)
        else:
            raise KeyError(f"cannot evaluate {n.op} node {n.name}")
    return [values[t] for t in targets]


class NotGeneric(ValueError):
    """A subgraph evaluated at other lengths did not keep its traced shapes under the length replacement."""


def _check_resized_shape(node: fx.Node, value, sizes) -> None:
    traced = meta_value(node)
    if not isinstance(traced, torch.Tensor) or not isinstance(value, torch.Tensor):
        return
    expected = tuple(int(sizes(d)) for d in traced.shape)
    if tuple(value.shape) != expected:
        raise NotGeneric(f"{node.name} has shape {tuple(value.shape)} at the small lengths, not {expected}: "
                         "it depends on the traced length in a way other than through its sizes")


def _concrete(x, sizes):
    if isinstance(x, (torch.SymInt, torch.SymFloat)) or (type(x) is int):
        return sizes(x)
    if isinstance(x, slice):
        return slice(_concrete(x.start, sizes), _concrete(x.stop, sizes), _concrete(x.step, sizes))
    if isinstance(x, (list, tuple)):
        return type(x)(_concrete(i, sizes) for i in x)
    if isinstance(x, dict):
        return {k: _concrete(v, sizes) for k, v in x.items()}
    return x


# Traced lengths at least this long are replaced by small ones; shorter sizes (heads, head dims, one decode
# query) stay as traced.
MIN_REPLACED_LENGTH = 64


class SmallSizes:
    """A `sizes` function for evaluating at small lengths: each free symbol of a symbolic size takes a small
    value (first, first + step, ...), and each static length in `lengths` (traced value -> small value) is
    replaced wherever it appears as an integer. Other values pass through."""

    def __init__(self, lengths: Optional[dict] = None, first: int = 23, step: int = 4):
        self.lengths = dict(lengths or {})
        self.smallest = min([first, *self.lengths.values()])
        self.first, self.step = first + step * len(self.lengths), step
        self.symbols: dict = {}

    def __call__(self, x):
        if type(x) is int:
            return self.lengths.get(x, x)
        if not isinstance(x, (torch.SymInt, torch.SymFloat)):
            return x
        expr = x.node.expr
        for sym in sorted(expr.free_symbols, key=str):
            self.symbols.setdefault(sym, self.first + self.step * len(self.symbols))
        value = expr.xreplace({s: self.symbols[s] for s in expr.free_symbols})
        return int(value) if isinstance(x, torch.SymInt) else float(value)


def small_sizes(first: int = 23, step: int = 4) -> SmallSizes:
    """Symbolic sizes at small values (first, first + step, ...); concrete values pass through."""
    return SmallSizes(first=first, step=step)


def int_constants(nodes: Iterable[fx.Node]) -> set[int]:
    """The integers written into the arguments of `nodes` (sizes, dims, indices, slice bounds)."""
    found: set[int] = set()

    def visit(x):
        if type(x) is int:
            found.add(x)
        elif isinstance(x, slice):
            visit(x.start), visit(x.stop), visit(x.step)
        elif isinstance(x, (list, tuple)):
            for i in x:
                visit(i)
        elif isinstance(x, dict):
            for i in x.values():
                visit(i)

    for n in nodes:
        if n.op in ("call_function", "call_method"):
            visit(n.args), visit(n.kwargs)
    return found


def generic_sizes(lengths: Iterable, subgraph: Iterable[fx.Node], other_sizes: Iterable = ()) -> Optional[SmallSizes]:
    """Sizes at which `subgraph` is evaluated as the same computation at small lengths (see the module
    docstring), or None where that cannot be told apart from the trace. `lengths`: the traced sequence lengths
    (ints or symbolic); `other_sizes`: the other dims of the operands (batch, heads, head dim), which a replaced
    length must not equal. Static lengths >= MIN_REPLACED_LENGTH get distinct small values, all above every other
    integer constant of the subgraph."""
    static = sorted({x for x in lengths if type(x) is int and x >= MIN_REPLACED_LENGTH})
    if any(type(d) is int and d in static for d in other_sizes):
        return None  # a length equal to a head count or head dim: its constants cannot be told apart
    constants = {abs(c) for c in int_constants(subgraph)} - set(static)
    first = max([23] + [c + 2 for c in constants])
    return SmallSizes({length: first + 4 * i for i, length in enumerate(static)}, first=first)


def is_symbolic(x) -> bool:
    return isinstance(x, (torch.SymInt, torch.SymFloat))
