"""A converted model is a valid model: what `convert` writes passes onnx.checker's full check wherever the
input did, whether or not a site was rewritten (found by the ONNX corpus: shape-inference guesses leaked into
the output)."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

import longattn.onnx as lo
from tests.patterns.test_onnx_zoo import ALL_FLASH


def _einsum_broadcast_heads(softmax_axis: int) -> onnx.ModelProto:
    """q (2, 2, 7, 8) against k and v with one head: Einsum broadcasts the head, which onnxruntime's symbolic
    shape inference got wrong ((2, 1, 7, 9) for (2, 2, 7, 9)) and our copy of it gets right."""
    F = TensorProto.FLOAT
    nodes = [helper.make_node("Einsum", ["q", "k"], ["s"], equation="bhqd,bhkd->bhqk"),
             helper.make_node("Softmax", ["s"], ["p"], axis=softmax_axis),
             helper.make_node("MatMul", ["p", "v"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", F, (2, 2, 7, 8)),
                                           helper.make_tensor_value_info("k", F, (2, 1, 9, 8)),
                                           helper.make_tensor_value_info("v", F, (2, 1, 9, 8))],
                              [helper.make_tensor_value_info("out", F, (2, 2, 7, 8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_model_with_nothing_rewritten_comes_back_unchanged_and_valid(tmp_path):
    model = _einsum_broadcast_heads(softmax_axis=2)  # over the queries: a look-alike
    converted, report = lo.convert(model, policy=ALL_FLASH)
    assert report.count("rewritten") == 0 and report.count("skipped") == 1
    onnx.checker.check_model(converted, full_check=True)
    assert converted.graph == model.graph


def test_a_rewritten_model_of_broadcast_heads_is_valid(tmp_path):
    converted, report = lo.convert(_einsum_broadcast_heads(softmax_axis=-1), policy=ALL_FLASH)
    assert report.count("rewritten") == 1
    onnx.checker.check_model(converted, full_check=True)
