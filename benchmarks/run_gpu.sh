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
STEPS=${*:-cpu flash cp e2e hyper lincheck linear decode profile cpbench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
. "$(dirname "$0")/gpu_launcher.sh"  # .whl/ wheels, PYTHONPATH, OUT, LOG and its header, GPUS, step/timed/run_step
if want cpu; then  # the CPU suite (interpreter kernels) with the GPU image's torch/triton/transformers
  (: > "$OUT/cpu_suite.txt"; timed "$OUT/cpu_suite.txt" ${CPU_SUITE_S:-420} python3 -m pytest -q -p no:cacheprovider \
     -n 6 tests --ignore=tests/kernels/test_flash.py --ignore=tests/kernels/test_context_parallel.py) &
fi
if want flash; then  # -n 4: each shape compiles its own kernels, and compiling is CPU work
  run_step "flash tests on CUDA" ${FLASH_TESTS_S:-200} env LONGATTN_TEST_CUDA=1 LONGATTN_FLASH_AUTOTUNE=0 \
    python3 -m pytest -q -p no:cacheprovider -n 4 tests/backends/test_cuda.py tests/kernels/test_flash.py
fi
if want cp && [ "$GPUS" -ge 2 ]; then  # context parallel: NCCL, one GPU per rank (multicast stays off)
  run_step "context parallel tests on CUDA" ${CP_TESTS_S:-240} env NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LONGATTN_TEST_CUDA=1 LONGATTN_TEST_CP_CUDA=1 \
    LONGATTN_FLASH_AUTOTUNE=0 \
    python3 -m pytest -q -p no:cacheprovider tests/kernels/test_context_parallel.py
fi
if want e2e; then
  run_step "e2e" ${E2E_S:-200} python3 benchmarks/bench_e2e.py --inductor-lengths 8192 ${E2E_ARGS:-} --out "$OUT"
fi
if want hyper; then
  run_step "hyper" ${HYPER_S:-100} python3 benchmarks/bench_hyper.py --lengths ${HYPER_LENGTHS:-32768,131072} \
    --shapes 32x64 ${HYPER_ARGS:-} --out-dir "$OUT"
fi
if want lincheck; then  # linear kernels vs the float64 reference on CUDA, outputs and gradients
  step "linear check"
  : > "$OUT/linear_check.txt"
  timed "$OUT/linear_check.txt" ${LINCHECK_S:-90} python3 benchmarks/check_linear_cuda.py
fi
if want linear; then
  run_step "linear" ${LINEAR_S:-90} python3 benchmarks/bench_linear.py \
    ${LINEAR_ARGS:---lengths 32768,131072 --shapes 32x64 --skip fwdbwd --decode-lengths 4096,131072} --out "$OUT"
fi
if want decode; then  # a linear site's decode step with a kept state vs recompute vs exact, per context
  run_step "decode state" ${DECODE_S:-90} python3 benchmarks/bench_decode_state.py --device cuda \
    --contexts 4096,16384,65536,131072 --out "$OUT"
fi
if want flashbench; then  # opt-in: the flash table (forward with the Gluon kernel on Hopper, decode) vs SDPA backends
  run_step "flash benchmark" ${FLASHBENCH_S:-300} python3 benchmarks/bench_flash.py ${FLASHBENCH_ARGS:---skip bwd} \
    --out "$OUT"
fi
if want gluon; then  # opt-in: the Gluon forward's configs vs cuDNN / FA2 / our Triton path (rows to $OUT/gluon.jsonl)
  run_step "gluon probe" ${GLUON_S:-330} env OUT="$OUT" python3 benchmarks/probe_flash_gluon.py \
    ${GLUON_ARGS:---lengths 8192,32768}
fi
if want profile; then
  run_step "profile" ${PROFILE_S:-120} python3 benchmarks/profile_gpu.py ${PROFILE_ARGS:-} --out "$OUT"
fi
if want cpbench && [ "$GPUS" -ge 2 ]; then  # scaling vs one GPU and torch's context-parallel SDPA
  run_step "context parallel benchmark" ${CPBENCH_S:-240} env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 torchrun --nproc_per_node="$GPUS" benchmarks/bench_context_parallel.py \
    ${CPBENCH_ARGS:---lengths 131072 524288 --modes fwd --reps 3} --out "$OUT"
fi
wait
