"""Memoized dequantization on the CPU reference path, within a memory budget.

The reference path (the CPU) runs a quantized weight by dequantizing it and calling a dense matmul. Doing
that at every matmul keeps memory at the packed size but costs one dequantization of every weight per
decode step: a dequantization costs ~40x the matmul it feeds, so even a tenth of the weights left
unmemoized makes decode several times slower (the embedded SmolLM2 in Q4_1 on 2 cores: 14.9 tok/s with
float32 weights, 5.5 with three quarters of them memoized).

``plan_cpu_memoization`` marks weights to memoize (their first dequantization is kept), in model order:
- by default, all of them when the packed and the dense copies together fit in RAM_SHARE (40%) of the
  machine's available memory (``available_ram_bytes``: a small model, as the embedded one); otherwise as
  many as fit in 0.9x the dense bytes and in that share of memory (packed bytes included);
- with ``fraction`` (or ``$FDPP_CPU_DEQUANT_CACHE``, in [0, 1)): while packed + memoized bytes stay under
  ``fraction`` x the dense bytes, so memory stays below the dense model's; 0 memoizes nothing.
Under the ``cpu`` linear backend (the CPU default) weights in a format PyTorch's packed int4 kernel takes
(``fdpp.quant.cpu_int4.packable``: 4- and 8-bit, not the LM head) are left out: PyTorch's packed int4 kernel multiplies them without a
dense copy, so the plan covers the other formats only (the embedded model's Q8_0 embedding / LM head).
"""
from __future__ import annotations

import os

from torch import nn

from fdpp.quant.formats import QuantParts, QuantTensor

DEFAULT_FRACTION = 0.9
ENV_FRACTION = "FDPP_CPU_DEQUANT_CACHE"
RAM_SHARE = 0.4  # of the available memory, at most, for the weights (packed + memoized) by default


def available_ram_bytes() -> int | None:
    """The memory the OS can give now (Linux ``MemAvailable``; else half the physical memory), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return None


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


_AUTO = object()


def plan_cpu_memoization(model: nn.Module, fraction: float | None = None, ram_bytes=_AUTO,
                         packed_kernel: bool = False) -> dict[str, int]:
    """Mark the quantized weights of ``model`` to memoize (see the module docstring). ``ram_bytes``: the
    available memory the default rule sizes itself by (default ``available_ram_bytes()``; None: unknown).
    ``packed_kernel``: the ``cpu`` linear backend will run the ``packable`` weights through PyTorch's packed
    int4 kernel (``fdpp.quant.cpu_int4``), so they need no dense copy and are left out of the plan.

    Returns ``{"packed_bytes", "dense_bytes", "memoized_bytes", "num_weights", "num_memoized"}`` over the
    quantized weights (tied weights counted once); ``dense_bytes`` is their size in the parameters' dtype."""
    from fdpp.quant.cpu_int4 import packable

    weights = {id(q): (q, q.shape[0] * q.shape[1] * p.element_size()) for q, p in _quantized_weights(model)
               if not (packed_kernel and packable(q))}
    packed = sum(q.nbytes for q, _ in weights.values())
    dense = sum(b for _, b in weights.values())
    ram = None
    if fraction is None and os.environ.get(ENV_FRACTION) is None:
        ram = available_ram_bytes() if ram_bytes is _AUTO else ram_bytes
    if ram is None:  # the fraction rule: memory below the dense model's
        fraction = default_fraction() if fraction is None else float(fraction)
        budget = fraction * dense - packed
    else:  # everything if it fits in the RAM share, else the 0.9x rule capped by that share
        cap = RAM_SHARE * ram - packed
        budget = dense if dense <= cap else min(DEFAULT_FRACTION * dense - packed, cap)
    used = count = 0
    for q, nbytes in weights.values():
        q.memoize = used + nbytes <= budget
        if q.memoize:
            used += nbytes
            count += 1
    return {"packed_bytes": packed, "dense_bytes": dense, "memoized_bytes": used, "num_weights": len(weights),
            "num_memoized": count}


def warm_cpu_memoization(model: nn.Module) -> int:
    """Dequantize now every weight ``plan_cpu_memoization`` marked (in its parameter's dtype, the one the
    reference matmul asks for), so that the first request does not pay for it; returns how many."""
    count = 0
    for q, p in _quantized_weights(model):
        if q.memoize:
            q.dense_for_matmul(p.dtype)
            count += 1
    return count


def count_packable(model: nn.Module) -> int:
    """How many quantized weights of ``model`` (each part of a merged one counted) the packed int4 kernel
    takes (``fdpp.quant.cpu_int4.packable``)."""
    from fdpp.quant.cpu_int4 import packable

    return sum(len(getattr(q, "parts", [q])) for q, _ in _quantized_weights(model) if packable(q))


def pack_cpu_int4(model: nn.Module) -> int:
    """Put every ``packable`` weight of ``model`` in the packed int4 CPU layout now, so that the first
    request does not pay for it (``fdpp.quant.cpu_int4.pack_model``); returns how many."""
    from fdpp.quant.cpu_int4 import pack_model

    return pack_model(q for q, _ in _quantized_weights(model))


def _quantized_weights(model: nn.Module) -> list[tuple[QuantTensor | QuantParts, nn.Parameter]]:
    """Each quantized weight of ``model`` once (tied parameters share theirs), with its first parameter."""
    seen: dict[int, tuple] = {}
    for p in model.parameters():
        q = getattr(p, "quant", None)
        if isinstance(q, (QuantTensor, QuantParts)) and id(q) not in seen:
            seen[id(q)] = (q, p)
    return list(seen.values())
