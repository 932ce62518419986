#!/bin/bash
# The H200 measurements the open issues still need (state of 2026-12-04, 21:00; no GPU was lent that
# evening, so nothing of its changes has run on one), in priority order, each bounded
# so that one device call (< 10 minutes) runs one part. Results go under $OUT/res (and $OUT/res.tgz: a
# device call returns only a few files, so fetch the archive). Run from the repository root:
#     OUT=/tmp/out bash bench/h200_pending.sh 1q     # then 2, 10, 1, 8, 7, 11, 9; 0 and 3-6 re-run the 2026-12-04 evening measurements
# (carry .wheels and .bisect)
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
PART=${1:-1}
if [ "$PART" = 1q ]; then
# 1q. First, the GPU tests of this evening's changes alone (~2-3 min): prefill graphs (paged and TMA routes),
#     the fused rope GEMV and the one-pass norm prologue at real sizes, fuse_rope through the engine.
run pytest_gpu_new 300 python -m pytest -q -m gpu -p no:cacheprovider --durations=10 tests/test_gpu_mixed_graphs.py tests/kernels/test_rotary.py tests/kernels/test_fused_norm.py "tests/test_gpu_engine.py::test_fused_rope_gives_the_unfused_tokens_on_cuda"
fi
if [ "$PART" = 1 ]; then
# 1. (next session) The GPU tests after this session's changes, none of which has run on a GPU yet: the prefill
#    graphs (tests/test_gpu_mixed_graphs.py), the GEMV's one-pass RMSNorm prologue (tests/kernels, GPU-marked
#    ones), the cuBLAS-epilogue change (2026-12-04: 12 of 13 passed before that call's time limit), the
#    sampling-without-sync test.
run pytest_gpu 450 python -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests/test_gpu_engine.py tests/test_gpu_mixed_graphs.py tests/kernels/test_activation.py tests/kernels/test_fused_norm.py tests/kernels/test_gemv.py tests/kernels/test_rotary.py tests/engine/test_backends.py
fi
if [ "$PART" = 2 ]; then
# 2. Issue 12's TTFT with the prefill graphs (cuda_graph_prefill_max_tokens, default 1024): the eager prefill's
#    device-kernel table and host profile at 128 / 512 / 1024 tokens (is the 1k prefill device-bound, and at how
#    many ms?), then issue 12's table with the B1 rows also timed without the prefill graphs (same run).
run ttft_eager_prefill 150 python bench/ttft_trace.py --input-lens 128 512 1024 --repeats 5 --profile --llm-kw '{"cuda_graph_prefill_max_tokens": 0}'
run ttft_graphs 80 python bench/ttft_trace.py --input-lens 128 512 1024 --repeats 5
run e2e_latency 320 python bench/e2e_latency.py --compare-prefill-graphs --budget-s 270 --out "$R"
fi
if [ "$PART" = 8 ]; then
# 8. The GEMV's one-pass RMSNorm prologue (the K loop sums x^2; 2026-12-04 late): the per-M fused vs separate
#    table again (before: fused slower for Llama-3-8B qkv / gate_up and bf16 gate_up at M = 1), then the
#    kernel-by-kernel B1 steps (part 7 without the TTFT profile).
#    The per-shape decision goes into a copy of the shipped table ($R/nvidia-h200.json: copy it back into
#    fdpp/dataflow/tables/ if the table says so).
cp fdpp/dataflow/tables/nvidia-h200.json "$R/"
run fused_norm 100 python bench/bench_fused_norm.py --ms 1 2 4 --update-table "$R/nvidia-h200.json" --out "$R"
run prof_l3_b1 120 python bench/decode_profile.py --model llama-3-8b --dtype bfloat16 --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l3_b1_in1024 --out "$R"
run prof_l2_b1 100 python bench/decode_profile.py --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l2_b1_in1024 --out "$R"
# the projections' bandwidth in the engine, eager (kernel durations as in the graphs; o / down were 3.1 / 3.7 TB/s alone)
run prof_l3_b1_mod 100 python bench/decode_profile.py --model llama-3-8b --dtype bfloat16 --batch 1 --input-len 1024 --steps 10 --timed-steps 10 --eager --by-module --tag l3_b1_in1024_by_module --out "$R"
fi
if [ "$PART" = 10 ]; then
# 10. The qkv GEMV with RoPE + the KV-cache write in its epilogue (fuse_rope, opt-in): the rope_store_kv kernel
#     (93 us a B1 step on 2026-12-04) should leave the table; then the B1 wall clock with it on
run prof_l2_b1_rope 100 python bench/decode_profile.py --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l2_b1_in1024_fuse_rope --llm-kw '{"fuse_rope": true}' --out "$R"
run prof_l3_b1_rope 120 python bench/decode_profile.py --model llama-3-8b --dtype bfloat16 --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l3_b1_in1024_fuse_rope --llm-kw '{"fuse_rope": true}' --out "$R"
mkdir -p "$R/rope"; run e2e_rope 170 env FDPP_FUSED_ROPE=1 python bench/e2e_latency.py --quick --budget-s 140 --out "$R/rope"
#     Llama-3-8B bf16's qkv is cuBLAS at M = 1 in the shipped table (16.31 vs the GEMV's 16.38 us, a tie), so neither its
#     norm nor fuse_rope fuses there: the same profile with the GEMV at M = 1 (an override table), fused rope on
python bench/table_override.py --dtype bfloat16 --n 6144 --k 4096 --m 1 --impl gemv --config '{"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2, "PREFETCH": true}' --out /tmp/l3_qkv_gemv.json
#     The prefill graphs with the TMA prefill kernel for fresh prompts (FDPP_PREFILL_GRAPH_TMA=1, an experiment):
#     TTFT against part 2's ttft_graphs run (the paged route)
run ttft_graphs_tma 80 env FDPP_PREFILL_GRAPH_TMA=1 python bench/ttft_trace.py --input-lens 128 512 1024 --repeats 5
run prof_l3_b1_rope_gemv 110 env FDPP_DATAFLOW_TABLE=/tmp/l3_qkv_gemv.json python bench/decode_profile.py --model llama-3-8b --dtype bfloat16 --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l3_b1_in1024_fuse_rope_qkv_gemv --llm-kw '{"fuse_rope": true}' --out "$R"
fi
if [ "$PART" = 9 ]; then
# 9. Issue 11: the decode kernel on the full grid, fp16 (B64 x 1k MHA: 268 us a layer in the engine on 2026-12-04,
#    bench/decode_profile.py; 252.9 us unified / 246.8 sync / 236.6 cuDNN in the kernel bench on 2026-11-26):
#    the kernel alone at large batches, and unified vs synchronized at every point.
run attn_decode 400 python bench/bench_attention.py --skip-prefill --dtypes fp16 --out "$R/attn"
run b64 150 python bench/step_trace.py --variants default sync_softmax --budget-s 120 --out "$R"
fi
if [ "$PART" = 11 ]; then
# 11. Issue 12's GEMM target, a fresh check run of the shipped table (no tuning; 2026-12-04: not re-run since
#     2026-11-26's 1.028x / 86-97% / 0.958).
run gemm_check 560 python bench/bench_gemm.py --table fdpp/dataflow/tables/nvidia-h200.json --no-check --time-budget 500 --results-dir "$R/gemm"
fi
if [ "$PART" = 0 ]; then
# (done 2026-12-04 evening) B64 x 1024 with the 2026-11-26 tree (9923ff0) and this one, back to back, each with
# e2e.py --profile. Make the old tree once, here (carry .bisect too):
#      echo /.bisect/ >> .git/info/exclude; mkdir -p .bisect
#      git archive --format=tar 9923ff0 fdpp bench/e2e.py pyproject.toml > .bisect/fdpp_9923ff0.tar
if [ -f .bisect/fdpp_9923ff0.tar ]; then
  mkdir -p /tmp/old && tar xf .bisect/fdpp_9923ff0.tar -C /tmp/old
  run b64_old 150 env -C /tmp/old PYTHONPATH=/tmp/pydeps:/tmp/old python bench/e2e.py --models llama-2-7b --batch-sizes 64 --input-lens 1024 --profile --out "$R/old"
  run b64_new 150 python bench/e2e.py --models llama-2-7b --batch-sizes 64 --input-lens 1024 --profile --out "$R/new"
fi
run itl 80 python bench/bench_prefix.py --quick --scenarios itl --models llama-2-7b --itl-default-only --out "$R/itl"
fi
if [ "$PART" = 3 ]; then
# The B64 x 1024 decode step kernel by kernel (bench/decode_profile.py: distinct random prompts, so attention
# reads HBM; e2e.py --profile used identical prompts then, which share their KV through the prefix cache): the 2026-11-26 tree
# against this one, graphs on, then this one's variants.
if [ -f .bisect/fdpp_9923ff0.tar ]; then
  mkdir -p /tmp/old && tar xf .bisect/fdpp_9923ff0.tar -C /tmp/old
  run prof_old 90 env PYTHONPATH=/tmp/pydeps:/tmp/old python bench/decode_profile.py --tag old_9923ff0 --out "$R"
fi
run prof_new 90 python bench/decode_profile.py --tag default --out "$R"
run prof_nofuse 90 python bench/decode_profile.py --tag no_fused_norm --llm-kw '{"fuse_norm": false}' --out "$R"
run prof_sync 90 python bench/decode_profile.py --tag sync_softmax --llm-kw '{"attention_backend": "triton-sync"}' --out "$R"
run prof_noasync 90 python bench/decode_profile.py --tag no_async --llm-kw '{"async_scheduling": false}' --out "$R"
run prof_eager 90 python bench/decode_profile.py --tag eager --eager --out "$R"
fi
if [ "$PART" = 4 ]; then
# The fused-norm rule (fdpp.ops.linear.fuses_norm: the GEMV only) and the sampled-decode sync fix: the per-M
# evidence, the decode step kernel by kernel at B64 / B8 / B1, the GPU engine tests.
run fused_norm 100 python bench/bench_fused_norm.py --ms 1 2 4 8 12 16 24 32 48 64 --out "$R"
run prof_b64 80 python bench/decode_profile.py --tag b64_greedy --out "$R"
run prof_b64_sampled 80 python bench/decode_profile.py --tag b64_sampled --temperature 1 --out "$R"
run prof_b8 60 python bench/decode_profile.py --batch 8 --tag b8_greedy --out "$R"
run prof_b1 60 python bench/decode_profile.py --batch 1 --input-len 128 --steps 20 --timed-steps 60 --tag b1_in128_greedy --out "$R"
run pytest_gpu 180 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_mixed_graphs.py tests/engine/test_backends.py
fi
if [ "$PART" = 5 ]; then
# Issue 12's figures, wall clock through LLM.generate, with transformers' static cache in the same run.
run e2e_latency 560 python bench/e2e_latency.py --peers --budget-s 420 --out "$R"
fi
if [ "$PART" = 6 ]; then
# The cuBLAS path's epilogues (silu_and_mul in one Triton pass, residual inside addmm): GPU tests, then
# issue 12's figures again (no peers: the transformers figures of part 5 stand).
run pytest_gpu 130 python -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_activation.py tests/test_gpu_engine.py
run e2e_latency 170 python bench/e2e_latency.py --budget-s 140 --out "$R"
fi
if [ "$PART" = 7 ]; then
# (2026-12-04 late) Diagnosis of issue 12's B1 misses: where the prefill's host and device time go (TTFT),
# and the Llama-3-8B bf16 B1 decode step kernel by kernel beside Llama-2-7B's.
run ttft_prof 200 python bench/ttft_trace.py --input-lens 128 1024 --repeats 3 --profile
run prof_l3_b1 120 python bench/decode_profile.py --model llama-3-8b --dtype bfloat16 --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l3_b1_in1024 --out "$R"
run prof_l2_b1 100 python bench/decode_profile.py --batch 1 --input-len 1024 --steps 20 --timed-steps 60 --tag l2_b1_in1024 --out "$R"
fi
s done
