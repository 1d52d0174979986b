"""Rewrite ONNX attention sites into `ai.longattn` nodes, by policy (the ONNX twin of fx_rewrite).

For each site found by the ONNX front end: ask the policy for its length bands, adapt them to what
the site allows (`fit_bands`), build the replacement (one `ai.longattn` node plus the casts,
transposes and mask arithmetic around it), then verify it: the matched subgraph and the
replacement run in onnxruntime on the same random inputs, the replacement through its function
body (exact attention), and must agree before the site is rewritten. A mismatch leaves the site
as it was and says why in the report. Nothing of the input model is modified.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..patterns.onnx_attention import find_attention_sites
from ..patterns.onnx_graph import GraphView, NotStatic, size_choices
from ..patterns.record import AttentionSite
from ..plan import Band, encode_plan
from .bands import fit_bands
from .onnx_functions import DOMAIN, DOMAIN_VERSION, NODE_FOR_KIND, attention_function
from .report import Report, SiteReport
from .verification import MAX_VERIFY_SCORES, RewriteRejected

if TYPE_CHECKING:
    from .policy import Policy

TOLERANCE = {TensorProto.FLOAT: 1e-4, TensorProto.DOUBLE: 1e-6, TensorProto.FLOAT16: 2e-2, TensorProto.BFLOAT16: 5e-2}


def rewrite_model(model: onnx.ModelProto, policy: "Policy", *, verify: bool = True, base_dir: str = "",
                  band_notes: Optional[Callable[[list[Band]], list[str]]] = None) -> tuple[onnx.ModelProto, Report]:
    """Return (rewritten copy of `model`, report of every site). `model` may hold external-data
    references (loaded without their data); `base_dir` is where that data lives. `band_notes` adds the
    runtime's notes on a site's bands to its report row (longattn.onnx passes the onnxruntime library's)."""
    inline_small_external_data(model, base_dir)
    inferred = infer_shapes(model)
    view = GraphView(inferred, base_dir=base_dir)
    sites = find_attention_sites(view)
    indices = [s.layer_index for s in sites if s.layer_index is not None]
    num_layers = max(indices) + 1 if indices else None
    report = Report(policy=getattr(policy, "source", ""))
    emitter = Emitter(view, original=model)
    for site in sites:
        if site.skipped:
            report.sites.append(SiteReport.from_site(site, status="skipped", reason=site.skip_reason))
            continue
        decision = policy.decide(site.layer, site.layer_index, num_layers)
        bands, notes = fit_bands(list(decision.bands), site, keep_state=False)
        if band_notes is not None:
            notes += band_notes(bands)
        row = SiteReport.from_site(site, bands=bands, rule=getattr(decision, "source", None), notes=notes)
        if all(b.kind == "exact" for b in bands):
            row.status = "exact"
            report.sites.append(row)
            continue
        try:
            emitter.emit(site, bands, verify=verify)
            row.status = "rewritten"
        except RewriteRejected as e:
            row.status, row.reason = "skipped", str(e)
        report.sites.append(row)
    return emitter.finish(), report


# Initializers up to this many elements are read even from external data: shapes, scales and
# masks that shape inference and the matcher must see; weights stay where they are.
SMALL_INITIALIZER = 1 << 16


def inline_small_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.data_location == TensorProto.EXTERNAL and int(np.prod(t.dims)) <= SMALL_INITIALIZER:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t, base_dir=base_dir),
                                                                        t.name))


@functools.lru_cache(maxsize=1)
def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference, loaded from its file: the package `onnxruntime.tools`
    imports torch whenever torch is installed (its __init__), and converting needs no torch."""
    import importlib.util
    import logging
    import os
    ort = importlib.util.find_spec("onnxruntime")
    path = os.path.join(ort.submodule_search_locations[0], "tools", "symbolic_shape_infer.py")
    spec = importlib.util.spec_from_file_location("longattn._ort_symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logging.getLogger(module.__name__).setLevel(logging.ERROR)
    # our copy only: its Einsum lets a later operand's broadcast 1 replace an earlier size ('bhqd,bhkd->bhqk' with
    # one key head gave the scores 1 head), which made a GQA site look like broadcast queries
    module.SymbolicShapeInference._infer_Einsum = _einsum_broadcasting(module.SymbolicShapeInference._infer_Einsum)
    return module.SymbolicShapeInference


def _einsum_broadcasting(infer):
    """SymbolicShapeInference's Einsum, then its output's sizes read again with broadcasting: a letter takes the
    size that is not 1 among the operands (explicit equations without an ellipsis; the rest as it was)."""
    from onnx import helper

    def infer_einsum(self, node):
        infer(self, node)
        equation = next((a.s for a in node.attribute if a.name == "equation"), b"").decode().replace(" ", "")
        if "->" not in equation or "..." in equation:
            return
        terms, result = equation.split("->")
        sizes: dict = {}
        for i, term in enumerate(terms.split(",")):
            shape = self._get_shape(node, i)
            if len(shape) != len(term):
                return
            for letter, size in zip(term, shape):
                if sizes.get(letter, 1) == 1:
                    sizes[letter] = size
        out = self.known_vi_[node.output[0]]
        out.CopyFrom(helper.make_tensor_value_info(node.output[0], out.type.tensor_type.elem_type,
                                                   [sizes[c] for c in result]))
    return infer_einsum


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference (it follows sizes through Shape/Gather/Concat into
    Reshape, where onnx's own inference gives up), else onnx's with data propagation."""
    try:
        inferred = _symbolic_shape_inference().infer_shapes(model, auto_merge=True)
        if inferred is not None:
            return inferred
    except Exception:  # it raises on ops it does not know: fall back
        pass
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


class Emitter:
    """Builds replacements against the unmodified view, then applies them all at once."""

    def __init__(self, view: GraphView, original: onnx.ModelProto):
        self.view = view  # over a shape-inferred copy of `original`
        self.original = original
        self.pending: list[tuple[AttentionSite, list[onnx.NodeProto]]] = []
        self.new_initializers: dict[str, onnx.TensorProto] = {}
        self.op_types: set[str] = set()
        self.elem_type: Optional[int] = None
        self.counter = 0
        self.serial = 0

    # --- building ------------------------------------------------------------------------------
    def _name(self, what: str) -> str:
        self.serial += 1
        return f"longattn/{self.counter}/{what}_{self.serial}"

    def emit(self, site: AttentionSite, bands: list[Band], *, verify: bool) -> None:
        view = self.view
        if view.opset < 13:
            raise RewriteRejected(f"model opset {view.opset} < 13 is not rewritten")
        T = view.elem_type(site.output)
        if T not in TOLERANCE:
            raise RewriteRejected(f"attention output of ONNX type {T} is not a float type we rewrite")
        if self.elem_type is not None and T != self.elem_type:
            raise RewriteRejected("attention in a second float type: one model-local function per op type")
        self.counter += 1
        nodes, out = self._replacement(site, bands, T, out_name=self._name("out"))
        if verify:
            self._verify(site, nodes, out, T)
        nodes[-1].output[0] = site.output  # takes over the old product's output name
        self.pending.append((site, nodes))
        self.op_types.add(NODE_FOR_KIND[bands[-1].kind])
        self.elem_type = T

    def _replacement(self, site: AttentionSite, bands, T: int, out_name: str):
        view, nodes = self.view, []

        def add(op, inputs, what, **attrs):
            name = self._name(what)
            nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
            return name

        def as_T(x):
            return x if view.elem_type(x) == T else add("Cast", [x], "cast", to=T)

        def axes(values):
            name = f"longattn/axes/{'_'.join(map(str, values))}"
            self.new_initializers.setdefault(name, numpy_helper.from_array(np.array(values, np.int64), name))
            return name

        q, k, v = as_T(site.q), as_T(site.k), as_T(site.v)
        if site.scale_ref is not None:
            q = add("Mul", [q, as_T(site.scale_ref)], "runtime_scale")
        rank = 4 if site.layout == "bshd" else len(view.shape(site.q))
        if site.layout == "bshd":  # (B, S, H·D) -> (B, H, S, D)
            split = self._name("split_heads")
            self.new_initializers[split] = numpy_helper.from_array(np.array([0, 0, site.num_heads, -1], np.int64), split)
            q, k, v = (add("Transpose", [add("Reshape", [x, split], "reshape")], "transpose", perm=[0, 2, 1, 3])
                       for x in (q, k, v))
        if site.k_transposed:
            r = len(view.shape(site.k))
            k = add("Transpose", [k], "k_untranspose", perm=list(range(r - 2)) + [r - 1, r - 2])
        mask = self._combine_masks(site, T, add, as_T)
        if rank == 3:  # (B·H, S, D) from bmm-style code: one batch of B·H heads
            q, k, v = (add("Unsqueeze", [x, axes([0])], "unsqueeze") for x in (q, k, v))
        kind_node = NODE_FOR_KIND[bands[-1].kind]
        result = self._name(kind_node)
        nodes.append(helper.make_node(kind_node, [q, k, v, mask], [result], name=result, domain=DOMAIN,
                                      scale=float(site.scale if site.scale is not None else 1.0),
                                      causal=int(bool(site.causal)), plan=encode_plan(bands)))
        if rank == 3:
            result = add("Squeeze", [result, axes([0])], "squeeze")
        if site.layout == "bshd":
            merge = self._name("merge_heads")
            self.new_initializers[merge] = numpy_helper.from_array(np.array([0, 0, -1], np.int64), merge)
            result = add("Reshape", [add("Transpose", [result], "transpose", perm=[0, 2, 1, 3]), merge], "reshape")
        if nodes[-1].output[0] != result:
            raise AssertionError("replacement must end with the node producing the result")
        nodes[-1].output[0] = out_name
        return nodes, out_name

    def _combine_masks(self, site: AttentionSite, T: int, add, as_T) -> str:
        """All mask terms as one additive mask in T; a scalar 0 when there are none."""
        np_t = helper.tensor_dtype_to_np_dtype(T)

        def scalar(value: float) -> str:
            name = f"longattn/const/{T}/{value}"
            self.new_initializers.setdefault(name, numpy_helper.from_array(np.array(value, np_t), name))
            return name

        parts = []
        for t in site.masks:
            if t.kind == "boolean":  # -inf where masked
                fill = scalar(-math.inf if t.fill is None else t.fill)
            elif t.fill is not None:  # where(cond, scores, dtype-min): additive, exactly
                fill = scalar(t.fill)
            else:
                parts.append(as_T(t.node))
                continue
            masked_when = True if t.masked_when is None else t.masked_when
            args = [t.node, fill, scalar(0.0)] if masked_when else [t.node, scalar(0.0), fill]
            parts.append(add("Where", args, "mask"))
        if not parts:
            return scalar(0.0)
        total = parts[0]
        for p in parts[1:]:
            total = add("Add", [total, p], "mask_sum")
        return total

    # --- verification --------------------------------------------------------------------------
    def _verify(self, site: AttentionSite, nodes: list, out: str, T: int) -> None:
        import onnxruntime as ort
        view = self.view
        sizes = size_choices(view)[0]
        feeds = [site.q, site.k, site.v] + ([site.scale_ref] if site.scale_ref is not None else [])
        for t in site.masks:
            try:
                view.concrete_shape(t.node, sizes)
                feeds.append(t.node)
            except NotStatic:  # shape inference lost its size: feed the model inputs it is built from
                feeds.extend(view.data_dependencies(t.node))
        feeds = list(dict.fromkeys(feeds))
        rng = np.random.default_rng(0)
        values, types = {}, {}
        try:
            for name in feeds:
                shape = view.concrete_shape(name, sizes)
                et = view.elem_type(name)
                types[name] = (et, list(shape))
                np_t = helper.tensor_dtype_to_np_dtype(et)
                term = next((t for t in site.masks if t.node == name), None)
                if et == TensorProto.BOOL:
                    keep = rng.random(shape) > 0.3
                    if keep.ndim:
                        keep[..., 0] = True  # every row keeps a key: fully masked rows are where kinds differ
                    values[name] = keep if (term is None or term.masked_when is False) else ~keep
                elif name == site.scale_ref:
                    values[name] = np.full(shape, 0.125, np_t)
                elif np.issubdtype(np_t, np.integer):  # e.g. an attention_mask input: 0/1, first key kept
                    ints = rng.integers(0, 2, shape).astype(np_t)
                    if ints.ndim:
                        ints[..., 0] = 1
                    values[name] = ints
                else:
                    values[name] = rng.standard_normal(shape).astype(np_t)
            qs, vs = view.concrete_shape(site.q, sizes), view.concrete_shape(site.v, sizes)
            scores = int(np.prod(qs[:-1])) * vs[-2]
            if scores > MAX_VERIFY_SCORES:
                raise RewriteRejected(f"too large to verify at conversion time ({scores} scores); "
                                      "export with dynamic lengths or convert with --no-verify (verify=False)")
            sub = view.submodel([site.output], sizes, types, extra_nodes=nodes,
                                outputs=[(site.output, T), (out, T)])
            sub.functions.append(attention_function(nodes_op(nodes), T, view.opset))
            if not any(o.domain == DOMAIN for o in sub.opset_import):
                sub.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
            for name, init in self.new_initializers.items():
                if any(name in n.input for n in nodes):
                    sub.graph.initializer.append(init)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            sess = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
            expected, got = sess.run(None, values)
        except RewriteRejected:
            raise
        except NotStatic as e:
            raise RewriteRejected(f"could not verify the rewrite: the site {e}") from None
        except Exception as e:
            raise RewriteRejected(f"could not verify the rewrite ({type(e).__name__}: {str(e)[:300]})") from None
        tol = TOLERANCE[T]
        if expected.shape != got.shape or not np.allclose(got.astype(np.float64), expected.astype(np.float64),
                                                          rtol=tol, atol=tol):
            err = np.abs(got.astype(np.float64) - expected).max() if expected.shape == got.shape else "shape"
            raise RewriteRejected(f"replacement disagrees with the original subgraph on random inputs (max err {err})")

    # --- applying ------------------------------------------------------------------------------
    def finish(self) -> onnx.ModelProto:
        model = self.view.model
        graph = model.graph
        if not self.pending:
            return copy_model(self.original)
        # the written model keeps the original's shape annotations: shape inference served the analysis, and its
        # guesses must not become the model's claims (onnxruntime's symbolic inference gets a broadcast Einsum
        # wrong, which onnx.checker then rejects). A graph output declared without a shape keeps the inferred one.
        del graph.value_info[:]
        graph.value_info.extend(self.original.graph.value_info)
        for i, declared in enumerate(self.original.graph.output):
            if declared.type.tensor_type.HasField("shape") or not declared.type.HasField("tensor_type"):
                graph.output[i].CopyFrom(declared)
        by_output = {site.output: nodes for site, nodes in self.pending}
        new_nodes = []
        for node in graph.node:
            taken = [o for o in node.output if o in by_output]
            if taken:  # the old P·V product: its output is now the new node's
                new_nodes.extend(by_output[taken[0]])
                continue
            new_nodes.append(node)
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(self.new_initializers.values())
        eliminate_dead_code(graph)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        present = {(f.domain, f.name) for f in model.functions}  # a model converted before keeps its own
        for op_type in sorted(self.op_types):
            if (DOMAIN, op_type) not in present:
                model.functions.append(attention_function(op_type, self.elem_type, self.view.opset))
        model.ir_version = max(model.ir_version, 9)
        return model


def nodes_op(nodes) -> str:
    return next(n.op_type for n in nodes if n.domain == DOMAIN)


def eliminate_dead_code(graph: onnx.GraphProto) -> None:
    """Drop nodes no graph output depends on, then initializers and value_info nobody reads."""
    from ..patterns.onnx_graph import _outer_reads
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    needed.update(_outer_reads(sub))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inputs = {i.name for i in graph.input}
    inits = [t for t in graph.initializer if t.name in needed or t.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    produced = {o for n in graph.node for o in n.output}
    infos = [vi for vi in graph.value_info if vi.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)
