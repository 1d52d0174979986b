"""A read-only view of an ONNX graph for the matcher, and evaluation of its shape-only parts.

The matcher walks values (tensor names), not nodes: `producer(name)` and `users(name)` are the
edges, `shape(name)` comes from shape inference (each dim an int, a dim_param string, or None),
`constant(name)` is the value of an initializer or Constant node. `evaluate` runs the part of the
graph that depends on nothing but constants and `Shape`/`Size` of tensors, with every symbolic
size replaced by a chosen integer: that is how masks are proven causal and how constant-looking
scales built from shapes are read.
"""
from __future__ import annotations

import ast
import re
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

class NotStatic(Exception):
    """A value depends on data (a graph input, not only its shape), or on a size we do not know."""


def default_domain_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


class GraphView:
    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        self.model = model
        self.base_dir = base_dir  # where external data lives
        self.graph = model.graph
        self.opset = default_domain_opset(model)
        for i, node in enumerate(self.graph.node):
            if not node.name:
                node.name = f"{node.op_type}_{i}"
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            for attr in node.attribute:  # values read inside If/Loop bodies count as users
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    for name in _outer_reads(sub):
                        self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {v.name for v in self.graph.input}
        self.data_inputs = set(self.inputs)   # initializers listed as inputs can be overridden: data
        self.outputs = {v.name for v in self.graph.output}
        self.types: dict[str, onnx.TypeProto] = {}
        for vi in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type
        # symbolic sizes are the dim_params of the graph inputs; other names (shape inference's
        # unk__N) mean unknown, and expressions over input symbols (the dynamo exporter's "s0 + 1")
        # are kept and evaluated when sizes are substituted
        self.symbols = {d for vi in self.graph.input if vi.type.HasField("tensor_type") for d in _dim_params(vi.type)}
        self._const_cache: dict[str, Optional[np.ndarray]] = {}
        self.index = {id(n): i for i, n in enumerate(self.graph.node)}

    # --- structure ---------------------------------------------------------------------------
    def users(self, name: str) -> list:
        """Nodes reading `name`; a graph output counts as one more user (the string "<output>")."""
        users = list(self.consumers.get(name, []))
        if name in self.outputs:
            users.append("<output>")
        return users

    def op(self, name: str) -> Optional[onnx.NodeProto]:
        return self.producer.get(name)

    # --- types and shapes --------------------------------------------------------------------
    def elem_type(self, name: str) -> Optional[int]:
        if name in self.initializers:
            return self.initializers[name].data_type
        t = self.types.get(name)
        if t is not None:
            return t.tensor_type.elem_type
        c = self.constant(name)
        if c is not None:
            return helper.np_dtype_to_tensor_dtype(c.dtype)
        return None

    def shape(self, name: str) -> Optional[tuple]:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        t = self.types.get(name)
        if t is not None and t.tensor_type.HasField("shape"):
            dims = []
            for d in t.tensor_type.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and _is_size_expression(d.dim_param, self.symbols):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            return tuple(dims)
        c = self.constant(name)
        if c is not None:
            return tuple(c.shape)
        return None

    def rank(self, name: str) -> Optional[int]:
        s = self.shape(name)
        return None if s is None else len(s)

    # --- constants ---------------------------------------------------------------------------
    def constant(self, name: str) -> Optional[np.ndarray]:
        """Value of an initializer (not overridable as an input) or a Constant node's output."""
        if name in self._const_cache:
            return self._const_cache[name]
        value = None
        if name in self.initializers and name not in self.data_inputs:
            t = self.initializers[name]
            if t.data_location != onnx.TensorProto.EXTERNAL or int(np.prod(t.dims)) <= 1 << 20:
                try:
                    value = numpy_helper.to_array(t, base_dir=self.base_dir)
                except (OSError, ValueError):
                    value = None
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
        self._const_cache[name] = value
        return value

    def scalar(self, name: str) -> Optional[float]:
        """A constant with one element, as a float; None otherwise."""
        c = self.constant(name)
        if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.number):
            return float(c.reshape(()))
        return None

    # --- evaluation of shape-only subgraphs --------------------------------------------------
    def ancestors(self, names: Iterable[str], stop=frozenset()) -> tuple[list[onnx.NodeProto], list[str]]:
        """Nodes computing `names` from constants and the shapes of tensors, in graph order; and
        the data values they read (graph inputs, initializers that inputs may override, and the
        `stop` values, which are read but not looked behind)."""
        seen, nodes, data, taken = set(), [], [], set()
        stack = list(names)
        while stack:
            n = stack.pop()
            if not n or n in seen:
                continue
            seen.add(n)
            if n in stop or n in self.data_inputs:
                data.append(n)
                continue
            if n in self.initializers:
                continue
            node = self.producer.get(n)
            if node is None:
                data.append(n)
                continue
            if id(node) in taken:
                continue
            taken.add(id(node))
            nodes.append(node)
            if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
                continue  # reads only the shape of its input
            stack.extend(node.input)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    stack.extend(_outer_reads(sub))
        nodes.sort(key=lambda x: self.index[id(x)])
        return nodes, data

    def data_dependencies(self, name: str) -> list[str]:
        return self.ancestors([name])[1]

    def evaluate(self, names: list[str], sizes: dict, feeds: Optional[dict] = None) -> list[np.ndarray]:
        """Evaluate `names` with the reference evaluator. `Shape`/`Size` become constants from the
        inferred shapes, each symbolic dim replaced by `sizes[dim_param]`; `feeds` gives values for
        data the subgraph reads. Raises NotStatic if it reads other data or an unknown size."""
        feeds = dict(feeds or {})
        model = self.submodel(names, sizes, {n: (helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
                                             for n, v in feeds.items()})
        import warnings
        from onnx.reference import ReferenceEvaluator
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                return [np.asarray(x) for x in ReferenceEvaluator(model).run(None, feeds)]
        except Exception as e:  # anything the reference evaluator cannot run is simply not static
            raise NotStatic(f"could not be evaluated ({type(e).__name__}: {str(e)[:200]})") from None

    def submodel(self, names: list[str], sizes: dict, feeds: dict, extra_nodes=(), outputs=None) -> onnx.ModelProto:
        """A model computing `names` (plus `extra_nodes`) from the `feeds` ({name: (elem_type, shape)}),
        constants, and `Shape`/`Size` turned into constants at `sizes`. Raises NotStatic if the
        subgraph reads data other than the feeds, or a size it cannot resolve."""
        nodes, data = self.ancestors(names, stop=frozenset(feeds))
        missing = [d for d in data if d not in feeds]
        if missing:
            raise NotStatic(f"depends on the values of {', '.join(missing[:3])}")
        body = []
        inits = []
        wanted_inits = set()
        for node in nodes:
            if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
                shape = self.concrete_shape(node.input[0], sizes)
                if node.op_type == "Size":
                    value = np.array(int(np.prod(shape)), dtype=np.int64)
                else:
                    attrs = {a.name: a.i for a in node.attribute}
                    r = len(shape)
                    start, end = attrs.get("start", 0), attrs.get("end", r)
                    start = max(0, min(r, start + r if start < 0 else start))
                    end = max(0, min(r, end + r if end < 0 else end))
                    value = np.array(shape[start:end], dtype=np.int64)
                body.append(helper.make_node("Constant", [], [node.output[0]],
                                             value=numpy_helper.from_array(value)))
                continue
            body.append(node)
            for inp in node.input:
                if inp in self.initializers and inp not in feeds:
                    wanted_inits.add(inp)
        body.extend(extra_nodes)
        for node in extra_nodes:
            wanted_inits.update(i for i in node.input if i in self.initializers and i not in feeds)
        for name in names:
            if name in self.initializers and name not in feeds:
                wanted_inits.add(name)
        for name in sorted(wanted_inits):
            inits.append(self.inline_initializer(name))
        outputs = outputs or [(n, self.elem_type(n)) for n in names]
        graph = helper.make_graph(
            body, "sub", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in feeds.items()],
            [helper.make_tensor_value_info(n, t, None) if t else helper.make_value_info(n, onnx.TypeProto())
             for n, t in outputs], inits)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                  ir_version=max(self.model.ir_version, 9))
        model.functions.extend(self.model.functions)
        return model

    def inline_initializer(self, name: str) -> onnx.TensorProto:
        """The initializer with its data in the proto (read from external data when stored there)."""
        t = self.initializers[name]
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return numpy_helper.from_array(numpy_helper.to_array(t, base_dir=self.base_dir), name)
        return t

    def concrete_shape(self, name: str, sizes: dict) -> tuple:
        shape = self.shape(name)
        if shape is None:
            raise NotStatic(f"shape of {name} is unknown")
        out = []
        for d in shape:
            value = resolve(d, sizes)
            if value is None:
                raise NotStatic(f"shape of {name} has a dynamic dim we cannot size")
            out.append(value)
        return tuple(out)

    def static_scalar(self, name: str) -> Optional[float]:
        """A one-element value that is a constant or computed from shapes alone and the same at
        every size (e.g. 1/sqrt(head_dim) built from Shape); None otherwise."""
        c = self.scalar(name)
        if c is not None:
            return c
        values = []
        for sizes in size_choices(self):
            try:
                (v,) = self.evaluate([name], sizes)
            except NotStatic:
                return None
            if v.size != 1 or not np.issubdtype(v.dtype, np.number):
                return None
            values.append(float(v.reshape(())))
        return values[0] if values and all(v == values[0] for v in values) else None


_SIZE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|[-+*/()% ]+")


def _is_size_expression(text: str, symbols: set) -> bool:
    if text in symbols:
        return True
    tokens = _SIZE_TOKEN.findall(text)
    return "".join(tokens) == text and all(t in symbols for t in tokens if t[0].isalpha() or t[0] == "_")


def resolve(dim, sizes: dict) -> Optional[int]:
    """A dim (int, input symbol or expression over symbols) at the given sizes; None if unknown."""
    if isinstance(dim, int):
        return dim
    if not isinstance(dim, str):
        return None
    if dim in sizes:
        return int(sizes[dim])
    try:  # only names, integers and arithmetic reach here (see _is_size_expression)
        return int(eval(dim.replace("/", "//"), {"__builtins__": {}}, dict(sizes)))
    except Exception:
        return None


def size_choices(view: GraphView, above: int = 0) -> list[dict]:
    """Two substitutions for the graph's symbolic dims: distinct small values, then others, so a
    construction checked at both is not an accident of one size. All exceed `above` (a mask's largest
    integer constant: a window of 19 keys is the causal pattern at every length up to 19)."""
    params = sorted(view.symbols)
    return [{p: above + 7 + 2 * i for i, p in enumerate(params)}, {p: above + 5 + 3 * i for i, p in enumerate(params)}] \
        if params else [{}]


def _dim_params(t: onnx.TypeProto):
    if t.tensor_type.HasField("shape"):
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                yield d.dim_param


def _constant_node_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    produced = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads = set()
    for node in graph.node:
        for inp in node.input:
            if inp and inp not in produced:
                reads.add(inp)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                reads |= {r for r in _outer_reads(sub) if r not in produced}
        produced.update(node.output)
    return reads


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def layer_name(node: onnx.NodeProto) -> str:
    """Module path of the node: the dynamo exporter's name scopes, or the TorchScript exporter's
    node name (/model/layers.0/self_attn/Softmax -> model.layers.0.self_attn)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if len(scopes) >= 2 and scopes[-2]:
                return scopes[-2]
    if node.name.startswith("/"):
        parts = [p for p in node.name.split("/") if p]
        if len(parts) >= 2:
            return ".".join(parts[:-1])
    return node.name or f"<{node.op_type}>"
