#!/bin/bash
# The H200 measurements the open issues still need (state of 2026-12-03), in priority order, each bounded
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
# GPU tests written after the last H200 run (async grammar overlap) and the engine's GPU set
run pytest_gpu 100 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/engine/test_backends.py
# 12: batch 64 x 1k by the wall clock: which steps are slow (docs/PERFORMANCE.md)
run step_trace 100 python bench/step_trace.py --out "$R/step_trace"
# 12: the transformers peer (static cache) at batch 1, and the fresh GEMM check
run e2e_peers 130 python bench/e2e_latency.py --quick --peers --budget-s 110 --out "$R/e2e"
run gemm 80 python bench/bench_gemm.py --quick --time-budget 70 --results-dir "$R/gemm"
# 17: JSON schema vs unconstrained at batch 64 (warm-up at the timed batch)
run structured 70 python bench/bench_structured.py ${TOK:+--tokenizer $TOK} --batch 64 --max-tokens 64 --out "$R/structured"
# 13: cache-off decode regression and the long-prompt ITL scenario
run prefix_decode 80 python bench/bench_prefix.py --quick --scenarios decode itl --models llama-2-7b --out "$R/prefix"
s done
