#!/usr/bin/env bash
# One command that checks every CUDA path on a GPU machine and leaves a record that CI can verify:
#   LONGATTN_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh      (from the repo root; carry .whl/)
# Steps, each under its own time cap (env vars, seconds), together about 8 of the device's 10 minutes:
#   tests   (TESTS_S=330)  pytest with LONGATTN_TEST_CUDA=1 on tests/gpu (flash at 1..8192 keys, decode, hyper, linear,
#                          torch.compile of a Llama incl. generate), tests/kernels/test_flash.py, tests/backends/
#                          test_cuda.py; pytest-xdist (-n PYTEST_WORKERS=10, work stealing) where it imports, else
#                          serial; flash autotuning off (one compile per variant). Stopped by SIGINT at the cap, so
#                          pytest still writes its junit xml for the tests that ran.
#   smoke   (SMOKE_S=100)  benchmarks/gpu_smoke.py: flash / hyper / linear forward against cuDNN (and fla), timings
#   record  (RECORD_S=60)  benchmarks/gpu_check_record.py: <date>-<device>-gpu-check.json from the above
# $OUT (default /tmp/longattn-gpu) gets log.txt (everything, also on stdout), junit.xml, smoke.jsonl and the record;
# copy the record into benchmarks/results/ and commit it: benchmarks/gpu_check_status.py reads it there.
set -uo pipefail
START=$(date +%s)
LAUNCH_TEE=1
. "$(dirname "$0")/gpu_launcher.sh"  # .whl/ wheels, PYTHONPATH, OUT, LOG and its header, step/timed/run_step

# compiling kernels is CPU work (16 cores): workers compile side by side, each with a small inductor pool
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
if python3 -c "import xdist" 2>/dev/null; then
  PARALLEL="-n ${PYTEST_WORKERS:-10} --dist worksteal"
else
  PARALLEL=""
  step "pytest-xdist is missing (carry its wheel in .whl/): the tests run serially and may not finish in time"
fi
# tests/gpu first: its torch.compile tests take longest, so they start first
STEP_SIGNAL=INT run_step "CUDA tests" "${TESTS_S:-330}" env LONGATTN_TEST_CUDA=1 LONGATTN_FLASH_AUTOTUNE=0 \
  python3 -m pytest -q -p no:cacheprovider $PARALLEL -rfE --tb=short -o junit_family=xunit1 \
  --junitxml="$OUT/junit.xml" tests/gpu tests/kernels/test_flash.py tests/backends/test_cuda.py
TESTS_RC=$?

run_step "speed smoke" "${SMOKE_S:-100}" python3 benchmarks/gpu_smoke.py --out "$OUT/smoke.jsonl"
SMOKE_RC=$?

run_step "record" "${RECORD_S:-60}" python3 benchmarks/gpu_check_record.py --junit "$OUT/junit.xml" \
  --smoke "$OUT/smoke.jsonl" --rc tests="$TESTS_RC" --rc smoke="$SMOKE_RC" --started "$START" --out "$OUT"
RECORD_RC=$?
launcher_finish
exit $((RECORD_RC != 0 ? RECORD_RC : TESTS_RC))  # no record, else the tests' verdict
