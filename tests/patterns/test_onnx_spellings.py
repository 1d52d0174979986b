"""Hand-built ONNX graphs: the spellings the matcher must read, and their look-alikes it must
skip with a reason (never a wrong rewrite). Each rewritten case is checked in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import longattn.onnx as lo
from tests.patterns.test_onnx_zoo import ALL_FLASH

B, H, S, D = 1, 2, 6, 4
F = TensorProto.FLOAT


def const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def model(nodes, inputs, inits=(), opset=17, output="out", extra_outputs=(), domains=()):
    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(output, F, None)] + \
        [helper.make_tensor_value_info(o, F, None) for o in extra_outputs]
    g = helper.make_graph(nodes, "g", ins, outs, list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops, ir_version=9)


QKV = [("q", F, [B, H, S, D]), ("k", F, [B, H, S, D]), ("v", F, [B, H, S, D])]


def attention(score_nodes, scores="scores", probs_nodes=None, inputs=QKV, inits=(), **kw):
    """q·kᵀ (k transposed by a Transpose) -> score_nodes -> Softmax -> ·v."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"])] + score_nodes + \
        [helper.make_node("Softmax", [scores], ["p"], axis=-1)] + \
        (probs_nodes or [helper.make_node("MatMul", ["p", "v"], ["out"])])
    return model(nodes, inputs, [const("c_scale", D ** -0.5)] + list(inits), **kw)


SCALE = [helper.make_node("Mul", ["qk", "c_scale"], ["scores"])]


def convert_and_compare(m, feeds=None):
    converted, report = lo.convert(m, policy=ALL_FLASH)
    if report.count("rewritten"):
        onnx.checker.check_model(converted, full_check=True)
        rng = np.random.default_rng(1)
        feeds = feeds or {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
                          for i in m.graph.input}
        a = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        b = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return converted, report


def only_site(report):
    (site,) = report.sites
    return site


def test_plain_scaled_attention_is_rewritten():
    _, report = convert_and_compare(attention(SCALE))
    site = only_site(report)
    assert site.status == "rewritten" and site.scale == pytest.approx(D ** -0.5) and site.mask == "none"


def test_division_by_sqrt_d_reads_as_the_scale():
    m = attention([helper.make_node("Div", ["qk", "c_sqrt"], ["scores"])], inits=[const("c_sqrt", D ** 0.5)])
    _, report = convert_and_compare(m)
    assert only_site(report).scale == pytest.approx(D ** -0.5)


def test_causal_mask_from_range_is_proven_causal():
    # keep = cols <= rows, built from Shape(q) with Range: sizes alone
    nodes = [helper.make_node("Shape", ["q"], ["sh"]), helper.make_node("Gather", ["sh", "i2"], ["n"], axis=0),
             helper.make_node("Range", ["zero", "n", "one"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax1"], ["rows"]), helper.make_node("Unsqueeze", ["r", "ax0"], ["cols"]),
             helper.make_node("LessOrEqual", ["cols", "rows"], ["keep"]),
             helper.make_node("Mul", ["qk", "c_scale"], ["s1"]),
             helper.make_node("Where", ["keep", "s1", "ninf"], ["scores"])]
    inits = [const("i2", 2, np.int64), const("zero", 0, np.int64), const("one", 1, np.int64),
             const("ax0", [0], np.int64), const("ax1", [1], np.int64), const("ninf", -np.inf)]
    converted, report = convert_and_compare(attention(nodes, inits=inits))
    site = only_site(report)
    assert site.status == "rewritten" and site.mask == "causal", site
    assert "causal pattern" in site.causal_proof
    assert not any(n.op_type == "LessOrEqual" for n in converted.graph.node)  # the S×S mask is gone


def test_causal_looking_mask_from_an_input_is_kept_as_a_mask():
    inputs = QKV + [("keep", TensorProto.BOOL, [S, S])]
    nodes = SCALE[:1] + [helper.make_node("Where", ["keep", "scores", "ninf"], ["masked"])]
    nodes[0] = helper.make_node("Mul", ["qk", "c_scale"], ["scores"])
    m = attention(nodes, scores="masked", inputs=inputs, inits=[const("ninf", -np.inf)])
    feeds = {n: np.random.default_rng(0).standard_normal((B, H, S, D)).astype(np.float32) for n in "qkv"}
    feeds["keep"] = np.tril(np.ones((S, S), bool))
    _, report = convert_and_compare(m, feeds)
    site = only_site(report)
    assert site.status == "rewritten" and site.mask == "boolean"
    assert site.causal_proof == "not causal: mask depends on the values of keep"


def test_constant_mask_that_is_not_causal_stays_a_mask():
    keep = np.triu(np.ones((S, S), bool))  # upper, not lower
    nodes = [helper.make_node("Mul", ["qk", "c_scale"], ["s1"]), helper.make_node("Where", ["keep", "s1", "ninf"], ["scores"])]
    _, report = convert_and_compare(attention(nodes, inits=[const("keep", keep, bool), const("ninf", -np.inf)]))
    site = only_site(report)
    assert site.mask == "boolean" and "not the causal pattern" in site.causal_proof


def test_gqa_repeat_is_peeled():
    inputs = [("q", F, [B, 4, S, D]), ("k", F, [B, 2, S, D]), ("v", F, [B, 2, S, D])]
    nodes = []
    for x in ("k", "v"):
        nodes += [helper.make_node("Unsqueeze", [x, "ax2"], [f"{x}5"]),
                  helper.make_node("Expand", [f"{x}5", "shape5"], [f"{x}e"]),
                  helper.make_node("Reshape", [f"{x}e", "shape4"], [f"{x}r"])]
    nodes += [helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "c_scale"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vr"], ["out"])]
    inits = [const("c_scale", D ** -0.5), const("ax2", [2], np.int64), const("shape5", [B, 2, 2, S, D], np.int64),
             const("shape4", [B, 4, S, D], np.int64)]
    _, report = convert_and_compare(model(nodes, inputs, inits))
    site = only_site(report)
    assert site.status == "rewritten" and (site.heads, site.kv_heads) == (4, 2)


@pytest.mark.parametrize("case,reason", [
    ("softcap", "not understood"),
    ("fill", "fill value"),
    ("axis", "not the key dimension"),
    ("probs_used_twice", "other users"),
])
def test_look_alikes_are_skipped_with_a_reason(case, reason):
    extra = ()
    probs_nodes = None
    scores = "scores"
    inits = []
    if case == "softcap":  # tanh soft-capping between the product and the softmax
        nodes = SCALE + [helper.make_node("Tanh", ["scores"], ["capped"])]
        scores = "capped"
    elif case == "fill":  # -1e4 changes fully masked rows: not exact as a mask
        nodes = SCALE + [helper.make_node("Where", ["keep", "scores", "fill"], ["masked"])]
        scores = "masked"
        inits = [const("keep", np.tril(np.ones((S, S), bool)), bool), const("fill", -1e4)]
    elif case == "axis":
        m = attention(SCALE)
        next(n for n in m.graph.node if n.op_type == "Softmax").attribute[0].i = 2
        _, report = lo.convert(m, policy=ALL_FLASH)
        site = only_site(report)
        assert site.status == "skipped" and reason in site.reason
        return
    else:  # output_attentions: the probabilities are an output too
        nodes = SCALE
        probs_nodes = [helper.make_node("MatMul", ["p", "v"], ["out"]), helper.make_node("Identity", ["p"], ["probs"])]
        extra = ("probs",)
    m = attention(nodes, scores=scores, probs_nodes=probs_nodes, inits=inits, extra_outputs=extra)
    converted, report = lo.convert(m, policy=ALL_FLASH)
    site = only_site(report)
    assert site.status == "skipped" and reason in site.reason, site
    assert converted.graph.node[-1].op_type in ("MatMul", "Identity")  # untouched
    assert not any(n.domain == "ai.longattn" for n in converted.graph.node)


def test_microsoft_multihead_attention_is_rewritten():
    hidden = H * D
    inputs = [(x, F, [B, S, hidden]) for x in ("q", "k", "v")]
    nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=H,
                              unidirectional=1)]
    m = model(nodes, inputs, domains=["com.microsoft"])
    converted, report = convert_and_compare(m)
    site = only_site(report)
    assert site.status == "rewritten" and site.mask == "causal" and site.heads == H


@pytest.mark.parametrize("op", ["Attention", "GroupQueryAttention"])
def test_fused_microsoft_ops_we_do_not_rewrite_are_reported(op):
    ins = ["x", "w"] if op == "Attention" else ["x", "x", "x"]
    nodes = [helper.make_node(op, ins, ["out"], domain="com.microsoft", num_heads=H)]
    m = model(nodes, [("x", F, [B, S, H * D]), ("w", F, [H * D, 3 * H * D])], domains=["com.microsoft"])
    _, report = lo.convert(m, policy=ALL_FLASH)
    site = only_site(report)
    assert site.status == "skipped" and "not rewritten" in site.reason


def test_onnx_attention_op_with_native_gqa():
    inputs = [("q", F, [B, 4, S, D]), ("k", F, [B, 2, S, D]), ("v", F, [B, 2, S, D])]
    m = model([helper.make_node("Attention", ["q", "k", "v"], ["out"], is_causal=1)], inputs, opset=23)
    converted, report = convert_and_compare(m)
    site = only_site(report)
    assert site.status == "rewritten" and site.mask == "causal" and (site.heads, site.kv_heads) == (4, 2)


def einsum_attention(qk_eq, pv_eq, k_name="k"):
    nodes = [helper.make_node("Einsum", ["q", k_name], ["qk"], equation=qk_eq),
             helper.make_node("Mul", ["qk", "c_scale"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("Einsum", ["p", "v"], ["out"], equation=pv_eq)]
    return nodes


@pytest.mark.parametrize("qk_eq,pv_eq", [
    ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
    ("...qd,...kd->...qk", "...qk,...kd->...qd"),
    ("bhqd,bhdk->bhqk", "bhqk,bhkd->bhqd"),   # k given transposed
])
def test_einsum_products_are_read_like_matmuls(qk_eq, pv_eq):
    transposed = qk_eq.split("->")[0].endswith("dk")
    nodes = ([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])] if transposed else []) + \
        einsum_attention(qk_eq, pv_eq, "kt" if transposed else "k")
    converted, report = convert_and_compare(model(nodes, QKV, [const("c_scale", D ** -0.5)]))
    site = only_site(report)
    assert site.status == "rewritten" and site.scale == pytest.approx(D ** -0.5), site
    assert not any(n.op_type == "Einsum" for n in converted.graph.node)


def test_einsum_over_one_broadcast_key_head_is_read():
    """Found by the corpus: onnxruntime's symbolic shape inference gave 'bhqd,bhkd->bhqk' with one key head the
    key's head count (a later operand's broadcast 1 won), so the site looked like queries broadcast against keys.
    Our copy of it broadcasts the letters."""
    kv = [("k", F, [B, 1, S, D]), ("v", F, [B, 1, S, D])]
    m = model(einsum_attention("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"), QKV[:1] + kv, [const("c_scale", D ** -0.5)])
    converted, report = convert_and_compare(m)
    site = only_site(report)
    assert site.status == "rewritten" and (site.heads, site.kv_heads) == (H, 1), site


@pytest.mark.parametrize("qk_eq,pv_eq,reason", [
    ("bhqd,bhkd->bhkq", "bhkq,bhkd->bhqd", "not a"),         # scores laid out keys-first: softmax over queries
    ("bhqd,bhqd->bhqd", "bhqd,bhqd->bhqd", "not a"),         # elementwise, no contraction
    ("bhqd,bhkd->bhqk", "bhqk,bhqd->bhkd", "not a"),         # P contracted over queries
])
def test_einsum_look_alikes_are_skipped_with_a_reason(qk_eq, pv_eq, reason):
    m = model(einsum_attention(qk_eq, pv_eq), QKV, [const("c_scale", D ** -0.5)])
    converted, report = lo.convert(m, policy=ALL_FLASH)
    assert not any(n.domain == "ai.longattn" for n in converted.graph.node)
    for site in report.sites:
        assert site.status == "skipped" and reason in site.reason, site
