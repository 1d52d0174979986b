"""The transformer zoo exported to ONNX (TorchScript and dynamo exporters, opsets 14-23) through
longattn.onnx.convert: every attention module is found, as in FX; an all-flash rewrite runs in
stock onnxruntime (the function bodies) and matches the original; the model passes the checker."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import longattn.onnx as lo
from longattn.kernels.dispatch import Band
from tests.zoo import ZOO_BY_NAME


class FixedPolicy:
    """Every layer gets the same bands (stands in for a one-rule YAML policy)."""

    def __init__(self, *bands: Band):
        self.bands = tuple(bands)
        self.source = "all-" + "+".join(b.kind for b in bands)

    def decide(self, layer, index, num_layers):
        from types import SimpleNamespace
        return SimpleNamespace(bands=self.bands, source="rules[0]")


ALL_FLASH = FixedPolicy(Band("flash"))


class _FirstTensor(torch.nn.Module):
    def __init__(self, model, keys):
        super().__init__()
        self.m, self.keys = model, keys

    def forward(self, *args):
        out = self.m(**dict(zip(self.keys, args)))
        if torch.is_tensor(out):
            return out
        return out[0] if isinstance(out, tuple) else out.last_hidden_state


def export(name: str, impl: str, dynamo: bool, opset: int, directory) -> tuple[str, object]:
    """Export a zoo model; returns (path, ZooModel). Layer names get a leading "m." (the wrapper)."""
    zoo_model = ZOO_BY_NAME[name]
    model, inputs = zoo_model.build(impl)
    keys = list(inputs)
    path = os.path.join(str(directory), f"{name}-{impl}-{'dynamo' if dynamo else 'ts'}-{opset}.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = dict(dynamo=dynamo, opset_version=opset, input_names=keys, output_names=["out"])
        if dynamo:
            kwargs["verbose"] = False
        torch.onnx.export(_FirstTensor(model, keys).eval(), tuple(inputs[k] for k in keys), path, **kwargs)
    return path, zoo_model


def run(path: str, feeds: dict):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def zoo_feeds(name: str, impl: str) -> dict:
    _, inputs = ZOO_BY_NAME[name].build(impl)
    return {k: v.numpy() for k, v in inputs.items()}


CASES = [  # (model, attention implementation, dynamo exporter, opset)
    ("llama", "eager", False, 14), ("qwen2", "eager", False, 17), ("mistral", "eager", False, 15),
    ("gpt2", "eager", False, 14), ("bert", "eager", False, 17), ("vit", "sdpa", False, 16),
    ("t5", "eager", False, 17), ("bart", "eager", False, 15), ("whisper", "eager", False, 17),
    ("torch-transformer", "native", False, 17),
    ("llama", "sdpa", True, 18), ("bert", "sdpa", True, 18), ("bart", "eager", True, 18),
    ("llama", "sdpa", True, 23),  # ONNX Attention ops
]


@pytest.fixture(autouse=True)
def _no_native_fastpath():
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.parametrize("name,impl,dynamo,opset", CASES,
                         ids=[f"{n}-{i}-{'dynamo' if d else 'ts'}-{o}" for n, i, d, o in CASES])
def test_exported_zoo_flash_rewrite_matches_original_in_stock_onnxruntime(tmp_path, name, impl, dynamo, opset):
    path, zoo_model = export(name, impl, dynamo, opset, tmp_path)
    converted, report = lo.convert(path, policy=ALL_FLASH)
    assert len(report) == zoo_model.attention_modules, str(report)
    assert report.count("rewritten") == zoo_model.attention_modules, str(report)
    # the encoder's generate_square_subsequent_mask is built from sizes alone: proven causal here
    causal = {"torch-transformer": 2}.get(name, zoo_model.causal_sites)
    assert sum("causal" in s.mask for s in report) == causal, str(report)
    out = tmp_path / "converted.onnx"
    lo.save(converted, out)
    onnx.checker.check_model(str(out), full_check=True)
    ops = [n.op_type for n in converted.graph.node]
    assert ops.count("FlashAttention") == zoo_model.attention_modules
    assert "Softmax" not in ops
    feeds = zoo_feeds(name, impl)
    expected, got = run(path, feeds), run(str(out), feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_same_sites_as_the_fx_front_end(tmp_path, name):
    from longattn.rewriter.fx_rewrite import rewrite_graph
    zoo_model = ZOO_BY_NAME[name]
    model, inputs = zoo_model.build("eager")
    fx_rows = []

    def collect(gm, example_inputs):
        fx_rows.extend(rewrite_graph(gm, ALL_FLASH, verify=False).sites)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=collect)(**inputs)
    finally:
        torch._dynamo.reset()
    path, _ = export(name, "eager", False, 17, tmp_path)
    _, report = lo.convert(path, policy=ALL_FLASH)
    onnx_rows = [(s.layer.removeprefix("m."), s.mask, s.heads, s.kv_heads, s.head_dim, s.status) for s in report]
    fx = [(s.layer, s.mask, s.heads, s.kv_heads, s.head_dim, s.status) for s in fx_rows]
    assert sorted(onnx_rows) == sorted(fx)


@pytest.mark.parametrize("kind", ["hyper", "linear"])
def test_hyper_and_linear_nodes_run_in_stock_onnxruntime(tmp_path, kind):
    path, zoo_model = export("llama", "eager", False, 17, tmp_path)
    converted, report = lo.convert(path, policy=FixedPolicy(Band(kind)))
    assert report.count("rewritten") == zoo_model.attention_modules, str(report)
    node = {"hyper": "HyperAttention", "linear": "LinearAttention"}[kind]
    assert [n.op_type for n in converted.graph.node].count(node) == zoo_model.attention_modules
    out = tmp_path / "converted.onnx"
    lo.save(converted, out)
    onnx.checker.check_model(str(out), full_check=True)
    feeds = zoo_feeds("llama", "eager")
    got = run(str(out), feeds)
    assert np.isfinite(got).all()
    # the function body is exact attention: without the library the model is unchanged
    np.testing.assert_allclose(got, run(path, feeds), rtol=1e-4, atol=1e-4)


def test_length_bands_become_a_plan_attribute(tmp_path):
    path, _ = export("gpt2", "eager", False, 17, tmp_path)
    converted, report = lo.convert(path, policy=FixedPolicy(Band("flash", 4096), Band("hyper", None, {"block_size": 64})))
    (node, *_) = [n for n in converted.graph.node if n.domain == "ai.longattn"]
    assert node.op_type == "HyperAttention"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    import json
    plan = json.loads(attrs["plan"])
    assert [(b["kind"], b["below"]) for b in plan] == [("flash", 4096), ("hyper", None)]
    assert plan[1]["params"] == {"block_size": 64}
    assert attrs["causal"] == 1


def test_input_model_is_not_modified(tmp_path):
    path, _ = export("gpt2", "eager", False, 17, tmp_path)
    before = open(path, "rb").read()
    model = onnx.load(path)
    snapshot = model.SerializeToString()
    lo.convert(path, policy=ALL_FLASH)
    lo.convert(model, policy=ALL_FLASH)
    assert open(path, "rb").read() == before
    assert model.SerializeToString() == snapshot


@pytest.mark.parametrize("name,dynamo", [("llama", False), ("gpt2", True)])
def test_dynamic_length_exports_are_proven_causal_and_match_at_every_length(tmp_path, name, dynamo):
    zoo_model = ZOO_BY_NAME[name]
    model, inputs = zoo_model.build("eager")
    keys = list(inputs)
    path = str(tmp_path / "dynamic.onnx")
    args = tuple(inputs[k] for k in keys)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            seq = torch.export.Dim("seq", min=2, max=256)
            shapes = tuple({0: torch.export.Dim.AUTO, 1: seq} for _ in keys)
            torch.onnx.export(_FirstTensor(model, keys).eval(), args, path, dynamo=True, dynamic_shapes=(shapes,),
                              input_names=keys, output_names=["out"], opset_version=18, verbose=False)
        else:
            torch.onnx.export(_FirstTensor(model, keys).eval(), args, path, dynamo=False, input_names=keys,
                              output_names=["out"], opset_version=17, dynamic_axes={k: {0: "batch", 1: "seq"} for k in keys})
    converted, report = lo.convert(path, policy=ALL_FLASH)
    assert report.count("rewritten") == zoo_model.attention_modules, str(report)
    assert all(s.mask == "causal" and "causal pattern at" in s.causal_proof for s in report), str(report)
    out = tmp_path / "converted.onnx"
    lo.save(converted, out)
    onnx.checker.check_model(str(out), full_check=True)
    for length in (5, 33):
        feeds = {"input_ids": np.random.default_rng(length).integers(0, 64, (2, length)).astype(np.int64)}
        np.testing.assert_allclose(run(str(out), feeds), run(path, feeds), rtol=1e-4, atol=1e-4)
