"""The FX front end: find attention sites in a dynamo or pre-dispatch ATen graph.

One matcher, not a template per model: every op is read through `fx_ops.canonical` (so
matmul/@/bmm/einsum, transpose/permute/mT, mul/div, casts and views are each one thing) and
handed, as `FxGraph`, to the matcher the ONNX front end uses too (`matcher.match_softmax`).
SDPA calls become sites directly. Anything not understood makes the site skipped, with the reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .fx_canonicalize import expand_multihead_attention
from .fx_eval import ancestors, data_inputs, evaluate, generic_sizes, hint, is_symbolic, meta_value
from .fx_ops import canonical, real_users, scalar_value
from .masks import MAX_PROOF_ELEMENTS, Unprovable
from .matcher import (Op, Skip, additive_parts, apply_masks, fill_operands, flagged_causal, fused_scale,
                      match_softmax, same_size, shape_of)
from .record import AttentionSite, MaskTerm


def find_attention_sites(gm: fx.GraphModule, frame_path: str = "") -> list[AttentionSite]:
    """Every softmax-attention or SDPA site of the graph, in graph order; skipped ones carry a reason.
    Canonicalises the graph first (expands nn.MultiheadAttention calls), so it may change `gm`
    without changing what it computes. frame_path: see `layer_name`."""
    sites = [AttentionSite(layer=layer_name(node, frame_path), pattern=getattr(node.target, "__name__", str(node.target)),
                           skip_reason=reason) for node, reason in expand_multihead_attention(gm)]
    for node in list(gm.graph.nodes):
        op = canonical(node)
        if op is None or op.name not in ("softmax", "sdpa"):
            continue
        site = AttentionSite(layer=layer_name(node, frame_path), pattern=op.name)
        try:
            if op.name == "softmax":
                _match_softmax(node, op, site)
            else:
                _match_sdpa(node, op, site)
        except Skip as reason:
            site.skip_reason = str(reason)
        sites.append(site)
    return sites


# --- layer names ---------------------------------------------------------------------------

def layer_name(node: fx.Node, frame_path: str = "") -> str:
    """Innermost module path from the node's module stack, as a dotted path (model.layers.7.self_attn).
    Dynamo's paths start at the compiled frame's `self` (L['self']); frame_path is that module's own path
    in the model, when the frame is an inner module's forward (compiled on its own after a graph break)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return frame_path or "<root>"
    raw = list(stack.values())[-1][0]
    path = re.sub(r"^L\[['\"][^'\"]*['\"]\](\[\d+\])*\.?", "", raw)   # dynamo: L['self'] / L['args'][0]
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
    if frame_path and re.match(r"^L\[['\"]self['\"]\]", raw):
        path = f"{frame_path}.{path}" if path else frame_path
    return path or "<root>"


# --- the graph as the matcher reads it ----------------------------------------------------

@dataclass(frozen=True)
class _BaddbmmPart:
    """A value inside baddbmm(input, b1, b2, beta, alpha) = beta·input + alpha·(b1 @ b2), which FX keeps as one
    node: its "product" b1 @ b2 or its "scaled" product alpha·(b1 @ b2). Bloom adds its ALiBi bias this way."""
    node: fx.Node
    part: str


def _read_baddbmm(node: fx.Node, c) -> Op:
    """baddbmm as an add of the input (beta = 1) to the scaled product, or the scaled product alone (beta = 0:
    the input is not read, not even its NaNs). Another beta would scale the mask: left as an op not understood."""
    beta, alpha = scalar_value(c["beta"]), scalar_value(c["alpha"])
    if beta not in (0.0, 1.0) or alpha is None:
        return Op("baddbmm", tuple(c.args), {}, node=node)
    scores = _BaddbmmPart(node, "product" if alpha == 1.0 else "scaled")
    return GRAPH.op(scores) if beta == 0.0 else Op("add", (scores, c.args[0]), {}, node=node)


class FxGraph:
    """An FX graph as `matcher.AttentionGraph`: values are nodes (or the literals in their arguments, or the
    parts of a baddbmm)."""
    rewrites_dropout = True  # the op replays dropout (training graphs)

    def op(self, x) -> Optional[Op]:
        if isinstance(x, _BaddbmmPart):
            c = canonical(x.node)
            if x.part == "product":
                return Op("matmul", c.args[1:], {}, node=x.node)
            return Op("scale", (_BaddbmmPart(x.node, "product"),),
                      {"factor": scalar_value(c["alpha"]), "divide": False, "ref": None}, node=x.node)
        c = canonical(x)
        if c is None:
            return None
        if c.name == "baddbmm":
            return _read_baddbmm(x, c)
        name, attrs = c.name, dict(c.kw)
        if name == "scale":
            factor = scalar_value(c["factor"])
            attrs.update(factor=factor, ref=None if factor is not None else c["factor"])
        elif name == "dropout":
            attrs.update(p=scalar_value(c["p"]), training=c["training"] if isinstance(c["training"], bool) else None)
        elif name == "unsqueeze":
            attrs["axes"] = [c["dim"]]
        elif name in ("transpose", "permute"):
            name, attrs = "transpose", {"perm": _perm(c, self.shape(c.args[0]))}
        elif name == "cast" and not (self.is_float_tensor(c.args[0]) and self.is_float_tensor(x)):
            name = "cast_other"  # a cast to or from a non-float type changes the values
        return Op(name, tuple(c.args), attrs, node=x)

    def users(self, x) -> list:
        if isinstance(x, _BaddbmmPart):
            return [x.node]  # read once, by the rest of its baddbmm
        return real_users(x) if isinstance(x, fx.Node) else []

    def describe(self, x) -> str:
        if isinstance(x, _BaddbmmPart):
            return f"the {x.part} of {x.node.name}"
        return x.name if isinstance(x, fx.Node) else repr(x)

    def describe_op(self, x) -> str:
        if isinstance(x, _BaddbmmPart):
            return self.describe(x)
        if not isinstance(x, fx.Node):
            return repr(x)
        c = canonical(x)
        return f"{c.name if c is not None else x.target} ({x.name})"

    def shape(self, x) -> Optional[tuple]:
        if isinstance(x, _BaddbmmPart):
            x = x.node  # every part has the result's shape
        val = meta_value(x) if isinstance(x, fx.Node) else None
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    def scalar(self, x) -> Optional[float]:
        return scalar_value(x)

    def is_float_tensor(self, x) -> bool:
        if isinstance(x, _BaddbmmPart):
            x = x.node
        val = meta_value(x) if isinstance(x, fx.Node) else None
        return isinstance(val, torch.Tensor) and val.is_floating_point()

    def equal_when_it_runs(self, a, b) -> bool:
        """Sizes the attention's own ops require to be equal (k/v length, batch): the same, or two
        symbols equal at trace time, e.g. a KV cache's key and value lengths. The original ops fail
        when they differ (dynamo specialises sizes 0 and 1, so two symbols cannot broadcast), and so
        does our op (check_qkv): an error either way, never a different result. Not for is_causal's
        q_len == k_len, where a mismatch would silently change the alignment."""
        return same_size(a, b) or ((is_symbolic(a) or is_symbolic(b)) and hint(a) == hint(b))

    def expanded_shape(self, expand: Op, x, src_shape: tuple) -> Optional[tuple]:
        return self.shape(x)

    def nan_guard(self, x) -> None:
        return None

    def data_dependencies(self, x: fx.Node) -> list[str]:
        return [d.name for d in data_inputs(x)]

    def is_constant(self, x: fx.Node) -> bool:
        return False  # a buffer or parameter is data (data_dependencies): a constant mask is built by ops

    def size_choices(self, x: fx.Node) -> list:
        return [hint]  # as traced

    def proof_sizes(self, x: fx.Node, q_len, k_len) -> list:
        """The traced lengths and, for a dynamic graph (one construction for every length) or one too long to
        evaluate, the same construction at small lengths (fx_eval.generic_sizes)."""
        if not (is_symbolic(q_len) or is_symbolic(k_len) or hint(q_len) * hint(k_len) > MAX_PROOF_ELEMENTS):
            return [hint]
        small = generic_sizes((q_len, k_len), ancestors(x), tuple(meta_value(x).shape)[:-2])
        if small is None:
            raise Unprovable("mask lengths equal another of its dims: cannot be checked at small lengths")
        return [hint, small]

    def size(self, dim, sizes) -> int:
        return int(sizes(dim))

    def evaluate(self, x: fx.Node, sizes):
        (value,) = evaluate([x], {}, sizes)
        if not isinstance(value, torch.Tensor):
            return None
        value = value.detach().cpu()  # built on the model's device; compared on the CPU
        return value.double().numpy() if value.is_floating_point() else value.numpy()


def _perm(c, shape: Optional[tuple]) -> Optional[list]:
    """transpose(d0, d1) and permute(dims) as one permutation."""
    if c.name == "permute":
        return list(c["dims"])
    d0, d1 = c["dims"]
    if shape is None or not isinstance(d0, int) or not isinstance(d1, int):
        return None
    perm = list(range(len(shape)))
    perm[d0 % len(shape)], perm[d1 % len(shape)] = perm[d1 % len(shape)], perm[d0 % len(shape)]
    return perm


GRAPH = FxGraph()


def _match_softmax(softmax: fx.Node, op, site: AttentionSite) -> None:
    match_softmax(GRAPH, softmax, site)


# --- SDPA sites ----------------------------------------------------------------------------

def _match_sdpa(node: fx.Node, op, site: AttentionSite) -> None:
    q, k, v = op.args
    rank = len(shape_of(GRAPH, q))
    if rank != 4:
        raise Skip(f"SDPA on rank-{rank} inputs; only 4-D is rewritten")
    if not isinstance(op["is_causal"], bool) or scalar_value(op["dropout_p"]) is None:
        raise Skip("SDPA with a runtime is_causal or dropout_p")
    site.pattern = "sdpa" + (" (is_causal)" if op["is_causal"] else "") + (" (gqa)" if op["enable_gqa"] else "")
    fill_operands(GRAPH, site, q, k, v, 4, False, native_gqa=True)
    scale = op["scale"]
    if scale is not None and scalar_value(scale) is None:
        site.scale, site.scale_ref = 1.0, scale
    else:
        fused_scale(site, scalar_value(scale), "SDPA")
    site.dropout_p = float(op["dropout_p"])
    site.output = node
    site.replaced = [node]
    if op["is_causal"]:
        flagged_causal(site, "is_causal", True, "SDPA")
    mask = op["attn_mask"]
    if mask is not None and not isinstance(mask, fx.Node):
        raise Skip("SDPA attn_mask is not a tensor")
    terms = [] if mask is None else [MaskTerm(mask, "boolean", masked_when=False)] \
        if meta_value(mask).dtype == torch.bool else additive_parts(GRAPH, mask)
    apply_masks(GRAPH, site, terms, shape_of(GRAPH, site.q)[:3] + shape_of(GRAPH, site.k)[2:3])
