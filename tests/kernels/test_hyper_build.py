"""The hyper kernels build for sm_90 (no GPU needed) without register spills at the default tiles."""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="the triton wheel ships no ptxas here")
def test_kernels_build_for_sm90_without_register_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "longattn.kernels.hyper.sm90_build"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [l for l in run.stdout.splitlines() if "STACK=" in l]
    assert len(lines) == 24, run.stdout  # 12 kernel variants x 2 head sizes
    spills = [l for l in lines if not l.endswith("STACK=0") and "measured-fastest" not in l]
    assert not spills, "\n".join(spills)
