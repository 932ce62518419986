#!/bin/bash
# The H200 measurements the open issues still need (state of 2026-12-03, night), in priority order, each bounded
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
# 13: the long-prompt ITL with split-KV prefill chunks (default), then without splits, then with the balanced decode graphs
run itl 70 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --itl-default-only --out "$R/itl"
run itl_nosplit 60 env FDPP_PREFILL_SPLITS=1 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --itl-default-only --out "$R/itl_nosplit"
run itl_balanced 60 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --itl-default-only --balanced-decode-graphs --out "$R/itl_balanced"
# GPU tests of the new paths: balanced decode graphs, split prefill (kernel, engine, mixed graphs), TMA prefill
run pytest_gpu 170 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/kernels/test_attention_prefill_split.py tests/engine/test_prefill_split_engine.py tests/test_gpu_mixed_graphs.py tests/kernels/test_attention_prefill_tma.py
# the re-tuned split heuristic (1 program per SM, 1k keys per split) at its points
run chunk 100 python bench/bench_chunk_attention.py --quick --out "$R/chunk"
# 12: batch 1 / batch 64 after the TMA prefill (TTFT at 1k) and the split changes
run e2e 100 python bench/e2e_latency.py --models llama-2-7b --budget-s 85 --out "$R/e2e"
s done
