"""Structured output (issue 17): JSON-schema requests against unconstrained ones, through the engine API.

    python bench/bench_structured.py --tokenizer DIR --out $OUT            # ~3 min on an H200
    python bench/bench_structured.py --model smollm2-135m --device cpu --batch 4 --max-tokens 16 --out /tmp/s

A random-weight preset (default llama-3-8b in bfloat16) with a real tokenizer given apart (``--tokenizer``:
a Hugging Face folder or .gguf; its vocabulary is padded to the model's, the extra ids never allowed).
Random weights make the constrained outputs arbitrary but valid: every output is parsed and validated
against its schema. Measured, wall clock around LLMEngine.add_request / step:

- compile: a typical schema's first compilation (the tokenizer tables built before) and a cached one;
  target <= 50 ms (cached by schema).
- batch B (default 64): B requests arriving at once, each with its own JSON schema, against B
  unconstrained ones (ignore_eos, same max_tokens); output tokens / s over the whole run; target >= 0.9x.
- batch 1: one request's decode rate, (tokens - 1) / (last token time - first token time), median of
  3 runs; target >= 0.95x.

Writes structured_<gpu>_<date>.json (GPU, date, versions, every measurement, "targets") and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fdpp import LLM, SamplingParams  # noqa: E402
from fdpp.structured import StructuredOutputsParams  # noqa: E402

TYPICAL_SCHEMA = {  # an API-style record: nested object, array, enum, bounded numbers, required fields
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "maxLength": 40},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
}


def log(*a) -> None:
    print(*a, flush=True)


def schema_variant(i: int) -> dict:
    """The typical schema with one more required field per request: distinct grammars side by side."""
    s = json.loads(json.dumps(TYPICAL_SCHEMA))
    s["properties"][f"field_{i}"] = {"type": "integer", "minimum": -i, "maximum": 1000 + i}
    s["required"] = [*s["required"], f"field_{i}"]
    return s


def run_batch(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Add every request at once, step to the end; wall clock, output tokens, per-request timings."""
    engine = llm.engine
    t0 = time.perf_counter()
    ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    wall = time.perf_counter() - t0
    outs = [done[i] for i in ids]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rates = []
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if m is not None and n > 1 and m.last_token_time and m.first_token_time and m.last_token_time > m.first_token_time:
            rates.append((n - 1) / (m.last_token_time - m.first_token_time))
    return {"wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall,
            "decode_rate_median": statistics.median(rates) if rates else None, "outputs": outs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf (default: the embedded SmolLM2's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    import jsonschema

    tok_path = args.tokenizer
    if tok_path is None:
        from fdpp.models.hf_loader import resolve_model

        tok_path = resolve_model(None).gguf_file
    llm = LLM(args.model, tokenizer=tok_path, dtype=args.dtype, device=args.device, calibration="off",
              max_num_seqs=max(64, args.batch), max_model_len=args.prompt_len + args.max_tokens + 16)
    engine = llm.engine
    dev = engine.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    n_text = len(engine.tokenizer)
    rng = random.Random(0)

    def prompts(b: int) -> list[list[int]]:
        return [[rng.randrange(n_text) for _ in range(args.prompt_len)] for _ in range(b)]

    res: dict = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                 "triton": __import__("triton").__version__, "model": args.model, "dtype": args.dtype,
                 "tokenizer": os.path.basename(str(tok_path)), "tokenizer_vocab": n_text,
                 "model_vocab": engine.model_config.vocab_size, "batch": args.batch,
                 "prompt_len": args.prompt_len, "max_tokens": args.max_tokens}

    # ---- compile time (the tokenizer tables are built once per engine, before any timing) ----------
    backend = engine.structured
    t = time.perf_counter()
    backend._get_compiler()
    res["tokenizer_info_s"] = time.perf_counter() - t
    t = time.perf_counter()
    backend.compile(StructuredOutputsParams(json=TYPICAL_SCHEMA, disable_any_whitespace=True))
    res["compile_first_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    backend.compile(StructuredOutputsParams(json=json.loads(json.dumps(TYPICAL_SCHEMA)), disable_any_whitespace=True))
    res["compile_cached_ms"] = (time.perf_counter() - t) * 1e3
    log(f"compile: first {res['compile_first_ms']:.1f} ms, cached {res['compile_cached_ms']:.3f} ms "
        f"(tokenizer tables {res['tokenizer_info_s']:.2f} s)")

    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, output_kind="final_only")

    def constrained(i: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=args.max_tokens, output_kind="final_only",
                              structured_outputs=StructuredOutputsParams(json=schema_variant(i),
                                                                         disable_any_whitespace=True))

    b = args.batch
    # warm-up at the timed batch size: the Triton kernels of its prefill and decode shapes compile here
    # (a warm-up at batch 8 left the batch-32 compiles inside the unconstrained run: 2026-12-03 H200 run)
    run_batch(llm, prompts(b), [free] * b)
    run_batch(llm, prompts(b), [constrained(10_000 + i) for i in range(b)])
    # the schemas of the timed run compiled ahead (cached), so the run times decoding, not compilation
    for i in range(b):
        backend.compile(constrained(i).structured_outputs)
    r_free = run_batch(llm, prompts(b), [free] * b)
    r_con = run_batch(llm, prompts(b), [constrained(i) for i in range(b)])
    valid = 0
    for i, o in enumerate(r_con["outputs"]):
        text = o.outputs[0].text
        try:
            jsonschema.validate(json.loads(text), schema_variant(i))
            valid += 1
        except Exception:  # noqa: BLE001 - counted: a length-truncated output is not valid JSON
            pass
    res["batch"] = {k: {kk: vv for kk, vv in r.items() if kk != "outputs"} for k, r in
                    (("free", r_free), ("constrained", r_con))}
    res["batch"]["valid"] = valid
    res["batch"]["finished_by_grammar"] = sum(o.outputs[0].finish_reason == "stop" for o in r_con["outputs"])
    ratio_b = r_con["tok_per_s"] / r_free["tok_per_s"]
    log(f"batch {b}: free {r_free['tok_per_s']:.0f} tok/s, constrained {r_con['tok_per_s']:.0f} tok/s "
        f"({ratio_b:.3f}x); {valid}/{b} valid, {res['batch']['finished_by_grammar']} ended by the grammar")

    rates_free, rates_con = [], []
    for rep in range(3):
        rates_free.append(run_batch(llm, prompts(1), [free])["decode_rate_median"])
        rates_con.append(run_batch(llm, prompts(1), [constrained(rep)])["decode_rate_median"])
    r1f, r1c = statistics.median(rates_free), statistics.median(rates_con)
    res["batch1"] = {"free_tok_per_s": rates_free, "constrained_tok_per_s": rates_con}
    log(f"batch 1: free {r1f:.1f} tok/s, constrained {r1c:.1f} tok/s ({r1c / r1f:.3f}x)")

    res["targets"] = [
        {"name": "structured.batch_throughput_ratio", "value": round(ratio_b, 4), "goal": ">= 0.9x unconstrained",
         "met": ratio_b >= 0.9},
        {"name": "structured.batch1_ratio", "value": round(r1c / r1f, 4), "goal": ">= 0.95x unconstrained",
         "met": r1c / r1f >= 0.95},
        {"name": "structured.compile_ms", "value": round(res["compile_first_ms"], 2), "goal": "<= 50 ms",
         "met": res["compile_first_ms"] <= 50},
        {"name": "structured.valid_outputs", "value": f"{valid}/{b}", "goal": "every output that the grammar "
         "ended validates", "met": valid >= res["batch"]["finished_by_grammar"]},
    ]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"structured_{gpu.replace(' ', '_')}_{res['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Structured output vs unconstrained: {args.model} {args.dtype}, {gpu}, {res['date']}", "",
             f"Tokenizer {res['tokenizer']} ({n_text} tokens; model vocabulary {res['model_vocab']}), prompts of "
             f"{args.prompt_len} random tokens, max_tokens {args.max_tokens}, greedy. `python bench/bench_structured.py`", "",
             "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['goal']} | {t['met']} |" for t in res["targets"]]
    lines += ["", f"Batch {b}: unconstrained {r_free['tok_per_s']:.0f} output tok/s ({r_free['output_tokens']} tokens in "
              f"{r_free['wall_s']:.2f} s), JSON schema {r_con['tok_per_s']:.0f} tok/s ({r_con['output_tokens']} tokens in "
              f"{r_con['wall_s']:.2f} s).", f"Batch 1 decode: {r1f:.1f} vs {r1c:.1f} tok/s (medians of 3).",
              f"Compile: first {res['compile_first_ms']:.1f} ms, cached {res['compile_cached_ms']:.3f} ms."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    llm.close()


if __name__ == "__main__":
    main()
