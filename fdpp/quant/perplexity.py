"""Perplexity of a model on a fixed built-in text, per quantization: how much a format costs in quality.

``python -m fdpp.quant.perplexity`` (defaults: the embedded SmolLM2-135M-Instruct GGUF, quantizations
``auto none fp8 int8 int4 q8_0 q4_k``): loads the model once per quantization, runs the text
(data/perplexity_text.txt, 350 tokens, shipped with fdpp) through one prefill, and prints the perplexity
of each next token and its change against ``none`` (the checkpoint's weights dequantized to the compute
dtype). ``--out bench/results/quant_perplexity_cpu_smollm2`` also writes JSON / markdown with targets.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

TEXT_PATH = Path(__file__).resolve().parent / "data" / "perplexity_text.txt"


def builtin_text() -> str:
    """The fixed evaluation text shipped with fdpp."""
    return TEXT_PATH.read_text(encoding="utf-8")


def perplexity(llm, text: str | None = None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of ``llm`` on ``text`` (default: the built-in text), from
    the logits of one prefill (the model's BOS token, if any, is prepended)."""
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("perplexity needs a model with a tokenizer")
    ids = tokenizer.encode(text if text is not None else builtin_text(), add_special_tokens=False)
    bos = llm.engine.model_config.bos_token_id
    if bos is not None:
        ids = [bos, *ids]
    logits = llm.engine.prompt_logits(ids).float()  # [T, vocab]
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:], device=logits.device))
    return math.exp(nll.item()), len(ids) - 1


# the quality targets: perplexity increase over the dequantized float32 weights ("none")
TARGETS = {"fp8": 1.0, "int8": 1.0, "int4": 6.0}


def targets(rows: list[dict]) -> list[dict]:
    """``quant.perplexity.<q>`` targets (percent change vs ``none``) for the quantizations that have a goal."""
    base = next((r["perplexity"] for r in rows if r["quantization"] == "none"), None)
    out = []
    for r in rows:
        goal = TARGETS.get(r["quantization"])
        if base is None or goal is None:
            continue
        delta = 100 * (r["perplexity"] / base - 1)
        out.append({"name": f"quant.perplexity.{r['quantization']}", "value": round(delta, 3),
                    "goal": f"<= +{goal}% vs the dequantized float32 weights", "met": delta <= goal})
    return out


def markdown(rows: list[dict], model: str) -> str:
    """A table of the results (percent vs ``none``) and the targets."""
    base = next((r["perplexity"] for r in rows if r["quantization"] == "none"), None)
    lines = [f"Perplexity of {model} on fdpp/quant/data/{TEXT_PATH.name} ({rows[0]['tokens']} tokens, "
             f"{rows[0]['device']}, {rows[0]['dtype']})", "", "| quantization | stored as | perplexity | vs none |",
             "|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        lines.append(f"| {r['quantization']} | {r['stored_as']} | {r['perplexity']:.3f} | {delta} |")
    tg = targets(rows)
    if tg:
        lines += ["", "| target | value (%) | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {t['value']:+.2f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |" for t in tg]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import datetime
    import platform

    from fdpp import LLM

    p = argparse.ArgumentParser(prog="python -m fdpp.quant.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--quantization", nargs="+", default=["auto", "none", "fp8", "int8", "int4", "q8_0", "q4_k"],
                   help="quantizations to compare; auto = the checkpoint's own format (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: float32 on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--linear-backend", default="reference",
                   help="reference (default: the formats' own quality, dequantized weights) or cpu (on the CPU, "
                   "through PyTorch's packed int4 kernel with bfloat16 activations, as the engine runs them)")
    p.add_argument("--out", default=None, help="also write <OUT>.json and <OUT>.md (results and quant.* targets)")
    args = p.parse_args(argv)
    model = args.model or "SmolLM2-135M-Instruct Q4_1 (embedded)"
    rows = []
    for q in args.quantization:
        llm = LLM(args.model, dtype=args.dtype, device=args.device, quantization=q, show_progress=False,
                  calibration="off", linear_backend=args.linear_backend)
        qkv = getattr(llm.engine.model.model.layers[0].self_attn, "qkv_proj", None)
        qt = getattr(getattr(qkv, "weight", None), "quant", None)
        stored = getattr(qt, "fmt", "dense")
        if getattr(qt, "group_size", 0) and stored in ("fp8", "int8"):
            stored = f"{stored} g{qt.group_size}"  # per-group scales (per channel otherwise)
        ppl, n = perplexity(llm)
        rows.append({"quantization": q, "stored_as": stored, "perplexity": ppl, "tokens": n,
                     "device": str(llm.engine.device), "dtype": str(llm.engine.dtype).removeprefix("torch."),
                     "linear_backend": args.linear_backend})
        llm.close()
        print(f"{q:>8s}: perplexity {ppl:.4f} over {n} tokens (first QKV stored as {stored})", flush=True)
    text = markdown(rows, model)
    print("\n" + text)
    if args.out:
        import torch as _torch

        result = {"model": model, "text": TEXT_PATH.name, "date": datetime.date.today().isoformat(),
                  "machine": platform.processor() or platform.machine(), "torch": _torch.__version__,
                  "results": rows, "targets": targets(rows)}
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
