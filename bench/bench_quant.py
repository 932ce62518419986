"""Benchmark of quantized weights on one GPU (issue #16): GEMV bandwidth per packed format, end-to-end
batch-1 decode through ``LLM.generate`` per quantization, and FP8 W8A8 prefill (TTFT at 4k input).

    python bench/bench_quant.py --quick --out DIR      # < 4 min on an H200
    python bench/bench_quant.py --out DIR              # more configs, longer decode

Method (shared/ANCHORS.md):
* GEMV: M = 1, Llama-2-7B linear shapes, random weights packed in each format (``random_quant``) rotated
  through >= 400 MB (more than L2), CUDA-graph replay, median (``fdpp.dataflow.tuner.GraphTimer``). The
  bandwidth is the *packed* bytes streamed (data + scales + zero points + x + y) / time, against a 2 GB
  device-to-device copy (bytes read + written) measured in the same run. Each format's kernel is first
  checked against a float64 dequantize-then-matmul reference.
* End to end: Llama-2-7B shapes with random weights (the preset), fp16 activations, quantized online
  at load; one request of 1024 random prompt tokens, greedy, ``ignore_eos``; decode tok/s =
  (N - 1) / (time of N new tokens - time of 1 new token), each the median of repeats; CUDA graphs on.
  The quantized model's first tokens are checked against nothing (random weights): what is checked is
  that it decodes N tokens and that its logits are finite.
* TTFT: 4096 prompt tokens, max_tokens=1, fp16 vs fp8 (W8A8 on the FP8 tensor cores for the linears).

Outputs in --out: bench_quant.json (GPU, date, versions, all numbers, ``targets``), bench_quant.md,
bench_quant.png (if matplotlib is installed), log.txt.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
GEMV_FORMATS = ("fp8", "int8", "int4", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
E2E = ("none", "fp8", "int8", "int4", "q4_k")  # "none": fdpp fp16
DECODE_GOALS = {"fp8": 1.8, "int8": 1.8, "int4": 2.8, "q4_k": 2.5}
GEMV_GOAL = 0.85  # of the copy bandwidth, on weights whose packed bytes are >= 32 MB
TTFT_GOAL = 1.5
MIN_PACKED_BYTES = 32e6

_LOG = None


def log(*a) -> None:
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    if _LOG is not None:
        _LOG.write(msg + "\n")
        _LOG.flush()


# ---- GEMV ---------------------------------------------------------------------------------------------


def check_kernels(fmt: str) -> float:
    """Max relative error of the GEMV and flat GEMM on one odd-ish shape vs float64; raises if off."""
    from fdpp.kernels.quant_flat_gemm import quant_flat_gemm
    from fdpp.kernels.quant_gemv import quant_gemv
    from fdpp.quant.formats import dequantize, random_quant

    n, k = 1000, 4096
    w = random_quant(fmt, n, k, device="cuda", seed=3)
    wd = dequantize(w).double()
    worst = 0.0
    for m, fn in ((1, quant_gemv), (16, quant_flat_gemm)):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = fn(x, w.data, fmt, n, k, w.scale, w.zero, w.group_size)
        ref = x.double() @ wd.t()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        if not err < 2e-3:
            raise AssertionError(f"{fmt} {fn.__name__} M={m}: relative error {err:.2e} vs float64")
        worst = max(worst, err)
    return worst


def gemv_sweep(quick: bool, copy_tbps: float) -> list[dict]:
    """Per format and shape: the best GEMV config's time and bandwidth on packed bytes at M = 1."""
    from fdpp.dataflow.tuner import GraphTimer, quant_candidate_configs
    from fdpp.kernels.device import num_sms

    sms = num_sms(torch.device("cuda"))
    rows = []
    for fmt in GEMV_FORMATS:
        err = check_kernels(fmt)
        timer = GraphTimer("cuda", weight_format=fmt, replays=7 if quick else 11)
        for name, (n, k) in SHAPES.items():
            cfgs = [None] + quant_candidate_configs("gemv", n, k, 1, fmt, num_sms=sms, quick=quick)
            best = (math.inf, None)
            for cfg in cfgs:
                t = timer("gemv", cfg, n, k, 1, torch.float16)
                if t < best[0]:
                    best = (t, cfg)
            w = timer.weights(n, k, torch.float16)[0]
            nbytes = w.nbytes + 2 * (k + n)  # packed weight + x + y (fp16)
            tbps = nbytes / (best[0] * 1e-6) / 1e12
            cublas_us = timer("cublas", None, n, k, 1, torch.float16) if name == "o" else None
            rows.append({"format": fmt, "shape": name, "n": n, "k": k, "packed_mb": round(w.nbytes / 1e6, 2),
                         "us": round(best[0], 2), "tbps": round(tbps, 3), "frac_of_copy": round(tbps / copy_tbps, 3),
                         "config": best[1], "check_rel_err": err,
                         "dequant_plus_cublas_us": None if cublas_us is None else round(cublas_us, 2)})
            log(f"  gemv {fmt:5s} {name:8s} {w.nbytes / 1e6:7.1f} MB  {best[0]:7.2f} us  {tbps:5.2f} TB/s "
                f"({100 * tbps / copy_tbps:5.1f}% of copy)  {best[1]}")
        del timer
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ---- end to end -------------------------------------------------------------------------------------


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def e2e(quant: str, input_len: int, new_tokens: int, repeats: int, ttft_len: int | None) -> dict:
    """Decode tok/s (and TTFT at ``ttft_len`` when given) of Llama-2-7B shapes under one quantization."""
    from fdpp import LLM, SamplingParams

    max_len = max(input_len + new_tokens, ttft_len or 0) + 16
    t0 = time.perf_counter()
    llm = LLM("llama-2-7b", dtype="float16", device="cuda", quantization=quant, max_num_seqs=1,
              max_model_len=max_len, max_num_batched_tokens=max(4096, ttft_len or 0), show_progress=False,
              calibration="off", enable_prefix_caching=False)  # repeats must prefill again
    load_s = time.perf_counter() - t0
    try:
        qkv = llm.engine.model.model.layers[0].self_attn.qkv_proj.weight
        fmt = getattr(getattr(qkv, "quant", None), "fmt", "float16")
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, 32000, (input_len,), generator=gen).tolist()
        logits = llm.engine.prompt_logits(prompt[:64])
        assert torch.isfinite(logits).all(), f"{quant}: non-finite logits"

        def run(n):
            out = llm.generate([prompt],
                               SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == n, f"{quant}: {len(out[0].outputs[0].token_ids)} tokens"

        run(new_tokens)  # warm-up: compiles and captures
        t_n = _median_time(lambda: run(new_tokens), repeats)
        t_1 = _median_time(lambda: run(1), repeats)
        row = {"quantization": quant, "weight_format": fmt, "load_s": round(load_s, 1),
               "decode_tok_s": round((new_tokens - 1) / (t_n - t_1), 2), "ttft_1k_ms": round(1e3 * t_1, 2)}
        if ttft_len:
            long_prompt = torch.randint(3, 32000, (ttft_len,), generator=gen).tolist()

            def prefill():
                llm.generate([long_prompt], SamplingParams(max_tokens=1), use_tqdm=False)

            prefill()
            row["ttft_4k_ms"] = round(1e3 * _median_time(prefill, repeats), 2)
        log(f"  e2e {quant:5s} ({fmt}): {row}")
        return row
    finally:
        llm.close()
        gc.collect()
        torch.cuda.empty_cache()


# ---- report -----------------------------------------------------------------------------------------


def compute_targets(result: dict) -> list[dict]:
    targets = []
    by_q = {r["quantization"]: r for r in result["e2e"]}
    base = by_q.get("none")
    for q, goal in DECODE_GOALS.items():
        if base and q in by_q:
            v = by_q[q]["decode_tok_s"] / base["decode_tok_s"]
            targets.append({"name": f"quant.decode_speedup.{q}", "value": round(v, 3), "goal": f">= {goal}x fp16",
                            "met": v >= goal})
    for fmt in GEMV_FORMATS:
        rows = [r for r in result["gemv"] if r["format"] == fmt and r["packed_mb"] * 1e6 >= MIN_PACKED_BYTES]
        if rows:
            v = min(r["frac_of_copy"] for r in rows)
            targets.append({"name": f"quant.gemv_bw.{fmt}", "value": v,
                            "goal": f">= {GEMV_GOAL} of copy bandwidth (worst shape, packed >= 32 MB)",
                            "met": v >= GEMV_GOAL})
    if base and "ttft_4k_ms" in base and "ttft_4k_ms" in by_q.get("fp8", {}):
        v = base["ttft_4k_ms"] / by_q["fp8"]["ttft_4k_ms"]
        targets.append({"name": "quant.fp8_w8a8_ttft_4k_speedup", "value": round(v, 3),
                        "goal": f">= {TTFT_GOAL}x fp16", "met": v >= TTFT_GOAL})
    return targets


def render_markdown(result: dict) -> str:
    lines = [f"# Quantized weights on {result['gpu']} ({result['date']})", "",
             f"torch {result['torch']}, triton {result['triton']}; copy bandwidth {result['copy_tbps']:.2f} TB/s "
             f"(2 GB device copy, read + write){' (quick)' if result['quick'] else ''}.", "",
             "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |" for t in result["targets"]]
    lines += ["", "## GEMV at M = 1 (packed bytes / time)", "",
              "| format | " + " | ".join(f"{s} MB / us / % copy" for s in SHAPES) + " |",
              "|---|" + "---|" * len(SHAPES)]
    for fmt in GEMV_FORMATS:
        cells = []
        for s in SHAPES:
            r = next((r for r in result["gemv"] if r["format"] == fmt and r["shape"] == s), None)
            cells.append("-" if r is None else f"{r['packed_mb']} / {r['us']} / {100 * r['frac_of_copy']:.0f}%")
        lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
    lines += ["", f"## End to end, batch 1, {result['input_len']} input tokens, {result['new_tokens']} new "
              "(Llama-2-7B shapes, random weights, online quantization)", "",
              "| quantization | stored as | decode tok/s | vs fp16 | TTFT 1k ms | TTFT 4k ms |", "|---|---|---|---|---|---|"]
    base = next((r for r in result["e2e"] if r["quantization"] == "none"), None)
    for r in result["e2e"]:
        rel = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        lines.append(f"| {r['quantization']} | {r['weight_format']} | {r['decode_tok_s']} | {rel} | "
                     f"{r['ttft_1k_ms']} | {r.get('ttft_4k_ms', '-')} |")
    if result.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(SHAPES)
    for i, s in enumerate(SHAPES):
        vals = [next((r["frac_of_copy"] for r in result["gemv"] if r["format"] == f and r["shape"] == s), 0)
                for f in GEMV_FORMATS]
        a.bar([j + i * width for j in range(len(GEMV_FORMATS))], vals, width, label=s)
    a.axhline(GEMV_GOAL, color="k", ls="--", lw=1)
    a.set_xticks([j + 0.4 - width / 2 for j in range(len(GEMV_FORMATS))], GEMV_FORMATS)
    a.set_ylabel("fraction of copy bandwidth (packed bytes)")
    a.set_title("quantized GEMV, M = 1")
    a.legend(fontsize=8)
    rows = result["e2e"]
    b.bar([r["quantization"] for r in rows], [r["decode_tok_s"] for r in rows])
    b.set_ylabel("decode tok/s (batch 1, 1k input)")
    b.set_title("LLM.generate, Llama-2-7B shapes")
    fig.suptitle(f"{result['gpu']} {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    global _LOG
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer configs and tokens (< 4 min on an H200)")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_quant: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from bench_gemm import copy_bandwidth

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _LOG = open(out / "log.txt", "w")
    result = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "quick": args.quick,
              "input_len": 1024, "new_tokens": 64 if args.quick else 256, "gemv": [], "e2e": [], "errors": []}
    t0 = time.perf_counter()
    result["copy_tbps"] = copy_bandwidth()
    log(f"bench_quant on {result['gpu']}: copy {result['copy_tbps']:.2f} TB/s")
    if not args.skip_gemv:
        result["gemv"] = gemv_sweep(args.quick, result["copy_tbps"])
    if not args.skip_e2e:
        for q in E2E:
            try:
                result["e2e"].append(e2e(q, 1024, result["new_tokens"], 3 if args.quick else 5,
                                         4096 if q in ("none", "fp8") else None))
            except Exception as exc:  # one failing quantization must not lose the others' numbers
                result["errors"].append(f"e2e {q}: {type(exc).__name__}: {exc}")
                log(traceback.format_exc())
    result["targets"] = compute_targets(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "bench_quant.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench_quant.md").write_text(render_markdown(result))
    plot(result, out / "bench_quant.png")
    for t in result["targets"]:
        log(f"  {t['name']}: {t['value']} ({t['goal']}) {'met' if t['met'] else 'MISSED'}")
    log(f"bench_quant: wrote {out} in {result['wall_s']} s")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
