"""Which layers a quantization hurts: perplexity of the embedded SmolLM2 (CPU) on fdpp's built-in text
with one group of linear weights quantized at a time (quantized, then dequantized to float32 in place).

    OMP_NUM_THREADS=1 nice -n 10 python bench/quant_ablation.py [--formats fp8 int8 int4] [--group-size 64]
        [--fp8-group-size 128] [--fp8-scale absmax]

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


def _quantized(w: torch.Tensor, fmt: str, args) -> torch.Tensor:
    """``w`` quantized to ``fmt`` as the flags ask, dequantized to float32."""
    from fdpp.quant.formats import FP8_MAX, online_group_size, quantize

    k = w.shape[1]
    if fmt != "fp8":
        return quantize(w, fmt, online_group_size(fmt, k, args.group_size)).dequantize(torch.float32)
    g = next((x for x in (args.fp8_group_size, 128, 64, 32) if 0 < x <= args.fp8_group_size and k % x == 0), 0)
    if args.fp8_scale == "search":
        return quantize(w, "fp8", g).dequantize(torch.float32)
    x = w.float().reshape(w.shape[0], k // g if g else 1, -1)
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return ((x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).reshape(w.shape)


def main() -> int:
    from fdpp import LLM
    from fdpp.quant.formats import online_format
    from fdpp.quant.perplexity import perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", default=["fp8", "int8", "int4"])
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 / int8 group size (else the largest of 128/64/32 dividing K; int8: 0 = per channel)")
    p.add_argument("--fp8-group-size", type=int, default=0, help="fp8 group size (default 0: per channel)")
    p.add_argument("--fp8-scale", choices=("search", "absmax"), default="search",
                   help="fp8 scale: fdpp's MSE search (default) or plain absmax / 448 (the earlier quantizer)")
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
                    module.weight.data = _quantized(w, online_format(fmt, w.shape[1]), args)
                else:
                    module.weight.data = w
            ppl, _ = perplexity(llm)
            print(f"{fmt:5s} {group:8s} {ppl:.4f} {100 * (ppl / base - 1):+.2f}%", flush=True)
    llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
