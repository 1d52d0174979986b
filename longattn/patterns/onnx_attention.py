"""The ONNX front end: find attention sites in an ONNX graph, as the FX front end does in FX.

Each Softmax goes to the matcher the FX front end uses too (`matcher.match_softmax`), over the
graph as `OnnxGraph` (nodes read through `onnx_ops.canonical`, so the TorchScript and dynamo
exporters' spellings are one thing); fused nodes (ONNX
`Attention`, com.microsoft `MultiHeadAttention`) become sites directly, and the fused forms we do
not rewrite (com.microsoft `Attention`, `GroupQueryAttention`, ...) are reported skipped with the
reason. Value references in the `AttentionSite` are tensor names; `replaced` holds node names.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from .masks import Unprovable
from .matcher import (OUTPUT, Op, Skip, additive_parts, apply_masks, fill_operands, flagged_causal, fused_scale,
                      match_softmax, same_size, shape_of)
from .onnx_graph import GraphView, NotStatic, attributes, layer_name, resolve, size_choices
from .onnx_ops import FLOAT_TYPES, canonical
from .record import AttentionSite, MaskTerm

# Integer-valued constants at least this large are sentinels (a Slice's "to the end"), not lengths or windows;
# below it, one above MAX_PROOF_SIDE cannot be exceeded by the sizes a proof evaluates at.
SENTINEL = 1 << 31
MAX_PROOF_SIDE = 1 << 12
MS = "com.microsoft"
UNSUPPORTED_FUSED = {
    "Attention": "com.microsoft Attention packs the Q/K/V projections into the op; not rewritten",
    "GroupQueryAttention": "com.microsoft GroupQueryAttention carries a KV cache (seqlens_k, "
                           "total_sequence_length) and rotary embedding inside the op; not rewritten",
    "PackedMultiHeadAttention": "packed (token_offset) attention is not rewritten",
    "PackedAttention": "packed (token_offset) attention is not rewritten",
    "SparseAttention": "block-sparse attention is already approximate; not rewritten",
    "PagedAttention": "paged KV-cache attention is not rewritten",
    "DecoderMaskedMultiHeadAttention": "decoding attention with a KV cache is not rewritten",
}


def find_attention_sites(view: GraphView) -> list[AttentionSite]:
    """Every softmax-attention or fused attention site of the graph, in graph order; skipped ones
    carry a reason. Run shape inference first (`longattn.onnx` does) so shapes are known."""
    sites = []
    for node in view.graph.node:
        site = None
        try:
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                site = AttentionSite(layer=layer_name(node), pattern="softmax")
                _match_softmax(view, node, site)
            elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                site = AttentionSite(layer=layer_name(node), pattern="Attention")
                _match_onnx_attention(view, node, site)
            elif node.domain == MS and node.op_type == "MultiHeadAttention":
                site = AttentionSite(layer=layer_name(node), pattern="com.microsoft.MultiHeadAttention")
                _match_ms_mha(view, node, site)
            elif node.domain == MS and node.op_type in UNSUPPORTED_FUSED:
                site = AttentionSite(layer=layer_name(node), pattern=f"com.microsoft.{node.op_type}",
                                     skip_reason=UNSUPPORTED_FUSED[node.op_type])
        except Skip as reason:
            site.skip_reason = str(reason)
        if site is not None:
            sites.append(site)
    return sites


# --- the graph as the matcher reads it ----------------------------------------------------

class OnnxGraph:
    """An ONNX graph as `matcher.AttentionGraph`: values are tensor names, ops are named by their nodes."""
    rewrites_dropout = False  # a converted model is an inference graph

    def __init__(self, view: GraphView):
        self.view = view

    def op(self, name: str) -> Optional[Op]:
        c = canonical(self.view, name)
        if c is None:
            return None
        attrs = dict(c.attrs, dim=c["axis"]) if c.name == "softmax" else c.attrs
        return Op(c.name, tuple(c.args), attrs, node=c.node.name)

    def users(self, name: str) -> list:
        return [OUTPUT if u == "<output>" else u.output[0] for u in self.view.users(name)]

    def describe(self, name: str) -> str:
        return name

    def describe_op(self, name: str) -> str:
        node = self.view.op(name)
        return f"{node.op_type} ({node.name})" if node is not None else name

    def shape(self, name: str) -> Optional[tuple]:
        return self.view.shape(name)

    def scalar(self, name: str) -> Optional[float]:
        return self.view.scalar(name)

    def is_float_tensor(self, name: str) -> bool:
        return self.view.elem_type(name) in FLOAT_TYPES and self.view.scalar(name) is None

    def equal_when_it_runs(self, a, b) -> bool:
        return same_size(a, b)

    def expanded_shape(self, expand: Op, name: str, src_shape: tuple) -> Optional[tuple]:
        """Where shape inference lost an Expand's shape (its target built with Where/ConstantOfShape), the
        target evaluated, accepted only if axis 2 alone grows."""
        shape = self.view.shape(name)
        if shape is None or len(shape) != 5 or (isinstance(shape[2], int) and None not in shape):
            return shape
        try:
            sizes = size_choices(self.view)[0]
            (target,) = self.view.evaluate([expand.args[1]], sizes)
            src_sizes = tuple(resolve(d, sizes) for d in src_shape)
        except NotStatic:
            return None
        target = [int(x) for x in target]
        if len(target) != 5 or None in src_sizes \
                or any(t not in (1, s) for t, s in zip(target[:2] + target[3:], src_sizes)):
            return None
        return src_shape[:2] + (target[2],) + src_shape[2:]

    def nan_guard(self, name: str) -> Optional[tuple[list, str]]:
        """where(isnan(p), 0, p) as p's only users (the dynamo exporter's SDPA decomposition; rows with no
        key give 0, as our kernels do): its node names and the guarded value."""
        users = self.view.users(name)
        if len(users) != 2 or "<output>" in users:
            return None
        isnan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next((u for u in users if u.op_type == "Where"), None)
        if isnan is None or where is None or list(where.input[:1]) != [isnan.output[0]] \
                or where.input[2] != name or self.view.scalar(where.input[1]) != 0.0 \
                or len(self.view.users(isnan.output[0])) != 1:
            return None
        return [isnan.name, where.name], where.output[0]

    def data_dependencies(self, name: str) -> list[str]:
        return self.view.data_dependencies(name)

    def is_constant(self, name: str) -> bool:
        return self.view.op(name) is None or self.view.constant(name) is not None

    def size_choices(self, name: str) -> list[dict]:
        """size_choices above every integer constant of `name`'s construction (masks.Unprovable if too large)."""
        largest = self._largest_integer_constant(name)
        if largest > MAX_PROOF_SIDE:
            raise Unprovable(f"mask built with the constant {largest}: too large to evaluate beyond at rewrite time")
        return size_choices(self.view, above=largest)

    def _largest_integer_constant(self, name: str) -> int:
        """The largest |integer value| among the constants `name` is computed from (sentinels left out)."""
        nodes, _ = self.view.ancestors([name])
        largest = 0
        for node in nodes:
            for value in map(self.view.constant, list(node.input) + list(node.output)):
                if value is None or value.size > 4096 or not np.issubdtype(value.dtype, np.number):
                    continue
                v = np.abs(value.astype(np.float64, copy=False).ravel())
                v = v[np.isfinite(v) & (v == np.round(v)) & (v < SENTINEL)]
                if v.size:
                    largest = max(largest, int(v.max()))
        return largest

    def proof_sizes(self, name: str, q_len, k_len) -> list[dict]:
        # static lengths: one size to check (the others only substitute other symbolic dims)
        choices = self.size_choices(name)
        return choices if any(isinstance(d, str) for d in (q_len, k_len)) else choices[:1]

    def size(self, dim, sizes: dict) -> Optional[int]:
        return resolve(dim, sizes)

    def evaluate(self, name: str, sizes: dict):
        (value,) = self.view.evaluate([name], sizes)
        return value


def _match_softmax(view: GraphView, softmax: onnx.NodeProto, site: AttentionSite) -> None:
    match_softmax(OnnxGraph(view), softmax.output[0], site)


# --- fused sites ---------------------------------------------------------------------------

def _used_outputs(view: GraphView, node: onnx.NodeProto) -> list[int]:
    return [i for i, o in enumerate(node.output) if o and view.users(o)]


def _mask_terms(g: OnnxGraph, mask: str) -> list[MaskTerm]:
    if g.view.elem_type(mask) == onnx.TensorProto.BOOL:
        return [MaskTerm(mask, "boolean", masked_when=False)]
    return additive_parts(g, mask)


def _match_onnx_attention(view: GraphView, node: onnx.NodeProto, site: AttentionSite) -> None:
    """ONNX Attention (opset 23): Q (B, Hq, Sq, D), K/V (B, Hkv, Sk, D), attn_mask bool (True =
    attend) or additive, is_causal aligned top-left."""
    ins = list(node.input) + [""] * (7 - len(node.input))
    a = attributes(node)
    if any(ins[4:]):
        raise Skip("Attention with past_key/past_value or nonpad_kv_seqlen (KV cache) is not rewritten")
    if _used_outputs(view, node) != [0]:
        raise Skip("Attention's present_key/value or qk_matmul_output are used")
    if a.get("softcap", 0.0):
        raise Skip(f"Attention with softcap={a['softcap']} (logit soft-capping) is not rewritten")
    q, k, v = ins[:3]
    rank = view.rank(q)
    if rank != 4:
        raise Skip("3-D Attention inputs (B, S, H·D) are not rewritten; 4-D (B, H, S, D) are")
    site.pattern = "Attention" + (" (is_causal)" if a.get("is_causal") else "")
    g = OnnxGraph(view)
    fill_operands(g, site, q, k, v, 4, False, native_gqa=True)
    fused_scale(site, float(a["scale"]) if "scale" in a else None, "Attention")
    site.output = node.output[0]
    site.replaced = [node.name]
    if a.get("is_causal"):
        flagged_causal(site, "is_causal", 1, "Attention")
    terms = _mask_terms(g, ins[3]) if ins[3] else []
    apply_masks(g, site, terms, shape_of(g, site.q)[:3] + shape_of(g, site.k)[2:3])


def _match_ms_mha(view: GraphView, node: onnx.NodeProto, site: AttentionSite) -> None:
    """com.microsoft MultiHeadAttention with separate 3-D query/key/value (B, S, H·D) and at most
    an attention_bias; the rewriter adds the head split and merge around our node."""
    ins = list(node.input) + [""] * (10 - len(node.input))
    a = attributes(node)
    if ins[3]:
        raise Skip("MultiHeadAttention with a packed bias input is not rewritten")
    if ins[4]:
        raise Skip("MultiHeadAttention with key_padding_mask is not rewritten")
    if any(ins[6:]):
        raise Skip("MultiHeadAttention with past key/value (KV cache) is not rewritten")
    if _used_outputs(view, node) != [0]:
        raise Skip("MultiHeadAttention's present key/value outputs are used")
    q, k, v = ins[:3]
    if not k or not v or any(view.rank(x) != 3 for x in (q, k, v)):
        raise Skip("packed or 4-D query/key/value layouts of MultiHeadAttention are not rewritten")
    heads = a.get("num_heads")
    g = OnnxGraph(view)
    qs, ks, vs = shape_of(g, q), shape_of(g, k), shape_of(g, v)
    if not all(isinstance(x, int) for x in (qs[2], ks[2], vs[2])) or qs[2] % heads or vs[2] % heads:
        raise Skip("MultiHeadAttention hidden sizes must be static multiples of num_heads")
    d = qs[2] // heads
    site.q, site.k, site.v = q, k, v
    site.layout = "bshd"
    site.num_heads = site.num_kv_heads = heads
    site.head_dim = d
    site.q_len, site.k_len = qs[1], ks[1]
    fused_scale(site, float(a["scale"]) if a.get("scale") else None, "MultiHeadAttention")
    site.output = node.output[0]
    site.replaced = [node.name]
    if a.get("unidirectional"):
        flagged_causal(site, "unidirectional", 1, "MultiHeadAttention")
    terms = additive_parts(g, ins[5]) if ins[5] else []
    apply_masks(g, site, terms, (qs[0], heads, qs[1], ks[1]))
