"""Batch-1 (and batch-64) decode the way a user sees it: wall clock through ``LLM.generate`` (issue #12).

    python bench/e2e_latency.py --out $OUT                      # default set, < 5 min on an H200
    python bench/e2e_latency.py --quick --out $OUT              # < 3 min: Llama-2-7B batch 1 only
    python bench/e2e_latency.py --compare-async --peers --out $OUT

Presets with random weights and the real shapes: Llama-2-7B fp16 (batch 1 at 128 and 1k input, batch 64
at 1k) and Llama-3-8B bf16 (batch 1 at 1k). TTFT = wall(1 token); decode tok/s = B x (N - 1) /
(wall(N) - wall(1)), medians of --repeats runs after a warm-up (fdpp.benchmark.wall_clock_decode), with
the engine's per-step median and the host overhead beside them. The roof is the bytes a step reads
(weights + KV cache) at the bandwidth of an eager 2 GB device copy.

Before timing, each engine is checked: async scheduling on vs off gives the same greedy tokens, and the
fused-norm forward the same prompt logits (within half-precision rounding) as separate norms.
``--compare-async`` times async off/on x fuse_norm off/on at batch 1; ``--compare-prefill-graphs`` batch 1 with
the prefill CUDA graphs dropped (every prefill eager); ``--peers`` times transformers with a static cache
(compiled) on the same shapes at batch 1. The graphs are captured as the engine's start-up captures them
(``LLMEngine.capture_cuda_graphs``: decode, mixed and prefill steps; before 2026-12-04 late this script captured
the decode graphs only, which left B1 prefills eager as they were in the engine then). ``--budget-s`` stops starting new measurements once
spent (what was measured is written). Writes e2e_latency_<gpu>_<date>.json / .md / .png into --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PRESETS = {"llama-2-7b": "float16", "llama-3-8b": "bfloat16"}
# (model, batch size, input length) of the default set
DEFAULT_CASES = [("llama-2-7b", 1, 128), ("llama-2-7b", 1, 1024), ("llama-2-7b", 64, 1024), ("llama-3-8b", 1, 1024)]
QUICK_CASES = [("llama-2-7b", 1, 128), ("llama-2-7b", 1, 1024)]


def log(*a) -> None:
    print(*a, flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.time(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)


def set_variant(llm, use_async: bool, fuse_norm: bool, max_bs: int) -> None:
    """Switch async scheduling and fused norms on the live engine; re-capture the decode graphs when
    the forward changed (a graph replays the kernels it captured) or lacks a bucket for ``max_bs``."""
    eng = llm.engine
    eng.async_scheduling = use_async
    runner = eng.runner
    have = runner.graph_batch_sizes[-1] if runner.graphs else 0
    if eng.fuse_norm != fuse_norm or have < max_bs:
        eng.model.set_fuse_norm(fuse_norm)
        eng.fuse_norm = fuse_norm
        runner.graphs.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        eng.capture_cuda_graphs(max(have, max_bs))  # as the engine's start-up does: decode, mixed, prefill


_PDL_DEFAULT = os.environ.get("FDPP_PDL", "0") == "1"  # the setting this run ships (set_pdl changes the env)


def pdl_default() -> bool:
    return _PDL_DEFAULT


def set_pdl(llm, on: bool) -> None:
    """Programmatic dependent launch on / off (FDPP_PDL, read at each kernel launch); the decode graphs
    are re-captured so that they replay the launches of the new setting."""
    os.environ["FDPP_PDL"] = "1" if on else "0"
    runner = llm.engine.runner
    have = runner.graph_batch_sizes[-1] if runner.graphs else 1
    runner.graphs.clear()
    torch.cuda.synchronize()
    llm.engine.capture_cuda_graphs(have)


def pdl_check(llm) -> bool:
    """PDL changes launches, not arithmetic: greedy decode tokens with it on equal those with it off."""
    from fdpp import SamplingParams

    eng = llm.engine
    prompt = torch.randint(0, eng.model_config.vocab_size, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    toks = {}
    for on in (False, True):
        set_pdl(llm, on)
        eng.reset_prefix_cache()
        toks[on] = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    set_pdl(llm, pdl_default())
    assert toks[True] == toks[False], "programmatic dependent launch changed the decode tokens"
    return True


def self_check(llm, dtype: str) -> dict:
    """Async on/off give identical greedy tokens (several lengths, n > 1 seeded, a stop token); the fused
    norm forward gives the separate-norm prompt logits within rounding. Raises AssertionError."""
    from fdpp import SamplingParams

    eng = llm.engine
    vocab = eng.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (37, 300, 5)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=12, ignore_eos=True)]
    res = {}
    for flag in (False, True):
        eng.reset_prefix_cache()  # a prefix hit reorders the prompt's arithmetic: compare cold runs
        eng.async_scheduling = flag
        res[flag] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
        eng.check_integrity()
    assert res[True] == res[False], "async scheduling changed the tokens"
    stop = res[False][0][0][6]
    one = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], ignore_eos=True)
    stopped = {}
    for flag in (False, True):
        eng.reset_prefix_cache()
        eng.async_scheduling = flag
        stopped[flag] = llm.generate(prompts[:1], one, use_tqdm=False)[0].outputs[0].token_ids
    assert stopped[True] == stopped[False] and stopped[True][-1] == stop and len(stopped[True]) <= 7, stopped
    fused_before = eng.fuse_norm
    logits = {}
    for flag in (False, True):
        eng.model.set_fuse_norm(flag)
        logits[flag] = eng.prompt_logits(prompts[1]).double()
    eng.model.set_fuse_norm(fused_before)
    err = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
    tol = 1e-2 if dtype == "float16" else 4e-2
    assert err < tol, f"fused-norm logits differ from separate norms by {err:.2e} (relative), over {tol}"
    return {"async_tokens_equal": True, "stop_token_exact": True, "fused_norm_logits_rel_err": err}


def time_transformers(model: str, dtype: str, cases: list[tuple[int, int]], output_len: int,
                      budget: Budget) -> list[dict]:
    """transformers with a static cache (generate compiles the forward), decode tok/s by the same
    wall-clock definition: B x (N - 1) / (wall(N) - wall(1))."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fdpp.models.presets import get_preset

    cfg_dict = dict(get_preset(model))
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    hf = hf.to_empty(device="cuda")
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    hf.eval()
    rows = []
    for bs, n_in in cases:
        if budget.left < 60:
            rows.append({"model": model, "batch_size": bs, "input_len": n_in, "skipped": "budget"})
            continue
        ids = torch.randint(0, cfg.vocab_size, (bs, n_in), device="cuda")
        try:
            _hf_wall(hf, ids, output_len)  # warm-up (compiles)
            _hf_wall(hf, ids, 1)
            t_n = sorted(_hf_wall(hf, ids, output_len) for _ in range(3))[1]
            t_1 = sorted(_hf_wall(hf, ids, 1) for _ in range(3))[1]
        except Exception as e:  # report, don't hide
            rows.append({"model": model, "batch_size": bs, "input_len": n_in, "error": repr(e)[:300]})
            log("transformers failed:", repr(e)[:200])
            continue
        r = {"model": model, "dtype": dtype, "batch_size": bs, "input_len": n_in, "output_len": output_len,
             "wall_ttft_ms": t_1 * 1e3, "wall_decode_tokens_per_s": bs * (output_len - 1) / max(t_n - t_1, 1e-9)}
        rows.append(r)
        log(f"transformers static {model} bs={bs} in={n_in}: {r['wall_decode_tokens_per_s']:.1f} tok/s, "
            f"TTFT {r['wall_ttft_ms']:.1f} ms")
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _hf_wall(hf, ids: torch.Tensor, n: int) -> float:
    """Seconds for transformers' generate of ``n`` tokens with a static cache, CUDA synchronized."""
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bound_tok_s(row: dict, copy_bw: float) -> float:
    """Tokens/s if a step only read its bytes (weights + mean KV) at the copy bandwidth."""
    return row["batch_size"] * copy_bw / (row["weight_bytes"] + row["kv_bytes_per_step"])


def compute_targets(result: dict) -> list[dict]:
    bw = result["copy_bandwidth_gbs"] * 1e9
    best = {}
    for r in result["fdpp"]:
        if (r.get("async_scheduling") and r.get("fuse_norm") and r.get("wall_decode_tokens_per_s")
                and r.get("pdl", False) == result.get("pdl_default", False)
                and r.get("prefill_graphs", True)):  # the shipped settings
            best[(r["model"], r["batch_size"], r["input_len"])] = r
    targets = []

    def add(name, value, goal, met):
        targets.append({"name": name, "value": value, "goal": goal, "met": bool(met) if value is not None else False})

    for (model, bs, n_in), goal in [(("llama-2-7b", 1, 128), 270), (("llama-2-7b", 1, 1024), 270),
                                    (("llama-3-8b", 1, 1024), 240)]:
        r = best.get((model, bs, n_in))
        v = r["wall_decode_tokens_per_s"] if r else None
        add(f"e2e.{model}.b1_in{n_in}.decode_tok_s", v, f">= {goal}", v is not None and v >= goal)
    r = best.get(("llama-2-7b", 1, 1024))
    v = r["wall_ttft_ms"] if r else None
    add("e2e.llama-2-7b.b1_in1024.ttft_ms", v, "<= 22", v is not None and v <= 22)
    r = best.get(("llama-2-7b", 64, 1024))
    v = 100 * r["wall_decode_tokens_per_s"] / bound_tok_s(r, bw) if r else None
    add("e2e.llama-2-7b.b64_in1024.pct_of_bound", v, ">= 90", v is not None and v >= 90)
    for r in result["fdpp"]:  # the prefill graphs against the eager prefill (--compare-prefill-graphs)
        ref = best.get((r["model"], r["batch_size"], r["input_len"]))
        if r.get("prefill_graphs") is False and r.get("wall_ttft_ms") and ref and ref.get("prefill_graphs"):
            v = r["wall_ttft_ms"] / ref["wall_ttft_ms"]
            add(f"e2e.{r['model']}.b1_in{r['input_len']}.ttft_eager_over_prefill_graphs", v,
                ">= 1.0 (the prefill graphs never slower)", v >= 1.0)
    peers = {(p["model"], p["batch_size"], p["input_len"]): p for p in result.get("transformers", [])
             if p.get("wall_decode_tokens_per_s")}
    ratios = [best[k]["wall_decode_tokens_per_s"] / p["wall_decode_tokens_per_s"]
              for k, p in peers.items() if k in best and k[1] == 1]
    v = min(ratios) if ratios else None
    add("e2e.vs_transformers_static.b1_speedup_min", v, ">= 2.0", v is not None and v >= 2.0)
    return targets


def write_reports(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    gpu = result["gpu"].replace(" ", "_")
    base = os.path.join(out_dir, f"e2e_latency_{gpu}_{result['date'][:10]}")
    result["targets"] = compute_targets(result) if result.get("fdpp") else []
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    bw = result["copy_bandwidth_gbs"] * 1e9
    lines = [f"# End-to-end latency, {result['gpu']} ({result['date']})", "",
             f"torch {result['torch']}, triton {result['triton']}, copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s "
             "(eager 2 GB copy). Wall clock through `LLM.generate`: TTFT = wall(1); decode tok/s = "
             "B x (N-1) / (wall(N) - wall(1)), medians after a warm-up.", "",
             "| model | dtype | B | input | async | fused norm | PDL | prefill graphs | wall TTFT ms | wall tok/s | bound tok/s "
             "| % bound | step ms (per-step) | host ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["fdpp"]:
        if not r.get("wall_decode_tokens_per_s"):
            continue
        b = bound_tok_s(r, bw)
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['input_len']} | {r['async_scheduling']} | "
                     f"{r['fuse_norm']} | {r.get('pdl', False)} | {r.get('prefill_graphs', '-')} | {r['wall_ttft_ms']:.1f} | {r['wall_decode_tokens_per_s']:.1f} | {b:.0f} | "
                     f"{100 * r['wall_decode_tokens_per_s'] / b:.1f} | {r['decode_step_ms']:.3f} | "
                     f"{r.get('host_overhead_ms') or 0:.3f} |")
    if result.get("transformers"):
        lines += ["", "| transformers static cache | B | input | wall TTFT ms | wall tok/s |", "|---|---|---|---|---|"]
        for p in result["transformers"]:
            if p.get("wall_decode_tokens_per_s"):
                lines.append(f"| {p['model']} {p['dtype']} | {p['batch_size']} | {p['input_len']} | "
                             f"{p['wall_ttft_ms']:.1f} | {p['wall_decode_tokens_per_s']:.1f} |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['name']} | {v} | {t['goal']} | {t['met']} |")
    if result.get("skipped"):
        lines += ["", "Skipped (budget): " + ", ".join(result["skipped"])]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return base
    rows = [r for r in result["fdpp"] if r.get("wall_decode_tokens_per_s")]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [f"{r['model']}\nB{r['batch_size']} x {r['input_len']}\n"
                  f"{'async' if r['async_scheduling'] else 'sync'}{' +fn' if r['fuse_norm'] else ''}"
                  f"{' +pdl' if r.get('pdl') else ''}{' eager-prefill' if r.get('prefill_graphs') is False else ''}"
                  for r in rows]
        vals = [100 * r["wall_decode_tokens_per_s"] / bound_tok_s(r, bw) for r in rows]
        ax.bar(range(len(rows)), vals, color=["tab:blue" if r["batch_size"] == 1 else "tab:green" for r in rows])
        for i, r in enumerate(rows):
            ax.text(i, vals[i] + 1, f"{r['wall_decode_tokens_per_s']:.0f}", ha="center", fontsize=7)
        ax.axhline(85, color="red", ls="--", lw=1, label="85% target (batch 1)")
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.set_ylabel("% of bound (bytes per step at copy bandwidth)")
        ax.set_title(f"decode tok/s (wall clock, numbers on bars) vs batch, {result['gpu']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=130)
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Llama-2-7B batch 1 only, 64 tokens (< 3 min)")
    ap.add_argument("--models", nargs="*", default=None, help="restrict to these presets")
    ap.add_argument("--output-len", type=int, default=None, help="tokens per request (default 128; quick 64)")
    ap.add_argument("--repeats", type=int, default=3, help="wall-clock runs per figure (median)")
    ap.add_argument("--compare-async", action="store_true",
                    help="also time async off/on x fuse_norm off/on at batch 1, in the same run")
    ap.add_argument("--compare-pdl", action="store_true",
                    help="also time batch 1 with programmatic dependent launch toggled (FDPP_PDL), same run")
    ap.add_argument("--compare-prefill-graphs", action="store_true",
                    help="also time batch 1 with the prefill CUDA graphs dropped (eager prefill), same run")
    ap.add_argument("--peers", action="store_true", help="also time transformers (static cache, compiled) at batch 1")
    ap.add_argument("--budget-s", type=float, default=280.0, help="start no new measurement after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="results folder")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/e2e_latency.py needs a CUDA GPU")
    import triton

    from fdpp import LLM
    from fdpp.benchmark import copy_bandwidth, run_latency

    budget = Budget(args.budget_s)
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    if args.models:
        cases = [c for c in cases if c[0] in args.models]
    output_len = args.output_len or (64 if args.quick else 128)
    result = {"gpu": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": triton.__version__, "argv": sys.argv[1:],
              "output_len": output_len, "fdpp": [], "checks": {}, "skipped": [], "pdl_default": pdl_default()}
    bw = copy_bandwidth(torch.device("cuda"), 4 << 30)  # a 2 GB buffer copied: 4 GB moved
    result["copy_bandwidth_gbs"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for model in dict.fromkeys(c[0] for c in cases):
        dtype = PRESETS[model]
        mine = [(bs, n_in) for m, bs, n_in in cases if m == model]
        max_bs = max(bs for bs, _ in mine)
        if budget.left < 45:
            result["skipped"] += [f"{model} B{bs}x{n}" for bs, n in mine]
            continue
        t0 = time.time()
        # NOTE: eager construction, graphs captured below per variant: only the buckets a case needs
        llm = LLM(model, dtype=dtype, device="cuda", max_num_seqs=max_bs,
                  max_model_len=max(n for _, n in mine) + output_len + 16,
                  max_num_batched_tokens=max(8192, max(n for _, n in mine)), enforce_eager=True,
                  show_progress=False, async_scheduling=True, fuse_norm=True)
        log(f"{model} {dtype} ready in {time.time() - t0:.1f}s")
        result["checks"][model] = self_check(llm, dtype)
        log("self-check", model, result["checks"][model])
        variants = [(True, True)]
        if args.compare_async:
            variants = [(False, False), (True, False), (False, True), (True, True)]
        for use_async, fuse in variants:
            for bs, n_in in mine:
                if bs > 1 and (use_async, fuse) != (True, True):
                    continue  # batch 64 runs in the default variant only (budget)
                if budget.left < (40 if bs == 1 else 90):
                    result["skipped"].append(f"{model} B{bs}x{n_in} async={use_async} fuse={fuse}")
                    continue
                set_variant(llm, use_async, fuse, bs)
                r = run_latency(llm, model, bs, n_in, output_len, copy_bw=bw, repeats=args.repeats).as_dict()
                r["pdl"] = pdl_default()
                r["prefill_graphs"] = bool(llm.engine.runner.prefill_graphs)
                result["fdpp"].append(r)
                write_reports(result, args.out)
                log(f"fdpp {model} B{bs}x{n_in} async={use_async} fuse={fuse}: wall {r['wall_decode_tokens_per_s']:.1f} "
                    f"tok/s, TTFT {r['wall_ttft_ms']:.1f} ms, per-step {r['decode_step_ms']:.3f} ms, "
                    f"host {r.get('host_overhead_ms') or 0:.3f} ms, bound {bound_tok_s(r, bw):.0f} tok/s")
        if args.compare_prefill_graphs and budget.left > 40:
            runner = llm.engine.runner
            set_variant(llm, True, True, 1)
            sizes = list(runner.prefill_token_sizes)
            runner.init_prefill_inputs([])  # drops the prefill graphs: every prefill runs eagerly
            for bs, n_in in mine:
                if bs != 1 or budget.left < 30:
                    continue
                r = run_latency(llm, model, bs, n_in, output_len, copy_bw=bw, repeats=args.repeats).as_dict()
                r["pdl"] = pdl_default()
                r["prefill_graphs"] = False
                result["fdpp"].append(r)
                write_reports(result, args.out)
                log(f"fdpp {model} B{bs}x{n_in} without prefill graphs: TTFT {r['wall_ttft_ms']:.1f} ms, wall "
                    f"{r['wall_decode_tokens_per_s']:.1f} tok/s")
            runner.init_prefill_inputs(sizes)
            llm.engine.capture_cuda_graphs(runner.graph_batch_sizes[-1])
        if args.compare_pdl and budget.left > 40:
            try:
                set_variant(llm, True, True, 1)
                result["checks"][model]["pdl_tokens_equal"] = pdl_check(llm)
                set_pdl(llm, not pdl_default())
                for bs, n_in in mine:
                    if bs != 1 or budget.left < 30:
                        continue
                    r = run_latency(llm, model, bs, n_in, output_len, copy_bw=bw, repeats=args.repeats).as_dict()
                    r["pdl"] = not pdl_default()
                    result["fdpp"].append(r)
                    write_reports(result, args.out)
                    log(f"fdpp {model} B{bs}x{n_in} async=True fuse=True pdl={r['pdl']}: wall "
                        f"{r['wall_decode_tokens_per_s']:.1f} tok/s, per-step {r['decode_step_ms']:.3f} ms")
                set_pdl(llm, pdl_default())
            except Exception as e:  # noqa: BLE001 - keep the other measurements of this run
                result["checks"][model]["pdl_error"] = repr(e)[:500]
                log("PDL comparison failed:", repr(e)[:500])
                os.environ["FDPP_PDL"] = "1" if pdl_default() else "0"
        llm.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    if args.peers:
        peer_cases = [(bs, n) for m, bs, n in cases if m == "llama-2-7b" and bs == 1]
        if peer_cases:
            result["transformers"] = time_transformers("llama-2-7b", "float16", peer_cases, output_len, budget)
    base = write_reports(result, args.out)
    for t in result["targets"]:
        log(f"target {t['name']}: {t['value']} (goal {t['goal']}) met={t['met']}")
    log(f"wrote {base}.json / .md / .png in {time.time() - budget.t0:.0f}s")


if __name__ == "__main__":
    main()
