"""Models whose weights live in external data files: converted without reading the weights into
the graph pass, written back with external data, atomically, the input untouched. (The >2 GB
path is the same code: onnx.load(load_external_data=False), then external data on save.)"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import longattn.onnx as lo
from longattn import cli
from longattn.cli import convert as convert_cli
from tests.patterns.test_onnx_zoo import ALL_FLASH

B, H, S, D = 1, 4, 8, 16


def projected_attention_model():
    """x (B, S, H·D) -> q/k/v projections (weights: initializers) -> heads -> attention."""
    rng = np.random.default_rng(0)
    hidden = H * D
    inits = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), f"w{x}") for x in "qkv"]
    inits += [numpy_helper.from_array(np.array([B, S, H, D], np.int64), "heads"),
              numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")]
    nodes = []
    for x in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{x}"], [f"{x}p"]),
                  helper.make_node("Reshape", [f"{x}p", "heads"], [f"{x}r"]),
                  helper.make_node("Transpose", [f"{x}r"], [x], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, hidden])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, H, S, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_external_data_model_converts_and_keeps_external_data(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    path = src / "model.onnx"
    onnx.save(projected_attention_model(), str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    before = {f: (src / f).read_bytes() for f in os.listdir(src)}
    out = tmp_path / "out"
    converted, report = lo.convert(str(path), policy=ALL_FLASH)
    assert report.count("rewritten") == 1
    assert not lo.has_external_data(converted)  # weights read back once the graph was rewritten
    target = out / "api.onnx"
    out.mkdir(exist_ok=True)
    lo.save(converted, target, external_data=True)
    assert (out / "api.onnx.data").exists()
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(target), load_external_data=False).graph.initializer)
    assert {f: (src / f).read_bytes() for f in os.listdir(src)} == before
    x = np.random.default_rng(1).standard_normal((B, S, H * D)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not [f for f in os.listdir(out) if f.startswith(".longattn-")]


def test_cli_keeps_external_data_for_external_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_cli, "_load_policy", lambda spec: ALL_FLASH)
    src = tmp_path / "in"
    src.mkdir()
    onnx.save(projected_attention_model(), str(src / "model.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=1024)
    out = tmp_path / "out"
    assert cli.main(["convert", str(src), "--out", str(out), "--check"]) == 0
    assert sorted(os.listdir(out)) == ["model.onnx", "model.onnx.data"]
