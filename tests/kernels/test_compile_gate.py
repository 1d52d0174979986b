"""Every Triton and Gluon kernel compiles for an H100 (sm_90) at every config its launcher can pick, and fits.

One test per case (kernel file, kernel, shape, config) and one per fallback chain; `compile_gate.py` says what
is checked and why. The compiles run once per session (pytest-xdist workers included), in a fresh process without
the interpreter, and the run's Triton version, compile count and time are printed at the end. CI runs this file
under the oldest Triton that pyproject.toml allows as well (.ci/run). Skipped where Triton's NVIDIA tool chain is
missing.
"""
import fcntl
import json
import os

import pytest

from .compile_gate import WORKERS, nvidia_tools, report_in_fresh_process

pytestmark = pytest.mark.skipif(nvidia_tools() is None,
                                reason="triton's NVIDIA tool chain (ptxas, cuobjdump) is not installed")

# Real bugs the gate found, by case id: shapes the launchers accept where a pinned tile does not fit an H100's
# shared memory, and nothing falls back (benchmarks/results/2026-12-07-cpu-compile-gate.md). They stay in the gate,
# compiled and reported on every run, as strict expected failures: CI stays green until one is fixed, and then
# fails (XPASS) until its entry here is removed. Ids that this Triton does not produce are simply unused.
KNOWN_BUGS = {
    "linear/triton_delta.py:_delta_h_kernel:fp32-d128:WALK_TILE BV=32 BF=128 w4 s3":
        "delta rule, fp32 at d128: the state walk needs 245760 bytes of shared memory (Triton 3.6 and 3.9)",
    "linear/triton_exact.py:_exact_dkv_kernel:fp32-d128:EXACT_TILE BACKWARD_WARPS BM=64 BN=64 w8":
        "exact part's backward, fp32 at d128: dK/dV needs 262656 bytes of shared memory (Triton 3.6 and 3.9)",
    "linear/triton_delta_bwd.py:_local_kernel:fp32-d128:triton_delta_bwd.LOCAL_TILE BV=64 BF=128 w4":
        "delta rule backward, fp32 at d128, Triton 3.6's 4-warp tiles: 262144 bytes of shared memory",
    "linear/triton_delta_bwd.py:_dkn_kernel:fp32-d128:triton_delta_bwd.DKV_TILE BV=32 BF=128 w4":
        "delta rule backward, fp32 at d128, Triton 3.6's 4-warp tiles: 245760 bytes of shared memory",
}


def _ids() -> dict:
    """The cases and chains, listed by a fresh process: the launchers' configs differ under the interpreter."""
    if nvidia_tools() is None:
        return {"cases": [], "groups": []}
    return report_in_fresh_process("tests.kernels.compile_gate", "list_ids")


IDS = _ids()


def _param(case: str):
    bug = KNOWN_BUGS.get(case)
    return pytest.param(case, id=case, marks=[pytest.mark.xfail(strict=True, reason=bug)] if bug else [])


def _report_once(tmp_path_factory) -> dict:
    """The gate's report, compiled once per test session: under pytest-xdist every worker that runs some of these
    tests would compile everything again, so the first one compiles while the others wait on its lock, in the
    temporary folder that the workers share, and read its report."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return report_in_fresh_process("tests.kernels.compile_gate", "run_gate")
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "compile_gate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = shared / "compile_gate.json"
        if not path.exists():
            path.write_text(json.dumps(report_in_fresh_process("tests.kernels.compile_gate", "run_gate")))
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def gate(request, tmp_path_factory):
    report = _report_once(tmp_path_factory)
    yield report
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # past the output capture, even under -q
            reporter.ensure_newline()
            reporter.write_line(f"compile gate: triton {report['triton']}, {report['compiles']} compiles for "
                                f"{len(report['cases'])} cases in {report['seconds']} s ({WORKERS} processes, "
                                f"{report['compile_seconds']} s of compiling)")


@pytest.mark.parametrize("case", [_param(c) for c in IDS["cases"]])
def test_kernel_compiles_and_fits(gate, case):
    failure = gate["cases"][case]["failure"]
    assert failure is None, failure


@pytest.mark.parametrize("group", IDS["groups"])
def test_fallback_chain_has_a_config_that_fits(gate, group):
    failure = gate["groups"][group]["failure"]
    assert failure is None, failure
