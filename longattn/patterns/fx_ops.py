"""Canonical names for the many spellings of the same op in FX graphs.

Dynamo graphs hold torch functions, Tensor methods and Python operators; pre-dispatch ATen
graphs from torch.export hold `aten.*` overloads. `canonical(node)` maps either to one small
vocabulary (`matmul`, `transpose`, `scale`, `add`, `softmax`, ...) with normalised arguments,
so the matcher is written once, against meanings rather than spellings.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from .record import fill_kind_of

aten = torch.ops.aten


@dataclass
class Op:
    name: str
    args: tuple
    kw: dict

    def __getitem__(self, key):
        return self.kw[key]


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _is_fn(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and any(node.target is t for t in targets)


def is_number(x) -> bool:
    """A Python scalar, or a node holding one (a SymFloat from .item() in dynamic graphs)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, numbers.Number):
        return True
    if isinstance(x, fx.Node):
        val = x.meta.get("example_value", x.meta.get("val"))
        return isinstance(val, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(val, bool)
    return False


_MATMUL = (torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default)
_EINSUM = (torch.einsum, torch.functional.einsum, aten.einsum.default)
_TRANSPOSE = (torch.transpose, torch.swapaxes, torch.swapdims, aten.transpose.int)
_PERMUTE = (torch.permute, aten.permute.default)
_MUL = (operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar)
_DIV = (operator.truediv, torch.div, torch.true_divide, aten.div.Tensor, aten.div.Scalar)
_ADD = (operator.add, torch.add, aten.add.Tensor)
_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, aten.softmax.int, aten._softmax.default,
            torch._softmax if hasattr(torch, "_softmax") else torch.softmax)
_WHERE = (torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
_MASKED_FILL = (torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor)
_DROPOUT = (torch.nn.functional.dropout, torch.dropout, aten.dropout.default)
_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
         aten.scaled_dot_product_attention.default)
_BADDBMM = (torch.baddbmm, aten.baddbmm.default)
_REPEAT_INTERLEAVE = (torch.repeat_interleave, aten.repeat_interleave.self_int)
_IDENTITY_METHODS = ("contiguous", "clone")
_IDENTITY_FNS = (torch.clone, aten.clone.default, aten.contiguous.default, aten.alias.default)
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_CAST_FNS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)
_VIEW_FNS = (torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_EXPAND_FNS = (aten.expand.default,)


# Nodes that only check metadata (torch.export inserts them after casts); they are not real uses.
_METADATA_ASSERTS = tuple(getattr(aten, name).default for name in ("_assert_tensor_metadata",)
                          if hasattr(aten, name))


def real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _METADATA_ASSERTS)]


def metadata_asserts(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target in _METADATA_ASSERTS]


def _dtype_of_to(node: fx.Node) -> Optional[torch.dtype]:
    for a in list(node.args[1:]) + [node.kwargs.get("dtype")]:
        if isinstance(a, torch.dtype):
            return a
    return None


def canonical(node: Any) -> Optional[Op]:
    """The canonical op computed by `node`, or None for anything outside the vocabulary."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    m = node.op == "call_method"
    t = node.target
    if (m and t in ("matmul", "bmm", "__matmul__")) or _is_fn(node, *_MATMUL):
        return Op("matmul", (node.args[0], node.args[1]), {})
    if (m and t == "baddbmm") or _is_fn(node, *_BADDBMM):  # beta·input + alpha·(batch1 @ batch2)
        return Op("baddbmm", (node.args[0], node.args[1], node.args[2]),
                  {"beta": node.kwargs.get("beta", 1), "alpha": node.kwargs.get("alpha", 1)})
    if _is_fn(node, *_EINSUM):
        eq = node.args[0]
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return Op("einsum", tuple(operands), {"equation": eq})
    if (m and t in ("transpose", "swapaxes", "swapdims")) or _is_fn(node, *_TRANSPOSE):
        return Op("transpose", (node.args[0],), {"dims": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))})
    if _is_fn(node, getattr) and node.args[1] == "mT" or _is_fn(node, aten.mT.default):
        return Op("transpose", (node.args[0],), {"dims": (-2, -1)})
    if (m and t == "permute") or _is_fn(node, *_PERMUTE):
        dims = node.args[1:] if m and not isinstance(_arg(node, 1, "dims"), (list, tuple)) else _arg(node, 1, "dims")
        return Op("permute", (node.args[0],), {"dims": tuple(dims)})
    if (m and t in ("mul", "__mul__", "__rmul__")) or _is_fn(node, *_MUL):
        a, b = node.args[0], node.args[1]
        if is_number(b) and not is_number(a):
            return Op("scale", (a,), {"factor": b, "divide": False})
        if is_number(a) and not is_number(b):
            return Op("scale", (b,), {"factor": a, "divide": False})
        for x, c in ((a, b), (b, a)):
            factor = constant_scalar(c)
            if factor is not None and constant_scalar(x) is None:
                return Op("scale", (x,), {"factor": factor, "divide": False})
        return Op("mul", (a, b), {})
    if (m and t in ("div", "__truediv__")) or _is_fn(node, *_DIV):
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("rounding_mode") is not None:
            return None
        if is_number(b) and not is_number(a):
            return Op("scale", (a,), {"factor": b, "divide": True})
        factor = constant_scalar(b)
        if factor is not None and constant_scalar(a) is None:
            return Op("scale", (a,), {"factor": factor, "divide": True})
        return None
    if (m and t in ("add", "__add__", "__radd__")) or _is_fn(node, *_ADD):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            return None
        return Op("add", (node.args[0], node.args[1]), {})
    if (m and t == "softmax") or _is_fn(node, *_SOFTMAX):
        dim = _arg(node, 1, "dim")
        dtype = node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], torch.dtype) else None)
        if _is_fn(node, aten._softmax.default):
            dtype = None
        return Op("softmax", (node.args[0],), {"dim": dim, "dtype": dtype})
    if (m and t == "masked_fill") or _is_fn(node, *_MASKED_FILL):
        return Op("masked_fill", (node.args[0], _arg(node, 1, "mask")), {"value": _arg(node, 2, "value")})
    if _is_fn(node, *_WHERE) and len(node.args) == 3:
        return Op("where", tuple(node.args), {})
    if (m and t in ("to", "type")) and _dtype_of_to(node) is not None or _is_fn(node, *_CAST_FNS):
        return Op("cast", (node.args[0],), {"dtype": _dtype_of_to(node)})
    if m and t in _CAST_METHODS:
        return Op("cast", (node.args[0],), {"dtype": _CAST_METHODS[t]})
    if m and t == "type_as":
        return Op("cast", (node.args[0],), {"dtype": None})
    if (m and t in _IDENTITY_METHODS) or _is_fn(node, *_IDENTITY_FNS):
        return Op("identity", (node.args[0],), {})
    if _is_fn(node, *_DROPOUT):
        training = _arg(node, 2, "training" if not _is_fn(node, torch.dropout, aten.dropout.default) else "train", True)
        return Op("dropout", (node.args[0],), {"p": _arg(node, 1, "p", 0.5), "training": training})
    if _is_fn(node, *_SDPA):
        return Op("sdpa", (node.args[0], node.args[1], node.args[2]), {
            "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
            "is_causal": _arg(node, 5, "is_causal", False), "scale": node.kwargs.get("scale"),
            "enable_gqa": node.kwargs.get("enable_gqa", False)})
    if (m and t in ("reshape", "view")) or _is_fn(node, *_VIEW_FNS):
        shape = node.args[1:] if m and not isinstance(_arg(node, 1, "shape"), (list, tuple)) else _arg(node, 1, "shape")
        return Op("reshape", (node.args[0],), {"shape": tuple(shape)})
    if (m and t == "expand") or _is_fn(node, *_EXPAND_FNS):
        shape = node.args[1:] if m and not isinstance(_arg(node, 1, "size"), (list, tuple)) else _arg(node, 1, "size")
        return Op("expand", (node.args[0],), {"shape": tuple(shape)})
    if (m and t == "repeat_interleave") or _is_fn(node, *_REPEAT_INTERLEAVE):
        return Op("repeat_interleave", (node.args[0],), {"repeats": _arg(node, 1, "repeats"), "dim": _arg(node, 2, "dim")})
    if (m and t == "unsqueeze") or _is_fn(node, torch.unsqueeze, aten.unsqueeze.default):
        return Op("unsqueeze", (node.args[0],), {"dim": _arg(node, 1, "dim")})
    if _is_fn(node, operator.getitem) and isinstance(node.args[1], tuple):
        return Op("index", (node.args[0],), {"index": node.args[1]})
    return None


# Ops a constant scale may be computed with: torch.rsqrt(torch.tensor(64.0)), torch.tensor(d).sqrt(), ...
_CONSTANT_FNS = (torch.tensor, torch.scalar_tensor, torch.as_tensor, torch.rsqrt, torch.sqrt, torch.reciprocal,
                 torch.pow, torch.mul, torch.div, torch.true_divide, operator.mul, operator.truediv, operator.pow,
                 operator.neg)
_CONSTANT_METHODS = ("rsqrt", "sqrt", "reciprocal", "pow", "mul", "div", "float", "double", "half", "to",
                     "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__neg__")


def constant_scalar(x) -> Optional[float]:
    """The value of a 0-d float tensor computed from literals alone (torch.rsqrt(torch.tensor(64.0))), else None.
    Every op in its history must be one of the pure ops above: no graph input, parameter, buffer or size (a
    data-dependent or length-dependent value is no constant), and no random op (a new value each call)."""
    from .fx_eval import ancestors, evaluate, meta_value
    if not isinstance(x, fx.Node):
        return None
    val = meta_value(x)
    if not isinstance(val, torch.Tensor) or val.dim() != 0 or not val.is_floating_point():
        return None
    for n in ancestors(x):
        if n.op == "call_function" and any(n.target is f for f in _CONSTANT_FNS):
            continue
        if n.op == "call_method" and n.target in _CONSTANT_METHODS:
            continue
        return None
    try:
        (value,) = evaluate([x], {})
    except Exception:  # noqa: BLE001 - not evaluable here: not a constant we can read
        return None
    return float(value) if isinstance(value, torch.Tensor) and value.dim() == 0 else None


def scalar_value(x) -> Optional[float]:
    """A Python number for a constant factor; None for a runtime scalar node."""
    if isinstance(x, numbers.Number) and not isinstance(x, bool):
        return float(x)
    return None


def fill_kind(value) -> Optional[str]:
    """How a masked_fill / where fill value can be expressed exactly (see record.fill_kind_of)."""
    return fill_kind_of(scalar_value(value))
