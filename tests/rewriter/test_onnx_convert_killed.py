"""`longattn convert` stopped mid-batch (Ctrl-C, then kill -9), as a user's shell would stop it: the inputs stay
byte for byte as they were, and every model under the output folder is whole. SIGINT also leaves no temporary
behind; SIGKILL cannot run any clean-up, so its only trace may be one hidden `.longattn-*` temporary."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import onnx
import pytest

from tests.patterns.test_onnx_spellings import SCALE, attention
from tests.rewriter.test_onnx_convert_cli import _snapshot

MODELS = 40
TEMP_PREFIX = ".longattn-"


@pytest.fixture
def batch(tmp_path):
    src = tmp_path / "models"
    src.mkdir()
    onnx.save(attention(SCALE), str(src / "m00.onnx"))
    for i in range(1, MODELS):
        shutil.copy(src / "m00.onnx", src / f"m{i:02d}.onnx")
    return src


def _convert_until_first_output(src, out, sig: int, jobs: int = 1) -> tuple[int, str]:
    """Start a batch convert (checked in onnxruntime: slow enough to stop midway), wait for its first output,
    then send `sig` to the main process. Returns the exit status and stderr."""
    longattn = os.path.join(os.path.dirname(sys.executable), "longattn")
    # SIGINT at its default, as in an interactive shell: a shell without job control starts background
    # commands (`cmd &`, hence CI runners and pytest under them) with SIGINT ignored, which the child inherits
    proc = subprocess.Popen([longattn, "convert", str(src), "--out", str(out), "--check", "--jobs", str(jobs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(f.endswith(".onnx") and not f.startswith(TEMP_PREFIX) for f in os.listdir(out)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the batch finished before it could be stopped: make it longer"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _outputs_are_whole(out) -> list[str]:
    written = sorted(f for f in os.listdir(out) if not f.startswith(TEMP_PREFIX))
    for name in written:
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model, full_check=True)
        assert any(n.domain == "ai.longattn" for n in model.graph.node), name
    return written


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_mid_batch_keeps_inputs_and_leaves_only_whole_outputs(batch, tmp_path, jobs):
    before = _snapshot(batch)
    out = tmp_path / "out"
    code, err = _convert_until_first_output(batch, out, signal.SIGINT, jobs)
    assert code == 130, err  # as a shell reports SIGINT; never 0
    assert "Traceback" not in err and "interrupted" in err, err
    assert _snapshot(batch) == before
    written = _outputs_are_whole(out)
    assert 1 <= len(written) < MODELS
    assert not [f for f in os.listdir(out) if f.startswith(TEMP_PREFIX)], "Ctrl-C left a temporary behind"


def test_kill_9_mid_batch_keeps_inputs_and_leaves_only_whole_outputs(batch, tmp_path):
    before = _snapshot(batch)
    out = tmp_path / "out"
    code, _ = _convert_until_first_output(batch, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _snapshot(batch) == before
    written = _outputs_are_whole(out)
    assert 1 <= len(written) < MODELS
    assert len([f for f in os.listdir(out) if f.startswith(TEMP_PREFIX)]) <= 1
