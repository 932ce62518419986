"""Where a batch-1 TTFT goes: wall(1 token) through ``LLM.generate`` for a few prompt lengths, with each
engine step's host time (until ``execute`` returned) and synchronized time, and Python's GC pauses.

    python bench/ttft_trace.py                                    # Llama-2-7B fp16, 128 and 1024 tokens
    python bench/ttft_trace.py --llm-kw '{"cuda_graph_mixed": false}' --gc-freeze

Every run uses a fresh prompt (the prefix cache is reset and the tokens change), medians of --repeats after
one warm-up. A step whose host time is close to its synchronized time is host-bound (the eager prefill's
launches), one whose synchronized time is larger is device-bound.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--input-lens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--llm-kw", default="{}", help="JSON of extra LLM keyword arguments")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the engine is built")
    args = ap.parse_args()
    from fdpp import LLM, SamplingParams
    from fdpp.engine.model_runner import ModelRunner

    kw = json.loads(args.llm_kw)
    llm = LLM(args.model, dtype=args.dtype, device="cuda", show_progress=False,
              max_model_len=max(args.input_lens) + 64, max_num_seqs=8, **kw)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    pauses: list[float] = []
    t_gc = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            t_gc[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - t_gc[0]) * 1e3)

    gc.callbacks.append(on_gc)
    original = ModelRunner.execute
    steps: list[tuple] = []

    def execute(self, b, *a, **k):
        t = time.perf_counter()
        result = original(self, b, *a, **k)
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        steps.append((len(b.seqs), sum(b.num_new_tokens), round(host * 1e3, 1), round((time.perf_counter() - t) * 1e3, 1)))
        return result

    ModelRunner.execute = execute
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    vocab = min(llm.engine.model_config.vocab_size, 32000)
    for n in args.input_lens:
        walls = []
        for i in range(args.repeats + 1):
            llm.engine.reset_prefix_cache()
            prompt = [(t * 7 + i * 13 + 5) % vocab for t in range(n)]
            steps.clear()
            pauses.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            walls.append((time.perf_counter() - t) * 1e3)
        print(f"{args.model} {kw} gc_freeze={args.gc_freeze} n={n}: wall(1) median {statistics.median(walls[1:]):.1f} ms "
              f"(runs {[round(w, 1) for w in walls[1:]]}); last run's steps (rows, tokens, host ms, synchronized ms) "
              f"{steps}; GC pauses {[round(p, 2) for p in pauses]} ms", flush=True)
    ModelRunner.execute = original
    llm.close()


if __name__ == "__main__":
    main()
