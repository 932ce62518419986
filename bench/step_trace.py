"""Where does a batch's wall clock go? A synchronized trace of every engine step, beside the wall-clock
decode figure, for a few engine variants in one process.

    python bench/step_trace.py --out $OUT                         # Llama-2-7B, B64 x 1024, 32 tokens
    python bench/step_trace.py --model <gguf or folder> --device cpu --batch 4 --input-len 64 --output-len 4

Why it exists: on 2026-12-03 (H200) Llama-2-7B B64 x 1024 decoded at 1100 tok/s by the wall-clock
definition (B x (N-1) / (wall(N) - wall(1))) while its decode steps alone would give ~4500: in the N-token
run every request had its first token only after 5.55 s, against 1.65 s for wall(1). This script records
each step's rows, tokens, kind (prefill / mixed / decode) and synchronized duration to find the slow steps.
Each variant: its wall-clock figures, the unified-softmax fallback rate, the step trace of one N-token run.
Writes step_trace_<gpu>_<date>.json under --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fdpp import LLM, SamplingParams  # noqa: E402
from fdpp.benchmark import wall_clock_decode  # noqa: E402
from fdpp.engine.model_runner import ModelRunner  # noqa: E402
from fdpp.ops.attention import fallback_stats, reset_fallback_stats  # noqa: E402

VARIANTS = {
    "default": {},
    "no_async": {"async_scheduling": False},
    "sync_softmax": {"attention_backend": "triton-sync"},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "no_chunk_cap": {"long_prefill_token_threshold": 0},
    # mixed steps (decode rows + one prompt chunk) run eagerly instead of replaying their CUDA graph
    "no_mixed_graphs": {"cuda_graph_mixed": False},
    # one prompt chunk per step (the mixed graphs' shape), with and without the mixed graphs
    "one_partial": {"max_num_partial_prefills": 1},
    "one_partial_no_mixed_graphs": {"max_num_partial_prefills": 1, "cuda_graph_mixed": False},
}


def trace_run(llm: LLM, batch: int, input_len: int, output_len: int,
              profile_steps: int = 0) -> tuple[float, list[tuple], str | None]:
    """One generate of ``batch`` random prompts; every model step synchronized and timed:
    (rows, tokens, is_prefill, ms, host_ms, kind), host_ms being the time until ``execute`` returned (the
    launch), before the synchronize; kind: "prefill", "decode", "mixed" (decode rows and prompt chunks,
    eager), "mixed_graph" (a mixed graph replayed) or "prefill_graph" (a prefill graph replayed).
    ``profile_steps`` > 0: torch-profile that many mixed steps (from
    the second step on) and return the profiler's tables (by device time and by host time)."""
    dev = llm.engine.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps: list[tuple] = []
    original = ModelRunner.execute
    prof = None
    profiled_steps = 0
    tables: list[str] = []

    def execute(self, b, device_tokens=None, before_sample=None):
        nonlocal prof, profiled_steps
        profiled = profile_steps and b.is_prefill and len(steps) >= 1 and not tables
        if profiled and prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if dev.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
        sync()
        t = time.perf_counter()
        replays, prefill_replays = self.num_mixed_replays, getattr(self, "num_prefill_replays", 0)
        result = original(self, b, device_tokens, before_sample)
        host = time.perf_counter() - t
        sync()
        nd = ModelRunner.num_decode_rows(b)
        kind = ("mixed_graph" if self.num_mixed_replays > replays else "mixed" if 0 < nd < len(b)
                else "prefill_graph" if getattr(self, "num_prefill_replays", 0) > prefill_replays
                else "prefill" if b.is_prefill else "decode")
        steps.append((len(b.seqs), sum(b.num_new_tokens), bool(b.is_prefill), round((time.perf_counter() - t) * 1e3, 2),
                      round(host * 1e3, 2), kind))
        if prof is not None and profiled:
            profiled_steps += 1
            if profiled_steps >= profile_steps:
                prof.__exit__(None, None, None)
                ka = prof.key_averages()
                for key in (("cuda_time_total",) if dev.type == "cuda" else ()) + ("cpu_time_total",):
                    tables.append(f"--- {profile_steps} mixed steps, by {key} ---\n" + ka.table(sort_by=key, row_limit=25))
                prof = None
        return result

    rng = random.Random(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(batch)]
    llm.engine.reset_prefix_cache()
    ModelRunner.execute = execute
    try:
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)
        wall = time.perf_counter() - t0
    finally:
        ModelRunner.execute = original
        if prof is not None:
            prof.__exit__(None, None, None)
    return wall, steps, "\n".join(tables) or None


def _mixed_summary(steps: list[tuple]) -> dict:
    """Mixed steps (decode rows + prompt chunks) of a trace: how many replayed a mixed graph, how many
    ran eagerly, and their mean synchronized and host (launch) times in ms."""
    out = {}
    for kind in ("mixed_graph", "mixed"):
        sel = [s for s in steps if s[5] == kind]
        out[kind] = {"steps": len(sel),
                     "mean_ms": round(sum(s[3] for s in sel) / len(sel), 2) if sel else None,
                     "mean_host_ms": round(sum(s[4] for s in sel) / len(sel), 2) if sel else None}
    return out


def targets(result: dict, model: str, batch: int, input_len: int) -> list[dict]:
    """The figures a trace checks (issue #12's batch-64 wall clock, #13's mixed steps), where its
    variants measured them: the default engine's wall-clock decode against no chunk cap at all and
    against no mixed graphs (neither may cost the batch anything), and a graphed mixed step against
    eager mixed steps of at most its size."""
    runs = {k: v for k, v in result["variants"].items() if "steps" in v}
    out = []
    default = runs.get("default")
    for other, why in (("no_chunk_cap", "the long-prefill cap"), ("no_mixed_graphs", "the mixed graphs")):
        if default and other in runs:
            ratio = default["wall_decode_tokens_per_s"] / runs[other]["wall_decode_tokens_per_s"]
            out.append({"name": f"e2e.{model}.b{batch}_in{input_len}.wall_decode_vs_{other}", "value": round(ratio, 3),
                        "goal": f">= 0.98 ({why} cost the batch nothing)", "met": ratio >= 0.98})
    # synchronized decode steps of the full batch: the unified softmax against the synchronized one (#11:
    # the unified path must not be slower), the prefix cache off against on (#13: no regression)
    def decode_ms(v: dict) -> float | None:
        full = [st[3] for st in v["steps"] if len(st) > 5 and st[5] == "decode" and st[0] == batch]
        return statistics.median(full) if full else None

    ours = decode_ms(default) if default else None
    if ours:
        for other, name, limit, why in (
                ("sync_softmax", f"attention.{model}.b{batch}_in{input_len}.decode_step_unified_over_sync", 1.0,
                 "the unified softmax's decode step no slower than the synchronized one's"),
                ("no_prefix_cache", f"prefix.{model}.b{batch}_in{input_len}.decode_step_cache_off_over_on", 1.02,
                 "prefix caching off: no slower decode step")):
            theirs = decode_ms(runs[other]) if other in runs else None
            if theirs:
                ratio = ours / theirs if other == "sync_softmax" else theirs / ours
                out.append({"name": name, "value": round(ratio, 3), "goal": f"<= {limit} ({why})",
                            "met": ratio <= limit})
    steps = [st for v in runs.values() for st in v["steps"] if len(st) > 5]
    graphed = [st for st in steps if st[5] == "mixed_graph"]
    if graphed:
        size = max(st[1] for st in graphed)
        eager = [st[3] for st in steps if st[5] == "mixed" and st[1] <= size]
        if eager:
            speedup = statistics.median(eager) / statistics.median(st[3] for st in graphed)
            out.append({"name": f"prefix.{model}.mixed_step_graph_speedup", "value": round(speedup, 2),
                        "goal": f">= 2x (medians over mixed steps of <= {size} tokens: a graphed one is not "
                                "bound by its kernel launches)", "met": speedup >= 2})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 elsewhere")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="torch-profile this many mixed steps of the first variant; print the tables")
    ap.add_argument("--budget-s", type=float, default=120.0, help="start no new variant after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    base = dict(dtype=dtype, device=args.device, max_num_seqs=args.batch, show_progress=False,
                max_model_len=args.input_len + args.output_len + 16,
                max_num_batched_tokens=max(args.max_num_batched_tokens, args.input_len))
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "argv": sys.argv[1:], "variants": {}}
    t00 = time.time()
    for name in args.variants:
        if time.time() - t00 > args.budget_s:
            result["variants"][name] = {"skipped": "budget"}
            continue
        kw = VARIANTS[name] if args.device == "cuda" or name != "sync_softmax" else {}
        llm = LLM(args.model, **base, **kw)
        try:
            reset_fallback_stats()
            w = wall_clock_decode(llm, args.batch, args.input_len, args.output_len, repeats=1)
            st = fallback_stats()
            wall, steps, tables = trace_run(llm, args.batch, args.input_len, args.output_len,
                                            args.profile_steps if name == args.variants[0] else 0)
            w.update(fallback_rate=st.get("rate"), trace_wall_s=round(wall, 3), steps=steps,
                     prefill_steps_ms=sum(s[3] for s in steps if s[2]),  # prefill or mixed
                     decode_steps_ms=sum(s[3] for s in steps if not s[2]),
                     prefill_steps_host_ms=sum(s[4] for s in steps if s[2]), profile=tables,
                     mixed_steps=_mixed_summary(steps),
                     stats=llm.engine.stats())
            result["variants"][name] = w
            print(f"{name}: wall TTFT {w['wall_ttft_ms']:.0f} ms, wall decode {w['wall_decode_tokens_per_s']:.0f} tok/s; "
                  f"traced run {wall:.2f} s = prefill/mixed steps {w['prefill_steps_ms']:.0f} ms + decode steps "
                  f"{w['decode_steps_ms']:.0f} ms; fallback rate {w['fallback_rate']}", flush=True)
            print("  first steps (rows, tokens, prefill, ms, host ms, kind):", steps[:12], flush=True)
            print("  mixed steps:", w["mixed_steps"], flush=True)
            if tables:
                print(tables, flush=True)
        finally:
            llm.close()
            del llm
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    label = os.path.splitext(os.path.basename(args.model.rstrip("/")))[0]  # a preset name, or a file's stem
    result["targets"] = targets(result, label, args.batch, args.input_len)
    for t in result["targets"]:
        print(f"target {t['name']}: {t['value']} (goal {t['goal']}) met={t['met']}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"step_trace_{gpu.replace(' ', '_')}_{result['date'][:10]}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
