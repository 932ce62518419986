"""Quantized Hugging Face checkpoints as a stream of ``(name, tensor | QuantTensor)``.

AWQ / GPTQ store a quantized linear as several tensors (``<module>.qweight``, ``.qzeros``, ``.scales``,
``.g_idx``) and FP8 / INT8 (compressed-tensors) checkpoints as ``<module>.weight`` (float8 / int8) +
``.weight_scale`` (+ ``.input_scale``, unused: activations are scaled per token at run time; + an all-zero
``.weight_zero_point`` of symmetric INT8, dropped). ``group_quantized`` collects a module's parts
(checkpoints store them next to each other, so few are pending at a time) and yields one
``<module>.weight`` ``QuantTensor`` in fdpp's layout, or its dequantized float tensor when the plan does not
keep quantized weights. Everything else passes through, converted to the compute dtype.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from fdpp.errors import ModelLoadError, UnsupportedModelError
from fdpp.quant.config import QuantPlan
from fdpp.quant.formats import QuantTensor
from fdpp.quant.packing import awq_to_quant, fp8_to_quant, gptq_to_quant

_PARTS = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "fp8-checkpoint": ("weight", "weight_scale"),
}
_OPTIONAL = {"gptq": ("g_idx",)}


def _convert(method: str, prefix: str, parts: dict, plan: QuantPlan) -> QuantTensor:
    if method == "awq":
        return awq_to_quant(parts["qweight"], parts["qzeros"], parts["scales"], prefix)
    if method == "gptq":
        return gptq_to_quant(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), name=prefix,
                             zero_offset=plan.gptq_zero_offset)
    return fp8_to_quant(parts["weight"], parts["weight_scale"], prefix)


def group_quantized(tensors: Iterable[tuple[str, torch.Tensor]], plan: QuantPlan,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    """Join a quantized checkpoint's per-module parts into ``<module>.weight`` weights (see the module doc).

    ``tensors`` must be unconverted (float8 weights and float32 scales as stored)."""
    method = plan.checkpoint
    parts_of = _PARTS[method]
    pending: dict[str, dict[str, torch.Tensor]] = {}

    def finish(prefix: str) -> tuple[str, torch.Tensor | QuantTensor]:
        qt = _convert(method, prefix, pending.pop(prefix), plan)
        return f"{prefix}.weight", (qt if plan.keep else qt.dequantize(dtype))

    for name, t in tensors:
        prefix, _, part = name.rpartition(".")
        if part == "weight_scale_inv":
            raise UnsupportedModelError(f"tensor {name!r}: block-wise FP8 scales are not supported by fdpp")
        if method == "fp8-checkpoint" and part == "input_scale":
            continue  # static activation scales: fdpp quantizes activations per token at run time
        if method == "fp8-checkpoint" and part == "weight_zero_point":
            if t.bool().any():
                raise UnsupportedModelError(f"tensor {name!r}: asymmetric (non-zero zero point) 8-bit weights are "
                                            "not supported; fdpp reads symmetric INT8 compressed-tensors weights")
            continue
        is_part = part in parts_of and (method != "fp8-checkpoint" or part == "weight_scale"
                                        or t.dtype in (torch.float8_e4m3fn, torch.int8) or prefix in pending)
        if not is_part:
            yield name, (t.to(dtype) if t.is_floating_point() else t).contiguous()
            continue
        pending.setdefault(prefix, {})[part] = t
        if all(p in pending[prefix] for p in parts_of):
            yield finish(prefix)
    for prefix in list(pending):
        missing = [p for p in parts_of if p not in pending[prefix] and p not in _OPTIONAL.get(method, ())]
        if missing:
            raise ModelLoadError(f"quantized tensor {prefix!r} ({method}) is missing its part(s) {missing}; the "
                                 "checkpoint is incomplete or not in the layout its quantization_config names")
        yield finish(prefix)
