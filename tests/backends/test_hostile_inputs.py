"""Inputs a kernel author forgets: NaN and inf, empty dimensions, very large head dims. Through
`torch.compile(backend="longattn")` and through a converted ONNX model on the custom-op library, the result
must be eager's (NaN where eager has NaN, the same values elsewhere), and nothing may crash."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import longattn


class CausalAttention(torch.nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(16))
        sq, sk = q.shape[-2], k.shape[-2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def _qkv(b=1, h=2, sq=64, sk=64, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g) for s in (sq, sk, sk)]


def _poisoned(which: int, index: tuple, value: float):
    qkv = _qkv()
    qkv[which] = qkv[which].clone()
    qkv[which][index] = value
    return qkv


def _agree(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN where eager has none, or the reverse"
    torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,qkv", [
    ("NaN in one query", _poisoned(0, (0, 0, 5, 3), float("nan"))),     # that row only
    ("NaN in one key", _poisoned(1, (0, 1, 7, 0), float("nan"))),       # every row that sees the key
    ("inf in one value", _poisoned(2, (0, 1, 9, 2), float("inf"))),
    ("inf in one query", _poisoned(0, (0, 0, 3, 1), float("inf"))),     # -inf·0 scores: NaN rows, as eager
], ids=lambda x: x if isinstance(x, str) else "")
def test_nan_and_inf_propagate_as_in_eager(name, qkv):
    torch._dynamo.reset()
    want = CausalAttention()(*qkv)
    got = torch.compile(CausalAttention(), backend="longattn")(*qkv)
    assert longattn.last_report().count("rewritten") == 1, name
    assert torch.isnan(want).any() or torch.isinf(qkv[2]).any()
    _agree(got, want)


@pytest.mark.parametrize("sizes", [dict(sq=0, sk=0), dict(sq=0, sk=8), dict(b=0), dict(d=0)],
                         ids=["no tokens", "no queries", "no batch", "no head dim"])
def test_empty_dimensions_give_eager_empty_results(sizes):
    torch._dynamo.reset()
    qkv = _qkv(**sizes)
    want = CausalAttention()(*qkv)
    got = torch.compile(CausalAttention(), backend="longattn")(*qkv)
    _agree(got, want)


@pytest.mark.parametrize("d", [512, 1024])
def test_very_large_head_dims_are_rewritten_and_exact(d):
    torch._dynamo.reset()
    qkv = _qkv(sq=300, sk=300, d=d)
    want = CausalAttention()(*qkv)
    got = torch.compile(CausalAttention(), backend="longattn")(*qkv)
    assert longattn.last_report().count("rewritten") == 1
    _agree(got, want)


def test_nan_through_a_converted_onnx_model_on_the_library(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    import longattn.onnx as lo
    from longattn.backends.onnxruntime import build
    from tests.patterns.test_onnx_spellings import SCALE, attention
    from tests.patterns.test_onnx_zoo import ALL_FLASH
    try:
        build.compiler()
    except build.BuildError as e:
        pytest.skip(f"no C++ compiler for the custom-op library: {e}")
    build.build(quiet=True)
    path, out = tmp_path / "m.onnx", tmp_path / "c.onnx"
    onnx.save(attention(SCALE), str(path))
    converted, report = lo.convert(str(path), policy=ALL_FLASH)
    assert report.count("rewritten") == 1
    lo.save(converted, out)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in converted.graph.input}
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    feeds["q"][0, 0, 1, 0] = np.nan
    feeds["k"][0, 0, 2, 0] = np.inf
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = lo.session(out).run(None, feeds)[0]
    _agree(torch.from_numpy(got), torch.from_numpy(want))
