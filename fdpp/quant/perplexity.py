"""Perplexity of a model on a fixed built-in text, per quantization: how much a format costs in quality.

``python -m fdpp.quant.perplexity`` (defaults: the embedded SmolLM2-135M-Instruct GGUF, quantizations
``gguf none fp8 int8 int4``): loads the model once per quantization, runs the text (data/perplexity_text.txt,
a few hundred tokens, shipped with fdpp) through one prefill, and prints the perplexity of each next token
and its change against ``none`` (the checkpoint's weights dequantized to the compute dtype).
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


def main(argv: list[str] | None = None) -> int:
    from fdpp import LLM

    p = argparse.ArgumentParser(prog="python -m fdpp.quant.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--quantization", nargs="+", default=["gguf", "none", "fp8", "int8", "int4"],
                   help="quantizations to compare (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: float32 on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    rows = []
    for q in args.quantization:
        llm = LLM(args.model, dtype=args.dtype, device=args.device, quantization=q, show_progress=False,
                  calibration="off")
        ppl, n = perplexity(llm)
        rows.append({"quantization": q, "perplexity": ppl, "tokens": n, "device": str(llm.engine.device),
                     "dtype": str(llm.engine.dtype).removeprefix("torch.")})
        llm.close()
        print(f"{q:>8s}: perplexity {ppl:.4f} over {n} tokens", flush=True)
    base = next((r["perplexity"] for r in rows if r["quantization"] == "none"), None)
    print("\n| quantization | perplexity | vs none |\n|---|---|---|")
    for r in rows:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        print(f"| {r['quantization']} | {r['perplexity']:.3f} | {delta} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model or "SmolLM2-135M-Instruct Q4_1 (embedded)",
                                               "text": TEXT_PATH.name, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
