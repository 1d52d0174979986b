# The common start of every script that drives the GPU machine (benchmarks/run_gpu.sh, benchmarks/gpu_check.sh):
# sourced, not run, from the repo root, after `set -uo pipefail`. The machine has no network and lacks some of the
# package's dependencies, gets the repo as a copy of the working tree (usually without .git) and hands back only
# what is written under $OUT, so every script needs the same preparation and the same logging:
#   - wheels carried in .whl/ (pydantic & co, fla, pytest-xdist) installed into /tmp/site, which goes first on
#     PYTHONPATH, the repo second (no pip install -e: setuptools' entry points are not needed, nor wanted);
#   - PYTHONUNBUFFERED, OUT (default /tmp/longattn-gpu), LOG ($OUT/log.txt, started afresh), GPUS (count);
#   - LONGATTN_COMMIT exported: as given, else `git rev-parse HEAD` where .git exists (empty otherwise);
#   - a header at the top of the log: the GPUs, the commit, Python/torch/triton/transformers/onnx/onnxruntime;
#   - helpers for the steps:
#       step NAME                    a "== NAME" line in the log
#       timed FILE SECONDS CMD...    CMD under a time cap (signal STEP_SIGNAL, default TERM; KILL 15 s later), its
#                                    output appended to FILE, then "rc=N (T s)"; returns N (124: the cap was hit)
#       run_step NAME SECONDS CMD... step NAME, then timed "$LOG" SECONDS CMD...
#       launcher_finish              flushes the log's copy on stdout (LAUNCH_TEE=1); call it last
# LAUNCH_TEE=1, set before sourcing, also copies everything the log gets to stdout (the device tool returns only
# stdout's tail besides $OUT).

OUT=${OUT:-/tmp/longattn-gpu}; mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
if [ "${LAUNCH_TEE:-0}" = 1 ]; then
  exec > >(tee -a "$LOG") 2>&1
  _LAUNCH_TEE_PID=$!
fi

# _append FILE CMD...: CMD's stdout and stderr appended to FILE; the log goes to stdout when stdout is tee'd into it
_append() {
  local file=$1; shift
  if [ "$file" = "$LOG" ] && [ "${LAUNCH_TEE:-0}" = 1 ]; then "$@" 2>&1; else "$@" >> "$file" 2>&1; fi
}

if ls .whl/*.whl >/dev/null 2>&1; then
  _append "$LOG" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
LONGATTN_COMMIT=${LONGATTN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
export LONGATTN_COMMIT
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)

_header() {
  nvidia-smi -L
  echo "commit ${LONGATTN_COMMIT:-unknown (no LONGATTN_COMMIT, no .git)}"
  git log --oneline -1 2>/dev/null
  python3 -c "import sys,torch,triton,transformers,onnx,onnxruntime; print(sys.version.split()[0], torch.__version__, \
triton.__version__, transformers.__version__, onnx.__version__, onnxruntime.__version__)"
}
_append "$LOG" _header

step() { _append "$LOG" echo "== $1"; }

timed() {
  local file=$1 secs=$2 start=$SECONDS rc
  shift 2
  _append "$file" timeout -s "${STEP_SIGNAL:-TERM}" -k 15 "$secs" "$@"
  rc=$?
  _append "$file" echo "rc=$rc ($((SECONDS - start)) s)"
  return "$rc"
}

run_step() {
  step "$1"
  shift
  timed "$LOG" "$@"
}

launcher_finish() {
  if [ -n "${_LAUNCH_TEE_PID:-}" ]; then
    exec >&- 2>&-
    wait "$_LAUNCH_TEE_PID" 2>/dev/null
  fi
  return 0
}
