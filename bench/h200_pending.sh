#!/bin/bash
# The H200 measurements the open issues still need (state of 2026-12-03, evening), in priority order, each bounded
# so that one device call (< 10 minutes) runs them all. Results go under $OUT/res (and $OUT/res.tgz: a
# device call returns only a few files, so fetch the archive). Run from the repository root:
#     OUT=/tmp/out bash bench/h200_pending.sh
# Python packages missing on the device (xgrammar, gguf, fastapi, ...) travel as wheels in .wheels/ (ignored by git).
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ls .wheels/*.whl > /dev/null 2>&1; then
  pip install -q --no-deps --target /tmp/pydeps .wheels/*.whl > /tmp/pip.txt 2>&1
  export PYTHONPATH=/tmp/pydeps:$PWD
fi
R=${OUT:?set OUT}/res; mkdir -p "$R"
TOK=.wheels/smollm2-tokenizer; [ -d "$TOK" ] && export FDPP_TEST_TOKENIZER=$PWD/$TOK || TOK=""
t0=$(date +%s); s() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
run() {  # run NAME SECONDS CMD...: bounded, logged, one line of status
  local name=$1 secs=$2; shift 2
  s "$name"; timeout "$secs" "$@" > "$R/$name.txt" 2>&1; s "$name rc=$?"; tail -4 "$R/$name.txt"
  tar czf "$OUT/res.tgz" -C "$(dirname "$R")" "$(basename "$R")"  # after each step: a call cut short keeps what ran
}
# GPU tests: the engine set, the backends, the mixed-step graphs (kernels' do_not_specialize is new)
run pytest_gpu 140 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/engine/test_backends.py tests/test_gpu_mixed_graphs.py
# 13: the long-prompt ITL after the specialization fix (Triton compiles inside the window are listed)
run prefix_itl 100 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --out "$R/prefix_itl"
# 17: JSON schema vs unconstrained at batch 64, without a profiler this time
run structured 70 python bench/bench_structured.py ${TOK:+--tokenizer $TOK} --batch 64 --max-tokens 64 --out "$R/structured"
# 12: the fresh GEMM check (both bench_gemm budget bugs fixed) and Llama-3-8B batch 1
run gemm 100 python bench/bench_gemm.py --quick --time-budget 85 --results-dir "$R/gemm"
run e2e_l3 90 python bench/e2e_latency.py --models llama-3-8b --budget-s 70 --out "$R/e2e_l3"
# 13: the Llama-3-8B prefix scenarios (shared prompt, multi-turn)
run prefix_l3 90 python bench/bench_prefix.py --quick --scenarios shared multiturn --models llama-3-8b --out "$R/prefix_l3"
s done
