#!/usr/bin/env bash
# One batched GPU session (device tool): the test suite on the GPU image's versions, the flash
# tests at real sizes on CUDA, and the benchmarks, each under its own time cap. Results to $OUT.
#   bash benchmarks/run_gpu.sh [STEP ...]   (run from the repo root; .whl/ carries pydantic & fla)
# Steps (default: all, in this order): cpu flash cp e2e hyper lincheck linear decode profile cpbench. `cpu` runs in
# the background beside the GPU steps. Opt-in steps (named only): flashbench (bench_flash.py), gluon (its probe).
# Each step's time cap is an env var (CPU_SUITE_S, FLASH_TESTS_S, ...).
# The delta rule's fwd+bwd against fla:
#   LINEAR_ARGS="--lengths 32768,131072 --shapes 32x64 --skip fwd,decode --only ours-delta,fla-delta" \
#       bash benchmarks/run_gpu.sh linear
set -uo pipefail
OUT=${OUT:-/tmp/longattn-gpu}; mkdir -p "$OUT"
STEPS=${*:-cpu flash cp e2e hyper lincheck linear decode profile cpbench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
GPUS=$(nvidia-smi -L | wc -l)
{ nvidia-smi -L; git log --oneline -1 2>/dev/null; python3 -c "import sys,torch,triton,transformers,onnx,onnxruntime; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__, onnx.__version__, onnxruntime.__version__)"; } > "$LOG" 2>&1
step() { echo "== $1" >> "$LOG"; }
if want cpu; then  # the CPU suite (interpreter kernels) with the GPU image's torch/triton/transformers
  (timeout ${CPU_SUITE_S:-420} python3 -m pytest -q -p no:cacheprovider -n 6 tests --ignore=tests/kernels/test_flash.py --ignore=tests/kernels/test_context_parallel.py > "$OUT/cpu_suite.txt" 2>&1; echo "rc=$?" >> "$OUT/cpu_suite.txt") &
fi
if want flash; then  # -n 4: each shape compiles its own kernels, and compiling is CPU work
  step "flash tests on CUDA"
  LONGATTN_TEST_CUDA=1 LONGATTN_FLASH_AUTOTUNE=0 timeout ${FLASH_TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider -n 4 tests/backends/test_cuda.py tests/kernels/test_flash.py >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want cp && [ "$GPUS" -ge 2 ]; then  # context parallel: NCCL, one GPU per rank (multicast stays off)
  step "context parallel tests on CUDA"
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LONGATTN_TEST_CUDA=1 LONGATTN_TEST_CP_CUDA=1 \
    LONGATTN_FLASH_AUTOTUNE=0 timeout ${CP_TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_context_parallel.py >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want e2e; then
  step "e2e"
  timeout ${E2E_S:-200} python3 benchmarks/bench_e2e.py --inductor-lengths 8192 ${E2E_ARGS:-} --out "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want hyper; then
  step "hyper"
  timeout ${HYPER_S:-100} python3 benchmarks/bench_hyper.py --lengths ${HYPER_LENGTHS:-32768,131072} --shapes 32x64 ${HYPER_ARGS:-} --out-dir "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want lincheck; then  # linear kernels vs the float64 reference on CUDA, outputs and gradients
  step "linear check"
  timeout ${LINCHECK_S:-90} python3 benchmarks/check_linear_cuda.py > "$OUT/linear_check.txt" 2>&1; echo "rc=$?" >> "$OUT/linear_check.txt"
fi
if want linear; then
  step "linear"
  timeout ${LINEAR_S:-90} python3 benchmarks/bench_linear.py ${LINEAR_ARGS:---lengths 32768,131072 --shapes 32x64 --skip fwdbwd --decode-lengths 4096,131072} --out "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want decode; then  # a linear site's decode step with a kept state vs recompute vs exact, per context
  step "decode state"
  timeout ${DECODE_S:-90} python3 benchmarks/bench_decode_state.py --device cuda --contexts 4096,16384,65536,131072 --out "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want flashbench; then  # opt-in: the flash table (forward with the Gluon kernel on Hopper, decode) vs SDPA backends
  step "flash benchmark"
  timeout ${FLASHBENCH_S:-300} python3 benchmarks/bench_flash.py ${FLASHBENCH_ARGS:---skip bwd} --out "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want gluon; then  # opt-in: the Gluon forward's configs vs cuDNN / FA2 / our Triton path (rows to $OUT/gluon.jsonl)
  step "gluon probe"
  OUT=$OUT timeout ${GLUON_S:-330} python3 benchmarks/probe_flash_gluon.py ${GLUON_ARGS:---lengths 8192,32768} >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want profile; then
  step "profile"
  timeout ${PROFILE_S:-120} python3 benchmarks/profile_gpu.py ${PROFILE_ARGS:-} --out "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
if want cpbench && [ "$GPUS" -ge 2 ]; then  # scaling vs one GPU and torch's context-parallel SDPA
  step "context parallel benchmark"
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout ${CPBENCH_S:-240} \
    torchrun --nproc_per_node="$GPUS" benchmarks/bench_context_parallel.py ${CPBENCH_ARGS:---lengths 131072 524288 --modes fwd --reps 3} --out "$OUT" >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
fi
wait
