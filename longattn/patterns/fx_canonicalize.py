"""Canonicalisation before matching: expand opaque attention calls into the ops they compute.

Dynamo keeps `F.multi_head_attention_forward` (nn.MultiheadAttention, nn.Transformer*) as one
call. We expand each supported call into its input projections, one SDPA call and the output
projection, exactly as PyTorch computes them, so the ordinary SDPA matcher (and its causal
proof, which does not trust the `is_causal` hint) sees it. Calls we cannot expand exactly are
reported with the reason. New nodes get fake-tensor metadata so later passes can read shapes.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_eval import meta_value

_MHA_PARAMS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
               "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
               "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
               "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
             "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
             "is_causal": False}
NATIVE_FASTPATH = (torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd)


def _bound(node: fx.Node) -> dict:
    args = dict(_DEFAULTS)
    args.update(zip(_MHA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _why_not_expandable(a: dict, node: fx.Node) -> Optional[str]:
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return "nn.MultiheadAttention with add_bias_kv / add_zero_attn"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "nn.MultiheadAttention with static_k / static_v"
    weights_used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    if a["need_weights"] and weights_used:
        return "attention weights are returned and used (need_weights=True)"
    if len(meta_value(a["query"]).shape) != 3:
        return "unbatched nn.MultiheadAttention input"
    if not isinstance(a["dropout_p"], (int, float)) or not isinstance(a["training"], bool):
        return "runtime dropout or training flag"
    return None


class _Emitter:
    """Appends call_function nodes before `anchor`, computing fake values for their metadata."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        vals = fx.node.map_arg((args, kwargs), meta_value)
        with self.fake_mode:
            node.meta["example_value"] = target(*vals[0], **vals[1])
        node.meta["nn_module_stack"] = self.anchor.meta.get("nn_module_stack", {})
        return node


def _fake_mode(node: fx.Node):
    val = meta_value(node)
    return getattr(val, "fake_mode", None)


def expand_multihead_attention(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Expand every supported F.multi_head_attention_forward call in place.
    Returns (node, reason) for each call left as it was, native fast-path calls included."""
    left = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in NATIVE_FASTPATH:
            left.append((node, "PyTorch's native fused fast path (eval + no_grad); disable it with "
                               "torch.backends.mha.set_fastpath_enabled(False) to let longattn rewrite it"))
            continue
        if node.target is not F.multi_head_attention_forward:
            continue
        a = _bound(node)
        reason = _why_not_expandable(a, node)
        fake_mode = _fake_mode(a["query"])
        if reason is None and fake_mode is None:
            reason = "no fake-tensor metadata to expand with"
        if reason:
            left.append((node, reason))
            continue
        _expand(gm.graph, node, a, _Emitter(gm.graph, node, fake_mode))
    return left


def _expand(graph: fx.Graph, node: fx.Node, a: dict, emit: _Emitter) -> None:
    query, key, value = a["query"], a["key"], a["value"]
    tgt_len, batch, embed = meta_value(query).shape
    src_len = meta_value(key).shape[0]
    heads = a["num_heads"]
    head_dim = embed // heads
    if a["use_separate_proj_weight"]:
        wq, wk, wv = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    else:
        wq, wk, wv = (emit(torch.Tensor.__getitem__, a["in_proj_weight"], slice(i * embed, (i + 1) * embed))
                      for i in range(3))
    bq = bk = bv = None
    if a["in_proj_bias"] is not None:
        bq, bk, bv = (emit(torch.Tensor.__getitem__, a["in_proj_bias"], slice(i * embed, (i + 1) * embed))
                      for i in range(3))

    def heads_first(x, w, b, length):  # (L, N, E) -> (N, H, L, D)
        y = emit(F.linear, x, w, b)
        y = emit(torch.reshape, y, (length, batch, heads, head_dim))
        return emit(torch.permute, y, (1, 2, 0, 3))

    q = heads_first(query, wq, bq, tgt_len)
    k = heads_first(key, wk, bk, src_len)
    v = heads_first(value, wv, bv, src_len)

    # F.multi_head_attention_forward turns bool masks into -inf (True = not allowed) and adds the
    # key padding mask; it trusts `is_causal` only as a hint, and so do we not at all: the mask
    # goes to SDPA, where the causal proof decides.
    mask = None
    if a["attn_mask"] is not None:
        m = a["attn_mask"]
        if meta_value(m).dtype == torch.bool:
            m = emit(torch.where, m, -math.inf, 0.0)
        if len(meta_value(m).shape) == 3:
            m = emit(torch.reshape, m, (batch, heads, tgt_len, src_len))
        mask = m
    if a["key_padding_mask"] is not None:
        p = a["key_padding_mask"]
        if meta_value(p).dtype == torch.bool:
            p = emit(torch.where, p, -math.inf, 0.0)
        p = emit(torch.reshape, p, (batch, 1, 1, src_len))
        mask = p if mask is None else emit(torch.add, mask, p)
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    out = emit(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = emit(torch.permute, out, (2, 0, 1, 3))
    out = emit(torch.reshape, out, (tgt_len, batch, embed))
    out = emit(F.linear, out, a["out_proj_weight"], a["out_proj_bias"])
    for user in list(node.users):
        if user.target is operator.getitem and user.args[1] == 0:
            user.replace_all_uses_with(out)
            graph.erase_node(user)
        elif user.target is operator.getitem and not user.users:
            graph.erase_node(user)
    if not node.users:
        graph.erase_node(node)
