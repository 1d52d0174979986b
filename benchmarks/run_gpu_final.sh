set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/pydantic-*.whl .whl/pydantic_core-*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
(timeout 165 python3 -m pytest -q -p no:cacheprovider -n 14 tests/backends tests/patterns tests/rewriter tests/kernels/test_dispatch.py tests/kernels/test_hyper_triton.py tests/kernels/test_linear_triton.py tests/test_examples.py > $OUT/cpu_suite.txt 2>&1; echo rc=$? >> $OUT/cpu_suite.txt) &
(CUDA_VISIBLE_DEVICES=1 LONGATTN_TEST_CUDA=1 LONGATTN_FLASH_AUTOTUNE=0 timeout 165 python3 -m pytest -q -p no:cacheprovider -n 4 tests/kernels/test_flash.py > $OUT/flash_cuda.txt 2>&1; echo rc=$? >> $OUT/flash_cuda.txt) &
CUDA_VISIBLE_DEVICES=0 timeout 165 python3 benchmarks/bench_e2e.py --variants eager,longattn-flash-aot --out $OUT > $OUT/e2e_log.txt 2>&1; echo rc=$? >> $OUT/e2e_log.txt
wait
tail -3 $OUT/cpu_suite.txt $OUT/flash_cuda.txt; grep prefill $OUT/e2e_log.txt
