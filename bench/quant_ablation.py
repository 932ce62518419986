"""Which layers a quantization hurts: perplexity of the embedded SmolLM2 (CPU) on fdpp's built-in text
with one group of linear weights quantized at a time (quantized, then dequantized to float32 in place).

    OMP_NUM_THREADS=1 nice -n 10 python bench/quant_ablation.py [--formats fp8 int8 int4]

Loads the model once (``quantization="none"``: the GGUF Q4_1 weights dequantized to float32) and prints
one line per (format, layer group) with the change against the unquantized run. Minutes on one core.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

GROUPS = {"all": None, "qkv": ["qkv_proj"], "o": ["o_proj"], "gate_up": ["gate_up_proj"], "down": ["down_proj"]}


def main() -> int:
    from fdpp import LLM
    from fdpp.quant.formats import online_format, quantize
    from fdpp.quant.perplexity import perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", default=["fp8", "int8", "int4"])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (else the largest dividing K)")
    args = p.parse_args()
    llm = LLM(quantization="none", device="cpu", show_progress=False, calibration="off")
    linears = {n: m for n, m in llm.engine.model.named_modules() if n.endswith(tuple(
        s for v in GROUPS.values() if v for s in v))}
    dense = {n: m.weight.data.clone() for n, m in linears.items()}
    base, num_tokens = perplexity(llm)
    print(f"none: perplexity {base:.4f} over {num_tokens} tokens")
    for fmt in args.formats:
        for group, frags in GROUPS.items():
            for name, module in linears.items():
                w = dense[name]
                if frags is None or any(f in name for f in frags):
                    g = next(x for x in (args.group_size, 128, 64, 32) if w.shape[1] % x == 0)
                    module.weight.data = quantize(w, online_format(fmt, w.shape[1]), g).dequantize(torch.float32)
                else:
                    module.weight.data = w
            ppl, _ = perplexity(llm)
            print(f"{fmt:5s} {group:8s} {ppl:.4f} {100 * (ppl / base - 1):+.2f}%", flush=True)
    llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
