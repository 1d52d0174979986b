"""The README's first command runs examples/demo.py: it must keep rewriting something."""
import runpy
from pathlib import Path

import torch

import longattn

ROOT = Path(__file__).resolve().parent.parent


def test_demo_rewrites_the_layers_its_policy_names_and_matches_eager(capsys):
    demo = runpy.run_path(str(ROOT / "examples" / "demo.py"))
    torch._dynamo.reset()
    demo["main"](["--inner", "aot_eager", "--layers", "5", "--seq-len", "48"])
    report = longattn.last_report()
    assert [s.status for s in report] == ["exact"] * 4 + ["rewritten"]
    out = capsys.readouterr().out
    rel = float(out.split("max relative difference to eager:")[1].split()[0])
    assert rel < 1e-4  # the rewritten layer runs flash at this length: exact up to rounding
    assert "model.layers.0.self_attn .. model.layers.3.self_attn: exact; model.layers.4.self_attn: flash" in out
    assert "PASS: every layer runs an exact kind" in out
