#!/bin/bash
# The H200 measurements the open issues still need (state of 2026-12-03, 19:30), in priority order, each bounded
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
# 13: the long-prompt ITL after the full-batch bucket fix (33 rows now replay a graph), then with the balanced
# decode graphs (8 splits for unequal rows), Llama-2-7B fp16 and Llama-3-8B bf16
run itl 80 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --itl-default-only --out "$R/itl"
run itl_balanced 70 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --itl-default-only --balanced-decode-graphs --out "$R/itl_balanced"
run itl3 80 python bench/bench_prefix.py --quick --scenarios itl --models llama-3-8b --itl-default-only --out "$R/itl3"
run itl3_balanced 70 python bench/bench_prefix.py --quick --scenarios itl --models llama-3-8b --itl-default-only --balanced-decode-graphs --out "$R/itl3_balanced"
# GPU tests of the engine paths: the new full-batch bucket, balanced decode graphs, mixed graphs
run pytest_gpu 200 python -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests/test_gpu_engine.py tests/test_gpu_mixed_graphs.py
s done
