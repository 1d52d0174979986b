"""The ONNX op vocabulary the matcher reads: each node seen as one canonical operation.

Mirrors `fx_ops`: Mul/Div by a scalar are one `scale`, float-to-float Cast and Identity are
transparent, an inference-mode Dropout is an identity, so one matcher covers the TorchScript and
dynamo exporters' spellings and the fused forms of onnxruntime and ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from .onnx_graph import GraphView, attributes
from .record import fill_kind_of

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class Op:
    name: str
    node: onnx.NodeProto
    args: list = field(default_factory=list)     # value names (or "" for an absent input)
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.attrs.get(key)


def _one_element(view: GraphView, name: str) -> bool:
    shape = view.shape(name)
    return shape is not None and all(d == 1 for d in shape)


def canonical(view: GraphView, name: str) -> Optional[Op]:
    """The canonical op producing value `name`, or None for graph inputs, initializers and ops the
    matcher has no word for."""
    node = view.op(name)
    if node is None:
        return None
    t, ins = node.op_type, list(node.input)
    if node.domain not in ("", "ai.onnx"):
        return Op(f"{node.domain}.{t}", node, ins, attributes(node))
    attrs = attributes(node)
    if t == "MatMul":
        return Op("matmul", node, ins)
    if t == "Einsum":  # the dynamo exporter keeps torch.einsum as one node; the matcher reads its equation
        return Op("einsum", node, ins, {"equation": attrs.get("equation", "")})
    if t == "Transpose":
        perm = attrs.get("perm")
        if perm is None:
            r = view.rank(ins[0])
            perm = list(reversed(range(r))) if r is not None else None
        return Op("transpose", node, ins, {"perm": perm})
    if t in ("Mul", "Div"):
        a, b = ins
        candidates = [(a, b), (b, a)] if t == "Mul" else [(a, b)]
        for x, s in candidates:
            f = view.static_scalar(s)
            if f is not None:
                return Op("scale", node, [x], {"factor": f, "divide": t == "Div", "ref": None})
        for x, s in candidates:
            # a runtime scale is one computed from shapes (a dynamic export's 1/sqrt(head_dim)); one read from the
            # data (q.mean()) may be negative, which turns a mask applied before it inside out: not a scale
            if _one_element(view, s) and not _one_element(view, x) and not view.data_dependencies(s):
                return Op("scale", node, [x], {"factor": None, "divide": t == "Div", "ref": s})
        return Op(t.lower(), node, ins)
    if t == "Add":
        return Op("add", node, ins)
    if t == "Where":
        return Op("where", node, ins)
    if t == "Identity":
        return Op("identity", node, ins)
    if t == "Cast":
        src, dst = view.elem_type(ins[0]), attrs.get("to")
        if src in FLOAT_TYPES and dst in FLOAT_TYPES:
            return Op("cast", node, ins, {"to": dst})
        return Op("cast_other", node, ins, {"to": dst})
    if t == "Softmax":
        return Op("softmax", node, ins, {"axis": attrs.get("axis", -1 if view.opset >= 13 else 1)})
    if t == "Dropout":
        training = view.scalar(ins[2]) if len(ins) > 2 and ins[2] else 0.0
        ratio = view.scalar(ins[1]) if len(ins) > 1 and ins[1] else attrs.get("ratio", 0.5)
        if training is None:
            return Op("dropout", node, ins[:1], {"p": None, "training": None})
        if not training:
            return Op("identity", node, ins[:1])
        return Op("dropout", node, ins[:1], {"p": ratio, "training": True})
    if t in ("Reshape", "Expand"):
        return Op(t.lower(), node, ins)
    if t in ("Unsqueeze", "Squeeze"):
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1 and ins[1]:
            c = view.constant(ins[1])
            axes = None if c is None else [int(x) for x in np.atleast_1d(c)]
        return Op(t.lower(), node, ins[:1], {"axes": axes})
    if t == "IsNaN":
        return Op("isnan", node, ins)
    return Op(t, node, ins, attrs)


def fill_kind(view: GraphView, name: str) -> Optional[str]:
    """How a where() fill value can be expressed exactly (see record.fill_kind_of)."""
    return fill_kind_of(view.scalar(name))
