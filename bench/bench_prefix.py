"""Prefix caching, shared prompts and mixed prefill + decode steps (issue 13), through the public API.

    python bench/bench_prefix.py --quick --out $OUT                       # ~3 min on an H200
    python bench/bench_prefix.py --out $OUT                               # the issue's full sizes
    python bench/bench_prefix.py --quick --models smollm2-135m --device cpu   # CPU smoke test

Random-weight presets (llama-2-7b fp16, llama-3-8b bf16 by default), random token prompts, wall clock
around LLMEngine.add_request / step. Scenarios, each against its target:

- shared: N requests of one shared system prompt + unique tokens, all arriving at once; time to first
  token p50 and total throughput (prompt + output tokens / s) with the prefix cache on vs off
  (targets: TTFT p50 >= 4x lower, throughput >= 1.5x higher).
- multiturn: conversations whose every turn resends the history; prompt tokens computed / sent
  (target <= 20%).
- itl: a long prompt arrives while streams decode; the streams' inter-token latency p99 around the
  prefill vs the median step time before it arrived (target <= 3x), for each step token budget.
- decode: batch-1 and batch-64 decode step with the cache off, against the committed H200 results of
  main in bench/results (target: <= 2% slower), and with the cache on.

Writes prefix_<gpu>_<date>.json (GPU, date, versions, every measurement, "targets"), .md and .png.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import glob
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fdpp import LLM, SamplingParams  # noqa: E402
from fdpp.benchmark import triton_compiles  # noqa: E402

DTYPES = {"llama-2-7b": "float16", "llama-3-8b": "bfloat16"}
# scenario sizes: the issue's (full), a ~3-minute GPU run (quick), a CPU smoke test (cpu)
SIZES = {
    "full": dict(shared_n=256, shared_sys=2000, shared_uniq=50, shared_out=128, shared_seqs=256,
                 mt_convs=32, mt_turns=8, mt_sys=256, mt_user=64, mt_reply=64,
                 itl_streams=32, itl_long=16384, itl_budgets=[(None, None), (None, 128), (None, 0), (512, 0)], decode=True),
    "quick": dict(shared_n=128, shared_sys=2000, shared_uniq=50, shared_out=64, shared_seqs=128,
                  mt_convs=16, mt_turns=8, mt_sys=256, mt_user=64, mt_reply=32,
                  itl_streams=32, itl_long=16384, itl_budgets=[(None, None), (None, 128), (None, 0), (512, 0)],
                  decode=True),
    "cpu": dict(shared_n=8, shared_sys=192, shared_uniq=16, shared_out=8, shared_seqs=8,
                mt_convs=4, mt_turns=3, mt_sys=32, mt_user=16, mt_reply=8,
                itl_streams=4, itl_long=768, itl_budgets=[(None, None), (128, 0)], decode=False),
}


def log(*a) -> None:
    print(*a, flush=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = SIZES[args.size]
        self.rng = random.Random(0)
        self.out: dict = {
            "gpu": torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "argv": sys.argv[1:], "size": args.size, "sizes": self.size,
            "runs": {}, "targets": [],
        }
        try:
            import triton

            self.out["triton"] = triton.__version__
        except ImportError:
            self.out["triton"] = None

    # ---- helpers --------------------------------------------------------------------------------------
    def llm(self, model: str, caching: bool, max_len: int, max_num_seqs: int, budget: int | None = None,
            long_prefill: int | None = None) -> LLM:
        t0 = time.time()
        kw = {"dtype": DTYPES[model]} if model in DTYPES and self.args.device != "cpu" else {}
        if getattr(self.args, "no_mixed_graphs", False):
            kw["cuda_graph_mixed"] = False
        if getattr(self.args, "no_balanced_decode_graphs", False):
            kw["cuda_graph_balanced_decode"] = False
        llm = LLM(model, device=self.args.device, enable_prefix_caching=caching, max_model_len=max_len,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, long_prefill_token_threshold=long_prefill,
                  show_progress=False, **kw)
        eng = llm.engine
        log(f"  engine {model} caching={caching} budget={eng.max_num_batched_tokens} "
            f"long_prefill={eng.scheduler.long_prefill_token_threshold} max_len={max_len} "
            f"seqs={max_num_seqs}: {eng.block_manager.num_blocks} blocks, ready in {time.time() - t0:.1f}s")
        # Warm-up, then forget the cache: Triton compiles a kernel variant the first time it sees it
        # (seconds each), which must not land inside a timed scenario. Short prompts that keep decoding
        # while the longest prompt the engine takes is chunked (mixed steps over a long context), then a
        # group that shares a prefix (prefill rows reading cached blocks), at every batch size class.
        vocab = eng.model_config.vocab_size
        warm = [[self.rng.randrange(vocab) for _ in range(min(n, max_len - 8))] for n in (7, 40, 300, max_len - 8)]
        llm.generate(warm, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
        shared = self.tokens(vocab, min(max_len // 2, 2048))
        group = [shared + self.tokens(vocab, 50) for _ in range(min(max_num_seqs, 64))]
        llm.generate(group, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        eng.reset_prefix_cache()
        log(f"  warm-up done in {time.time() - t0:.1f}s")
        return llm

    @staticmethod
    def close(llm: LLM) -> None:
        llm.close()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def tokens(self, vocab: int, n: int) -> list[int]:
        return [self.rng.randrange(vocab) for _ in range(n)]

    @staticmethod
    def sync(llm: LLM) -> None:
        if llm.engine.device.type == "cuda":
            torch.cuda.synchronize(llm.engine.device)

    def run_batch(self, llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
        """All prompts arrive at once; run to completion. TTFT from arrival, wall clock."""
        eng = llm.engine
        before = eng.stats()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind="final_only")
        self.sync(llm)
        t0 = time.perf_counter()
        now = time.time()
        for p in prompts:
            eng.add_request(None, p, params, arrival_time=now)
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.finished]
        self.sync(llm)
        dt = time.perf_counter() - t0
        after = eng.stats()
        ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(len(p) for p in prompts)
        return {
            "requests": len(prompts), "elapsed_s": dt, "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90),
            "prompt_tokens": n_in, "output_tokens": n_out, "output_tokens_per_s": n_out / dt,
            "total_tokens_per_s": (n_in + n_out) / dt,
            "prefill_tokens_computed": after["num_prefill_tokens"] - before["num_prefill_tokens"],
            "prefix_cache_queries": after["prefix_cache_queries"] - before["prefix_cache_queries"],
            "prefix_cache_hits": after["prefix_cache_hits"] - before["prefix_cache_hits"],
            "preemptions": after["num_preemptions"] - before["num_preemptions"],
            "outputs": outs,
        }

    def target(self, model: str, name: str, value: float, goal: str, met: bool, **extra) -> None:
        t = {"name": f"prefix.{model}.{name}", "value": value, "goal": goal, "met": bool(met), "model": model,
             "what": name, **extra}
        self.out["targets"].append(t)
        log(f"  TARGET {name}: {value:.3f} (target {goal}) -> {'met' if met else 'MISSED'}")

    def write(self) -> str:
        os.makedirs(self.args.out, exist_ok=True)
        gpu = self.out["gpu"].replace(" ", "_")
        base = os.path.join(self.args.out, f"prefix_{gpu}_{datetime.date.today().isoformat()}")
        with open(base + ".json", "w") as f:
            json.dump(self.out, f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(self.markdown())
        try:
            self.plot(base + ".png")
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
            log(f"plot skipped: {type(e).__name__}: {e}")
        return base

    # ---- scenarios ------------------------------------------------------------------------------------
    def shared(self, model: str) -> None:
        s = self.size
        log(f"[{model}] shared system prompt: {s['shared_n']} x ({s['shared_sys']} shared + {s['shared_uniq']} "
            f"unique), {s['shared_out']} out")
        max_len = s["shared_sys"] + s["shared_uniq"] + s["shared_out"] + 16
        res = {}
        prompts = None
        mt_len = s["mt_sys"] + s["mt_turns"] * (s["mt_user"] + s["mt_reply"]) + 16
        for caching in (True, False):
            if caching and "multiturn" in self.args.scenarios:
                max_len = max(max_len, mt_len)  # one engine for both scenarios
            llm = self.llm(model, caching, max_len, s["shared_seqs"])
            if prompts is None:
                vocab = llm.engine.model_config.vocab_size
                system = self.tokens(vocab, s["shared_sys"])
                prompts = [system + self.tokens(vocab, s["shared_uniq"]) for _ in range(s["shared_n"])]
            r = self.run_batch(llm, prompts, s["shared_out"])
            res["on" if caching else "off"] = r
            log(f"  caching={caching}: TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms, {r['total_tokens_per_s']:.0f} tok/s "
                f"total ({r['output_tokens_per_s']:.0f} out), {r['elapsed_s']:.1f} s, hits {r['prefix_cache_hits']}"
                f"/{r['prefix_cache_queries']}, computed {r['prefill_tokens_computed']}, "
                f"preemptions {r['preemptions']}")
            if caching and "multiturn" in self.args.scenarios:
                self.multiturn(model, llm)
            self.close(llm)
        same = all(a.outputs[0].token_ids == b.outputs[0].token_ids
                   for a, b in zip(sorted(res["on"].pop("outputs"), key=lambda o: int(o.request_id)),
                                   sorted(res["off"].pop("outputs"), key=lambda o: int(o.request_id))))
        res["greedy_outputs_equal"] = same
        self.out["runs"].setdefault(model, {})["shared"] = res
        ttft_x = res["off"]["ttft_p50_s"] / res["on"]["ttft_p50_s"]
        thr_x = res["on"]["total_tokens_per_s"] / res["off"]["total_tokens_per_s"]
        self.target(model, "shared_prompt_ttft_p50_speedup", ttft_x, ">= 4x", ttft_x >= 4)
        self.target(model, "shared_prompt_throughput_speedup", thr_x, ">= 1.5x", thr_x >= 1.5)

    def multiturn(self, model: str, llm: LLM | None = None) -> None:
        s = self.size
        log(f"[{model}] multi-turn: {s['mt_convs']} conversations x {s['mt_turns']} turns")
        own = llm is None
        if own:
            max_len = s["mt_sys"] + s["mt_turns"] * (s["mt_user"] + s["mt_reply"]) + 16
            llm = self.llm(model, True, max_len, max(s["mt_convs"], 1))
        llm.engine.reset_prefix_cache()
        vocab = llm.engine.model_config.vocab_size
        system = self.tokens(vocab, s["mt_sys"])
        history = [list(system) for _ in range(s["mt_convs"])]
        turns = []
        for t in range(s["mt_turns"]):
            prompts = [h + self.tokens(vocab, s["mt_user"]) for h in history]
            r = self.run_batch(llm, prompts, s["mt_reply"])
            for i, o in enumerate(sorted(r.pop("outputs"), key=lambda o: int(o.request_id))):
                history[i] = prompts[i] + o.outputs[0].token_ids
            turns.append(r)
            log(f"  turn {t + 1}: sent {r['prompt_tokens']}, computed {r['prefill_tokens_computed']} "
                f"({r['prefill_tokens_computed'] / r['prompt_tokens']:.1%}), {r['elapsed_s']:.2f} s")
        if own:
            self.close(llm)
        sent = sum(r["prompt_tokens"] for r in turns)
        computed = sum(r["prefill_tokens_computed"] for r in turns)
        self.out["runs"].setdefault(model, {})["multiturn"] = {"turns": turns, "prompt_tokens_sent": sent,
                                                               "prefill_tokens_computed": computed}
        self.target(model, "multiturn_prefill_fraction", computed / sent, "<= 0.20", computed / sent <= 0.20)

    def itl(self, model: str) -> None:
        s = self.size
        n, long_len = s["itl_streams"], s["itl_long"]
        res = {}
        configs = s["itl_budgets"][:1] if self.args.itl_default_only else s["itl_budgets"]
        for budget, long_prefill in configs:
            stream_out = 4096  # more than the run lasts: the streams decode throughout
            max_len = long_len + 64
            llm = self.llm(model, True, max_len, n + 1, budget, long_prefill)
            eng = llm.engine
            cap = eng.scheduler.long_prefill_token_threshold
            key = f"budget_{eng.max_num_batched_tokens}_cap_{cap}"
            log(f"[{model}] {long_len}-token prompt while {n} streams decode, budget {eng.max_num_batched_tokens}, "
                f"long-prefill cap {cap or 'none'}")
            vocab = eng.model_config.vocab_size
            params = SamplingParams(temperature=0, max_tokens=stream_out, ignore_eos=True)
            streams = [eng.add_request(None, self.tokens(vocab, 128), params) for _ in range(n)]
            counts = dict.fromkeys(streams, 0)
            last_time = dict.fromkeys(streams, 0.0)
            itls: list[tuple[float, float]] = []  # (time, gap)
            steps: list[tuple[float, float]] = []  # (end time, step duration)
            long_rid, long_at, long_first = None, None, None
            steady_steps = 40
            k = 0
            with triton_compiles() as compiles:  # a JIT compile inside the window is a stall to report
                while True:
                    t_s = time.perf_counter()
                    outs = eng.step()
                    t_e = time.perf_counter()  # the step's tokens are on the host: no extra sync needed
                    steps.append((t_e, t_e - t_s))
                    for o in outs:
                        if o.request_id in counts:
                            c = len(o.outputs[0].token_ids)
                            if c > counts[o.request_id]:
                                if counts[o.request_id] > 0:
                                    itls.append((t_e, t_e - last_time[o.request_id]))
                                counts[o.request_id], last_time[o.request_id] = c, t_e
                        elif o.request_id == long_rid and long_first is None and o.outputs[0].token_ids:
                            long_first = t_e
                    k += 1
                    if long_rid is None and all(counts.values()) and k >= steady_steps:
                        long_rid = eng.add_request(None, self.tokens(vocab, long_len),
                                                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                        long_at = time.perf_counter()
                        steady_end = len(steps)
                    if long_first is not None and time.perf_counter() - long_first > 0.25:
                        break
            for rid in streams:
                eng.abort_request(rid)
            while eng.has_unfinished_requests():
                eng.step()
            steady = [d for _, d in steps[steady_end - 20:steady_end]]
            window = [g for t, g in itls if long_at <= t <= long_first + 1e-9]
            steady_itl = [g for t, g in itls if t < long_at][-20 * n:]
            r = {
                "budget": eng.max_num_batched_tokens, "long_prefill_cap": cap, "streams": n, "long_prompt": long_len,
                "steady_step_ms_median": statistics.median(steady) * 1e3,
                "steady_itl_p99_ms": pct(steady_itl, 99) * 1e3,
                "prefill_window_itl_p50_ms": pct(window, 50) * 1e3,
                "prefill_window_itl_p99_ms": pct(window, 99) * 1e3,
                "prefill_window_itl_max_ms": max(window) * 1e3 if window else float("nan"),
                "long_prompt_ttft_s": long_first - long_at,
                # the long prompt's next 3 tokens: decode steps with one 16k row among the short streams
                "long_row_decode_steps_ms": [d * 1e3 for t, d in steps if t > long_first + 1e-9][:3],
                "prefill_steps": sum(1 for t, _ in steps if long_at <= t <= long_first + 1e-9),
                "step_trace_ms": [(t - long_at, d * 1e3) for t, d in steps[max(0, steady_end - 20):]],
                # Triton JIT compiles (each a stall of ~1 s) during the run: the kernel signatures
                "triton_compiles": [(round(t - long_at, 3), sig[:4000]) for t, sig in compiles],
            }
            res[key] = r
            ratio = r["prefill_window_itl_p99_ms"] / r["steady_step_ms_median"]
            log(f"  steady step {r['steady_step_ms_median']:.2f} ms; ITL during the prefill p50 "
                f"{r['prefill_window_itl_p50_ms']:.1f} / p99 {r['prefill_window_itl_p99_ms']:.1f} ms "
                f"({ratio:.2f}x); long prompt TTFT {r['long_prompt_ttft_s']:.2f} s in {r['prefill_steps']} steps")
            log(f"  decode steps with the long row: {', '.join(f'{d:.1f}' for d in r['long_row_decode_steps_ms'])} ms")
            for t, sig in r["triton_compiles"]:
                log(f"  Triton compile at {t:+.2f} s (from the long prompt's arrival): {sig[:300]}")
            self.target(model, "long_prompt_itl_p99_over_steady_step", ratio, "<= 3x", ratio <= 3,
                        budget=eng.max_num_batched_tokens, long_prefill_cap=cap,
                        is_default=budget is None and long_prefill is None)
            self.close(llm)
        self.out["runs"].setdefault(model, {})["itl"] = res

    def decode(self, model: str) -> None:
        """Batch-1 and batch-64 decode with the cache off (and on) against main's committed results."""
        from fdpp.benchmark import run_latency

        baseline = _baselines(model)
        # one prompt length per model, with a batch-1 and a batch-64 figure of main to compare with
        n_in, n_out = (512, 64) if model == "llama-3-8b" else (1024, 128)
        rows = []
        for caching in (False, True) if self.args.size == "full" else (False,):
            # the settings of bench/e2e.py (decode graphs are captured for max_model_len, so it must match)
            llm = LLM(model, device=self.args.device, dtype=DTYPES.get(model, "auto"), max_num_seqs=64,
                      max_model_len=n_in + n_out + 16, max_num_batched_tokens=max(8192, n_in),
                      enable_prefix_caching=caching, show_progress=False)
            for bs in (1, 64):
                r = run_latency(llm, model, bs, n_in, n_out).as_dict()
                base = baseline.get((bs, n_in))
                r.update(caching=caching, baseline_step_ms=base[0] if base else None,
                         baseline_file=base[1] if base else None)
                rows.append(r)
                rel = f", main {base[0]:.3f} ms ({r['decode_step_ms'] / base[0] - 1:+.1%})" if base else ""
                log(f"[{model}] decode caching={caching} bs={bs} in={n_in}: step {r['decode_step_ms']:.3f} ms{rel}")
                if base and not caching:
                    slow = r["decode_step_ms"] / base[0] - 1
                    self.target(model, f"decode_bs{bs}_in{n_in}_cache_off_vs_main", slow, "<= +2%", slow <= 0.02,
                                baseline_file=base[1])
            self.close(llm)
        self.out["runs"].setdefault(model, {})["decode"] = rows

    # ---- report ---------------------------------------------------------------------------------------
    def markdown(self) -> str:
        o = self.out
        lines = [f"# Prefix caching, shared prompts, mixed steps: {o['gpu']}, {o['date']}", "",
                 f"torch {o['torch']}, triton {o['triton']}; sizes `{o['size']}`; `{' '.join(o['argv'])}`", "",
                 "## Targets", "", "| model | target | value | goal | met |", "|---|---|---|---|---|"]
        for t in o["targets"]:
            extra = (f" (budget {t['budget']}, long-prefill cap {t.get('long_prefill_cap') or 'none'}"
                     f"{', the default' if t.get('is_default') else ''})" if "budget" in t else "")
            lines.append(f"| {t['model']} | {t['what']}{extra} | {t['value']:.3f} | {t['goal']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
        for model, runs in o["runs"].items():
            lines += ["", f"## {model}", ""]
            if "shared" in runs:
                lines += ["| shared prompt | TTFT p50 s | TTFT p90 s | total tok/s | output tok/s | computed / sent | "
                          "preemptions |", "|---|---|---|---|---|---|---|"]
                for k in ("on", "off"):
                    r = runs["shared"][k]
                    lines.append(f"| cache {k} | {r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} | "
                                 f"{r['total_tokens_per_s']:.0f} | {r['output_tokens_per_s']:.0f} | "
                                 f"{r['prefill_tokens_computed']} / {r['prompt_tokens']} | {r['preemptions']} |")
                lines.append(f"\ngreedy outputs equal with the cache on and off: {runs['shared']['greedy_outputs_equal']}")
            if "multiturn" in runs:
                m = runs["multiturn"]
                lines += ["", "| turn | sent | computed | fraction | s |", "|---|---|---|---|---|"]
                for i, r in enumerate(m["turns"]):
                    lines.append(f"| {i + 1} | {r['prompt_tokens']} | {r['prefill_tokens_computed']} | "
                                 f"{r['prefill_tokens_computed'] / r['prompt_tokens']:.1%} | {r['elapsed_s']:.2f} |")
            if "itl" in runs:
                lines += ["", "| long prompt, budget, cap | steady step ms | ITL p50 ms | ITL p99 ms | ITL max ms | "
                          "prefill steps | long TTFT s |", "|---|---|---|---|---|---|---|"]
                for r in runs["itl"].values():
                    lines.append(f"| {r['long_prompt']}, {r['budget']}, {r.get('long_prefill_cap') or 'none'} | "
                                 f"{r['steady_step_ms_median']:.2f} | "
                                 f"{r['prefill_window_itl_p50_ms']:.1f} | {r['prefill_window_itl_p99_ms']:.1f} | "
                                 f"{r['prefill_window_itl_max_ms']:.1f} | {r['prefill_steps']} | "
                                 f"{r['long_prompt_ttft_s']:.2f} |")
            if "decode" in runs:
                lines += ["", "| decode | batch | input | step ms | main step ms |", "|---|---|---|---|---|"]
                for r in runs["decode"]:
                    b = f"{r['baseline_step_ms']:.3f}" if r["baseline_step_ms"] else "-"
                    lines.append(f"| cache {'on' if r['caching'] else 'off'} | {r['batch_size']} | {r['input_len']} | "
                                 f"{r['decode_step_ms']:.3f} | {b} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = list(self.out["runs"])
        fig, axes = plt.subplots(len(models), 3, figsize=(15, 3.6 * len(models)), squeeze=False)
        for row, model in zip(axes, models):
            runs = self.out["runs"][model]
            if "shared" in runs:
                sh = runs["shared"]
                ax = row[0]
                ax.bar([0, 1], [sh["on"]["ttft_p50_s"], sh["off"]["ttft_p50_s"]], color=["tab:green", "tab:gray"])
                ax.set_xticks([0, 1], ["cache on", "cache off"])
                ax.set_ylabel("TTFT p50 (s)")
                ax2 = ax.twinx()
                ax2.plot([0, 1], [sh["on"]["total_tokens_per_s"], sh["off"]["total_tokens_per_s"]], "ko-")
                ax2.set_ylabel("total tok/s (dots)")
                ax.set_title(f"{model}: shared system prompt")
            if "multiturn" in runs:
                ax = row[1]
                t = runs["multiturn"]["turns"]
                ax.bar(range(1, len(t) + 1), [r["prompt_tokens"] for r in t], color="tab:gray", label="sent")
                ax.bar(range(1, len(t) + 1), [r["prefill_tokens_computed"] for r in t], color="tab:green",
                       label="computed")
                ax.set_xlabel("turn")
                ax.set_ylabel("prompt tokens")
                ax.legend()
                ax.set_title(f"{model}: multi-turn")
            if "itl" in runs:
                ax = row[2]
                for key, r in runs["itl"].items():
                    tr = r["step_trace_ms"]
                    ax.plot([t for t, _ in tr], [d for _, d in tr], ".-", label=key, lw=0.8)
                ax.axvline(0, color="k", lw=0.6)
                ax.set_xlabel("s since the long prompt arrived")
                ax.set_ylabel("step ms")
                ax.legend()
                ax.set_title(f"{model}: long prompt vs decoding streams")
        fig.tight_layout()
        fig.savefig(path, dpi=110)


def _baselines(model: str) -> dict[tuple[int, int], tuple[float, str]]:
    """(batch, input_len) -> (decode step ms, file) of main's committed H200 results (graphs, not eager)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    found: dict[tuple[int, int], tuple[float, str]] = {}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    for path in sorted(glob.glob(os.path.join(here, "*.json"))):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        rows = d.get("fdpp") if isinstance(d, dict) else d
        if not isinstance(rows, list):
            continue
        for r in rows:
            if not isinstance(r, dict) or r.get("model") != model or r.get("eager") or r.get("device") != gpu:
                continue
            if "decode_step_ms" in r and "batch_size" in r:
                key = (r["batch_size"], r["input_len"])
                # the newest file wins (names end with the date; the host-path run is the latest main)
                if key not in found or "host_path" in path:
                    found[key] = (r["decode_step_ms"], os.path.basename(path))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-2-7b", "llama-3-8b"])
    ap.add_argument("--quick", action="store_true", help="smaller sizes: ~3 minutes on an H200 (CPU: a smoke test)")
    ap.add_argument("--scenarios", nargs="+", default=["shared", "multiturn", "itl", "decode"],
                    choices=["shared", "multiturn", "itl", "decode"])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--no-balanced-decode-graphs", action="store_true",
                    help="do not capture the decode graphs a second time with more splits for unequal rows "
                         "(EngineConfig.cuda_graph_balanced_decode=False)")
    ap.add_argument("--itl-default-only", action="store_true",
                    help="itl: only the engine's default budget and chunk cap (not the other budgets)")
    ap.add_argument("--no-mixed-graphs", action="store_true",
                    help="run mixed steps (decode rows + a prompt chunk) eagerly, not through their CUDA graphs")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="results folder")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.size = ("cpu" if args.device == "cpu" else "quick") if args.quick else "full"
    if args.device == "cpu" and not args.quick:
        log("the full sizes need a GPU; on the CPU use --quick with a small preset (smollm2-135m)")
        return 2
    b = Bench(args)
    t0 = time.time()
    for model in args.models:
        for sc in args.scenarios:
            if (sc == "decode" and not b.size["decode"]) or (sc == "multiturn" and "shared" in args.scenarios):
                continue  # multiturn runs on the shared scenario's cache-on engine
            getattr(b, sc)(model)
            b.write()  # keep what is measured if the run is cut short
    base = b.write()
    met = sum(t["met"] for t in b.out["targets"])
    log(f"wrote {base}.json/.md/.png: {met}/{len(b.out['targets'])} targets met in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
