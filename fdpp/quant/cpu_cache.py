"""Memoized dequantization on the CPU reference path, within a memory budget.

The reference path (the CPU) runs a quantized weight by dequantizing it and calling a dense matmul. Doing
that at every matmul keeps memory at the packed size but costs one dequantization of every weight per
decode step (for the embedded SmolLM2 in Q4_1: ~6x slower decode than float32 weights). Memoizing every
dequantized weight would be fast but hold packed + float32 bytes, more than a dense float32 model.

``plan_cpu_memoization`` takes the middle: weights are memoized (their first dequantization is kept) in
model order while ``packed bytes + memoized bytes <= fraction * dense bytes`` of the quantized weights, so
memory stays below the dense model's (``fraction`` < 1) and only the rest is dequantized per matmul.
``fraction`` defaults to ``$FDPP_CPU_DEQUANT_CACHE`` or 0.9; 0 memoizes nothing (memory at the packed size).
"""
from __future__ import annotations

import os

from torch import nn

from fdpp.quant.formats import QuantParts, QuantTensor

DEFAULT_FRACTION = 0.9
ENV_FRACTION = "FDPP_CPU_DEQUANT_CACHE"


def default_fraction() -> float:
    """The memory budget as a fraction of the dense weights' bytes (``$FDPP_CPU_DEQUANT_CACHE`` or 0.9)."""
    raw = os.environ.get(ENV_FRACTION)
    if raw is None:
        return DEFAULT_FRACTION
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${ENV_FRACTION}={raw!r} is not a number; give a fraction in [0, 1) of the dense "
                         "weights' memory (0 disables memoization)") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"${ENV_FRACTION}={raw!r} must be in [0, 1): at 1 or more the quantized model would "
                         "use more memory than its dense twin")
    return value


def plan_cpu_memoization(model: nn.Module, fraction: float | None = None) -> dict[str, int]:
    """Mark the quantized weights of ``model`` to memoize (see the module docstring).

    Returns ``{"packed_bytes", "dense_bytes", "memoized_bytes", "num_weights", "num_memoized"}`` over the
    quantized weights (tied weights counted once); ``dense_bytes`` is their size in the parameters' dtype."""
    fraction = default_fraction() if fraction is None else float(fraction)
    weights: dict[int, tuple[QuantTensor | QuantParts, int]] = {}
    for p in model.parameters():
        q = getattr(p, "quant", None)
        if isinstance(q, (QuantTensor, QuantParts)) and id(q) not in weights:
            weights[id(q)] = (q, q.shape[0] * q.shape[1] * p.element_size())
    packed = sum(q.nbytes for q, _ in weights.values())
    dense = sum(b for _, b in weights.values())
    budget = fraction * dense - packed
    used = count = 0
    for q, nbytes in weights.values():
        q.memoize = used + nbytes <= budget
        if q.memoize:
            used += nbytes
            count += 1
    return {"packed_bytes": packed, "dense_bytes": dense, "memoized_bytes": used, "num_weights": len(weights),
            "num_memoized": count}
