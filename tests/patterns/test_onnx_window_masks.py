"""A sliding-window mask is the causal pattern at every length up to its window: an ONNX model exported with
dynamic lengths was proven causal by evaluating its mask at 7 and 5 tokens, and a window of 19 keys became full
causal attention (found by the ONNX corpus). The proof now evaluates above every integer constant of the mask."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import longattn.onnx as lo
from tests.patterns.test_onnx_zoo import ALL_FLASH


class Windowed(torch.nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        sq, sk = q.shape[-2], k.shape[-2]
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        keep = (j <= i + (sk - sq)) & (j > i + (sk - sq) - self.window)
        s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v


def _export(model, path):
    q = torch.randn(1, 2, 22, 16)
    seq = torch.export.Dim("seq", min=2, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (q, q, q), str(path), dynamo=True, input_names=["q", "k", "v"],
                          dynamic_shapes=({2: seq}, {2: seq}, {2: seq}))


@pytest.mark.parametrize("window", [19, 300])
def test_a_dynamic_sliding_window_is_not_taken_for_causal(tmp_path, window):
    path, out = tmp_path / "m.onnx", tmp_path / "c.onnx"
    _export(Windowed(window), path)
    converted, report = lo.convert(str(path), policy=ALL_FLASH)
    for site in report.sites:
        assert "causal" not in site.mask, (site.mask, site.causal_proof)
    lo.save(converted, out)
    q = np.random.default_rng(0).standard_normal((1, 2, 2 * window + 7, 16)).astype(np.float32)
    feeds = {"q": q, "k": q, "v": q}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
