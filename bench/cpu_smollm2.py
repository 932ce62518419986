"""CPU speed on the embedded SmolLM2-135M-Instruct (GGUF Q4_1, Q8_0 embedding / LM head): fdpp's CPU paths
against Hugging Face transformers, same chat prompt, same machine, greedy, batch 1, wall clock.

    python bench/cpu_smollm2.py --out bench/results

fdpp variants (all ``LLM.generate`` with token ids, ``ignore_eos``):
- ``cpu``: the default; Q4_1 weights in PyTorch's packed int4 kernel (bfloat16 activations), the LM head
  dense float32 (``fdpp.quant.cpu_int4``);
- ``reference``: ``linear_backend="reference"``, the Q4_1 weights dequantized to float32 once at load;
- ``dense``: ``quantization="none"``, the checkpoint dequantized to a float32 model at load.
transformers: the same GGUF dequantized to float32 by transformers, ``generate`` with a dynamic cache.
``--sampling`` adds ``cpu`` with temperature 0.7 / top-p 0.9 (seeded), twice: top-p from the best 256 tokens
(the CPU default, ``fdpp.layers.sampler``) and from the full sort (``TOP_P_CANDIDATES = 0``).
``--ttft-lens`` times the prefill of long prompts (TTFT = wall(1), prefix cache off, medians of 3) for ``cpu``
and ``reference``: where the dense float32 GEMM of the dequantized weights is the faster one.

Decode tok/s = (N - 1) / (wall(N) - wall(1)) (the brief's definition at B = 1), medians of ``--repeats`` runs
after a warm-up, the variants interleaved run by run so that a noisy machine slows them alike; TTFT =
wall(1). The greedy tokens of every fdpp variant are compared with ``reference``'s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

PROMPT = "Explain in a few sentences why the sky is blue."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    ap.add_argument("--sampling", action="store_true", help="also time top-p sampling (see above)")
    ap.add_argument("--ttft-lens", type=int, nargs="*", default=[], metavar="N",
                    help="also time the prefill of N-token prompts, cpu vs reference (see above)")
    ap.add_argument("--out", default=None, help="folder for cpu_smollm2_<date>.json / .md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fdpp import LLM, SamplingParams

    variants = {
        "cpu": LLM(device="cpu", show_progress=False),
        "reference": LLM(device="cpu", show_progress=False, linear_backend="reference"),
        "dense": LLM(device="cpu", show_progress=False, quantization="none"),
    }
    ids = variants["cpu"].apply_chat_template([{"role": "user", "content": PROMPT}])
    n = args.new_tokens

    def fdpp_run(llm, tokens: int, sampled: bool = False) -> tuple[float, list[int]]:
        params = SamplingParams(temperature=0.7 if sampled else 0, top_p=0.9 if sampled else 1.0,
                                seed=0 if sampled else None,
                                max_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate([ids], params, use_tqdm=False)[0]
        return time.perf_counter() - t0, list(out.outputs[0].token_ids)

    runs: dict[str, dict[str, list[float]]] = {}
    tokens: dict[str, list[int]] = {}
    runners = {name: (lambda k, llm=llm: fdpp_run(llm, k)) for name, llm in variants.items()}
    if not args.no_transformers:
        runners["transformers"] = _transformers_runner(ids, variants["cpu"].get_tokenizer().eos_token_id)
    if args.sampling:
        from fdpp.layers import sampler

        def sampled(tokens: int, candidates: int) -> tuple[float, list[int]]:
            default, sampler.TOP_P_CANDIDATES = sampler.TOP_P_CANDIDATES, candidates
            try:
                return fdpp_run(variants["cpu"], tokens, sampled=True)
            finally:
                sampler.TOP_P_CANDIDATES = default

        runners["cpu, top-p 0.9"] = lambda k: sampled(k, sampler.TOP_P_CANDIDATES)
        runners["cpu, top-p 0.9, full sort"] = lambda k: sampled(k, 0)
    for run in runners.values():
        run(8)  # warm-up
    for _ in range(args.repeats):
        for name, run in runners.items():
            wall_n, toks = run(n)
            wall_1, _ = run(1)
            r = runs.setdefault(name, {"wall_n": [], "wall_1": []})
            r["wall_n"].append(wall_n)
            r["wall_1"].append(wall_1)
            tokens[name] = toks
    rows = []
    for name, r in runs.items():
        decode = [(n - 1) / (a - b) for a, b in zip(r["wall_n"], r["wall_1"])]
        rows.append({"variant": name, "decode_tok_s": statistics.median(decode),
                     "decode_tok_s_range": [min(decode), max(decode)],
                     "ttft_ms": 1e3 * statistics.median(r["wall_1"]),
                     "e2e_tok_s": n / statistics.median(r["wall_n"]),
                     "same_greedy_tokens_as_reference": None if "top-p" in name else tokens[name] == tokens["reference"]})
    ttft = _ttft_rows(args.ttft_lens) if args.ttft_lens else []
    by = {r["variant"]: r for r in rows}
    targets = [{"name": "e2e.cpu_decode_vs_reference", "value": round(by["cpu"]["decode_tok_s"]
                                                                       / by["reference"]["decode_tok_s"], 3),
                "goal": ">= 1.5x the dequantized float32 path (packed int4 weights)",
                "met": by["cpu"]["decode_tok_s"] >= 1.5 * by["reference"]["decode_tok_s"]}]
    if "transformers" in by:
        ratio = by["cpu"]["decode_tok_s"] / by["transformers"]["decode_tok_s"]
        targets.append({"name": "e2e.cpu_decode_vs_transformers", "value": round(ratio, 3),
                        "goal": ">= 1.0x transformers (float32, same machine)", "met": ratio >= 1.0})
    res = {
        "device": "cpu",
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded)",
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "repeats": args.repeats,
        "method": "decode tok/s = (N-1) / (wall(N) - wall(1)), medians, variants interleaved; TTFT = wall(1)",
        "command": "python bench/cpu_smollm2.py" + (f" --threads {args.threads}" if args.threads else "")
                   + (" --sampling" if args.sampling else "")
                   + (" --ttft-lens " + " ".join(map(str, args.ttft_lens)) if args.ttft_lens else ""),
        "results": rows,
        "ttft_long_prompts": ttft,
        "targets": targets,
    }
    print(json.dumps(res, indent=1))
    if args.out:
        stem = os.path.join(args.out, f"cpu_smollm2_{datetime.date.today().isoformat()}")
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(res))


def _ttft_rows(lens: list[int]) -> list[dict]:
    """TTFT of N-token prompts (token ids), cpu vs reference linear, prefix cache off, medians of 3."""
    from fdpp import LLM, SamplingParams

    llms = {b: LLM(device="cpu", show_progress=False, linear_backend=b, enable_prefix_caching=False)
            for b in ("cpu", "reference")}
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows = []
    for n in lens:
        prompt = [[1] + [100 + (i * 7919) % 40000 for i in range(n - 1)]]
        times: dict[str, list[float]] = {b: [] for b in llms}
        for llm in llms.values():
            llm.generate(prompt, params, use_tqdm=False)  # warm-up
        for _ in range(3):
            for b, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(prompt, params, use_tqdm=False)
                times[b].append(1e3 * (time.perf_counter() - t0))
        rows.append({"prompt_tokens": n, **{f"ttft_ms_{b}": statistics.median(v) for b, v in times.items()}})
    for llm in llms.values():
        llm.close()
    return rows


def _transformers_runner(ids: list[int], eos: int):
    import transformers

    from fdpp.models.default_model import default_model_path

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def run(tokens: int) -> tuple[float, list[int]]:
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=eos)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf.generate(x, **kw)
            return time.perf_counter() - t0, out[0, len(ids):].tolist()

    return run


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(res: dict) -> str:
    lines = [f"CPU decode, {res['model']}, {res['cpu']}, {res['threads']} threads, torch {res['torch']}, "
             f"{res['date']}", f"{res['prompt_tokens']}-token chat prompt, {res['new_tokens']} new tokens, "
             f"greedy; {res['method']}; `{res['command']}`", "",
             "| variant | decode tok/s (median) | range | TTFT ms | end-to-end tok/s | greedy tokens = reference |",
             "|---|---|---|---|---|---|"]
    for r in res["results"]:
        lo, hi = r["decode_tok_s_range"]
        lines.append(f"| {r['variant']} | {r['decode_tok_s']:.1f} | {lo:.1f}-{hi:.1f} | {r['ttft_ms']:.0f} | "
                     f"{r['e2e_tok_s']:.1f} | {_yes_no(r['same_greedy_tokens_as_reference'])} |")
    if res.get("ttft_long_prompts"):
        lines += ["", "| prompt tokens | TTFT ms, cpu | TTFT ms, reference | cpu / reference |", "|---|---|---|---|"]
        lines += [f"| {r['prompt_tokens']} | {r['ttft_ms_cpu']:.0f} | {r['ttft_ms_reference']:.0f} | "
                  f"{r['ttft_ms_cpu'] / r['ttft_ms_reference']:.2f} |" for r in res["ttft_long_prompts"]]
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['goal']} | {_yes_no(t['met'])} |" for t in res["targets"]]
    return "\n".join(lines) + "\n"


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "no"


if __name__ == "__main__":
    main()
