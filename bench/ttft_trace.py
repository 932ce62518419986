"""Where a batch-1 TTFT goes: wall(1 token) through ``LLM.generate`` for a few prompt lengths, with each
engine step's host time (until ``execute`` returned) and synchronized time, and Python's GC pauses.

    python bench/ttft_trace.py                                    # Llama-2-7B fp16, 128 and 1024 tokens
    python bench/ttft_trace.py --llm-kw '{"cuda_graph_mixed": false}' --gc-freeze

Each run computes its prompt (``step_trace.trace_run``: the prefix cache is reset, every step synchronized and
timed), medians of --repeats after one warm-up. A step whose host time is close to its synchronized time is host-bound (the eager prefill's
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



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cuda", help="cuda (the subject) or cpu (a smoke test)")
    ap.add_argument("--input-lens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--llm-kw", default="{}", help="JSON of extra LLM keyword arguments")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the engine is built")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, one more run per length under torch.profiler (device time per kernel, "
                         "the device's busy time) and one under cProfile (host time per Python function)")
    args = ap.parse_args()
    from step_trace import trace_run  # bench/: every engine step timed (host, synchronized)

    from fdpp import LLM

    kw = json.loads(args.llm_kw)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, show_progress=False,
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
    for n in args.input_lens:
        walls = []
        for _ in range(args.repeats + 1):  # trace_run resets the prefix cache: every run computes its prompt
            pauses.clear()
            wall, steps, _ = trace_run(llm, 1, n, 1)
            walls.append(wall * 1e3)
        print(f"{args.model} {kw} gc_freeze={args.gc_freeze} n={n}: wall(1) median {statistics.median(walls[1:]):.1f} ms "
              f"(runs {[round(w, 1) for w in walls[1:]]}); last run's steps (rows, tokens, prefill, synchronized ms, "
              f"host ms, kind) {steps}; GC pauses {[round(p, 2) for p in pauses]} ms", flush=True)
        if args.profile:
            profile_prefill(llm, n)
    gc.callbacks.remove(on_gc)
    llm.close()


def profile_prefill(llm, n: int) -> None:
    """One B1 prefill of ``n`` random tokens under torch.profiler, then one under cProfile: where its device
    and host time go (the prefix cache is reset first, so the prompt is computed)."""
    import cProfile
    import io
    import pstats
    import random

    import torch

    from fdpp import SamplingParams

    rng = random.Random(n)
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def once():
        llm.engine.reset_prefix_cache()
        llm.generate([[rng.randrange(vocab) for _ in range(n)]], params, use_tqdm=False)

    acts = [torch.profiler.ProfilerActivity.CPU]
    cuda = llm.engine.device.type == "cuda"
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        once()
    ka = prof.key_averages()
    if cuda:
        busy = sum(e.self_device_time_total for e in ka) / 1e3
        print(f"--- n={n}: device kernels (busy {busy:.2f} ms, sum of kernel times) ---")
        print(ka.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
    print(f"--- n={n}: host ops by self CPU time ---")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    pr = cProfile.Profile()
    pr.enable()
    once()
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)
    print(f"--- n={n}: cProfile of one generate ---")
    print(buf.getvalue())


if __name__ == "__main__":
    main()
