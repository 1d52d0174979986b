"""Causal masks with fewer queries than keys (a prefill after a cached prefix): bottom-right aligned, query i
sees keys up to i + Sk - Sq. Every other mask test once used Sq == Sk, so a top-left causal pattern passed them
all; these tests fail under that mutation, and the last one shows it (a committed mutation check)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import longattn
import longattn.onnx as lo
from longattn.patterns import masks
from tests.patterns.test_onnx_spellings import D, const, model
from tests.patterns.test_onnx_zoo import ALL_FLASH

SQ, SK = 5, 9
FLASH_EVERYWHERE = {"version": 1, "rules": [{"layers": "*", "use": "flash"}]}


class CachedPrefill(torch.nn.Module):
    """Causal attention of SQ new queries over SK keys, the mask built from sizes."""

    def forward(self, q, k, v):
        sq, sk = q.shape[-2], k.shape[-2]
        keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v


def fx_mask() -> str:
    q, k = torch.randn(1, 2, SQ, 16), torch.randn(1, 2, SK, 16)
    (site,) = longattn.explain(CachedPrefill(), q, k, k, policy=FLASH_EVERYWHERE).sites
    return site.mask


def onnx_mask() -> str:
    """The same mask as an ONNX initializer (as the dynamo exporter folds a static causal mask)."""
    keep = np.tril(np.ones((SQ, SK), bool), SK - SQ)
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "c_scale"], ["s1"]),
             helper.make_node("Where", ["keep", "s1", "ninf"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["out"])]
    F = TensorProto.FLOAT
    m = model(nodes, [("q", F, [1, 2, SQ, D]), ("k", F, [1, 2, SK, D]), ("v", F, [1, 2, SK, D])],
              [const("c_scale", D ** -0.5), const("keep", keep, bool), const("ninf", -np.inf)])
    _, report = lo.convert(m, policy=ALL_FLASH)
    (site,) = report.sites
    return site.mask


@pytest.mark.parametrize("front_end", [fx_mask, onnx_mask], ids=["fx", "onnx"])
def test_a_bottom_right_causal_mask_with_fewer_queries_is_proven_causal(front_end):
    assert front_end() == "causal"


def test_a_top_left_causal_pattern_would_fail_the_tests_above(monkeypatch):
    """The mutation that once passed every mask test: the causal pattern aligned top-left."""
    monkeypatch.setattr(masks, "causal_pattern", lambda sq, sk: np.arange(sk)[None, :] <= np.arange(sq)[:, None])
    assert fx_mask() != "causal"
    assert onnx_mask() != "causal"
