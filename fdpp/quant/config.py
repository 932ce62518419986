"""What ``quantization=`` means for one model: which weights are kept or made quantized at load.

``quantization`` (``LLM(..., quantization=...)``, ``--quantization``, vLLM's name):

* ``None`` / ``"auto"``: keep the checkpoint's own format on every device: GGUF blocks, AWQ / GPTQ int4,
  FP8 (compressed-tensors / fp8) checkpoints stay quantized; fp16/bf16 checkpoints stay dense. The CPU
  reference path dequantizes each weight at each matmul (memory stays at the packed size, ~0.6 bytes a
  weight for 4-bit blocks instead of 4 for float32; the price is one dequantization of every weight per
  step: see docs/QUANTIZATION.md). Nothing is dequantized at load unless ``"none"`` asks for it.
* ``"fp8"`` | ``"int8"`` | ``"int4"`` | ``"q4_k"``: quantize the linear layers at load (online): FP8 e4m3 and
  INT8 with per-output-channel scales, INT4 with per-group (128, else the largest of 64/32 dividing K)
  scales and zero points, Q4_K in llama.cpp's k-quant blocks. A quantized checkpoint is dequantized
  first, then re-quantized (you asked for it).
* ``"gguf"`` | ``"awq"`` | ``"gptq"`` | ``"compressed-tensors"`` | ``"fp8-checkpoint"``: the checkpoint's
  format, named explicitly: it must match, and it is kept quantized on every device (also the CPU).
* ``"none"``: dense weights: a quantized checkpoint is dequantized to the compute dtype at load.
* the other GGUF block names (``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_k"``, ``"q6_k"``): quantize float
  weights into that block format at load too (and fill random-weight presets with it, for benchmarks).

The LM head stays dense under online quantization (as in vLLM); checkpoints decide for themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fdpp.errors import UnsupportedModelError
from fdpp.quant.formats import GGUF_BLOCKS

logger = logging.getLogger(__name__)

ONLINE_METHODS = ("fp8", "int8", "int4", "q4_k")
CHECKPOINT_METHODS = ("gguf", "awq", "gptq", "compressed-tensors", "fp8-checkpoint")
QUANTIZATION_CHOICES = tuple(dict.fromkeys(("auto", "none", *ONLINE_METHODS, *CHECKPOINT_METHODS, *GGUF_BLOCKS)))


@dataclass(frozen=True)
class QuantPlan:
    """How one model is loaded.

    checkpoint: the checkpoint's own quantization (None, gguf, awq, gptq, fp8-checkpoint).
    online: the format float linear weights are quantized into at load, or None.
    keep: quantized checkpoint tensors are kept as they are (else dequantized at load).
    group_size: int4 group size for online quantization.
    gptq_zero_offset: 1 for GPTQ v1 checkpoints (zeros stored minus one), 0 for gptq_v2.
    """

    checkpoint: str | None = None
    online: str | None = None
    keep: bool = False
    group_size: int = 128
    gptq_zero_offset: int = 1

    @property
    def is_quantized(self) -> bool:
        return self.online is not None or (self.keep and self.checkpoint is not None)

    @property
    def tag(self) -> str:
        """A short name for caches and reports ("" when the weights are dense)."""
        if self.online is not None:
            return self.online
        return self.checkpoint if self.keep and self.checkpoint else ""


def checkpoint_quantization(hf_config: dict[str, Any], source_kind: str) -> tuple[str | None, dict]:
    """(method, its quantization_config) of a checkpoint; refuses formats fdpp cannot read."""
    if source_kind == "gguf":
        return "gguf", {}
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if not qc:
        return None, {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        bits, version = int(qc.get("bits", qc.get("w_bit", 4))), str(qc.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
            raise UnsupportedModelError(
                f"AWQ checkpoint with bits={bits}, version={version!r}, zero_point={qc.get('zero_point')}: fdpp reads "
                "4-bit AWQ 'gemm' checkpoints with zero points only")
        return "awq", qc
    if method == "gptq":
        bits = int(qc.get("bits", 4))
        if bits != 4:
            raise UnsupportedModelError(f"GPTQ checkpoint with bits={bits}: fdpp reads 4-bit GPTQ checkpoints only")
        return "gptq", qc
    if method in ("compressed-tensors", "fp8"):
        if method == "fp8" and qc.get("weight_block_size"):
            raise UnsupportedModelError(
                f"FP8 checkpoint with block-wise weight scales (weight_block_size={qc['weight_block_size']}): fdpp "
                "reads per-tensor and per-channel FP8 scales only")
        if method == "compressed-tensors":
            for name, group in (qc.get("config_groups") or {}).items():
                w = group.get("weights") or {}
                if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8 or \
                        w.get("strategy", "tensor") not in ("tensor", "channel"):
                    raise UnsupportedModelError(
                        f"compressed-tensors checkpoint group {name!r} quantizes weights as {w}: fdpp reads FP8 "
                        "(8-bit float, per-tensor or per-channel) compressed-tensors checkpoints only")
        return "fp8-checkpoint", qc
    raise UnsupportedModelError(
        f"the checkpoint is quantized with {method or 'an unnamed method'!r} (config.json quantization_config), "
        "which fdpp cannot read; supported: AWQ and GPTQ 4-bit, FP8 (compressed-tensors / fp8), GGUF files. "
        "Load an fp16/bf16 checkpoint instead (add --quantization fp8|int8|int4 to quantize it at load)")


def resolve_quant_plan(requested: str | None, hf_config: dict[str, Any], source_kind: str,
                       device: torch.device, *, random_weights: bool = False) -> QuantPlan:
    """The ``QuantPlan`` for a ``quantization`` argument and a checkpoint (see the module docstring)."""
    req = "auto" if requested is None else str(requested).lower()
    if req not in QUANTIZATION_CHOICES:
        raise UnsupportedModelError(f"quantization={requested!r} is not supported; choose one of "
                                    f"{', '.join(QUANTIZATION_CHOICES)}")
    method, qc = (None, {}) if random_weights else checkpoint_quantization(hf_config, source_kind)
    offset = 0 if str(qc.get("checkpoint_format", "")).lower() == "gptq_v2" else 1
    if req in ONLINE_METHODS or req in GGUF_BLOCKS:
        if method is not None:
            logger.warning("the checkpoint is %s-quantized; quantization=%s dequantizes it at load and "
                           "re-quantizes it", method, req)
        return QuantPlan(method, req, keep=False, gptq_zero_offset=offset)
    if req == "none":
        return QuantPlan(method, None, keep=False, gptq_zero_offset=offset)
    if req == "auto":  # NOTE: on every device, the CPU included: nothing is dequantized unless asked for
        return QuantPlan(method, None, keep=method is not None, gptq_zero_offset=offset)
    if req != method and not (req == "compressed-tensors" and method == "fp8-checkpoint"):
        raise UnsupportedModelError(
            f"quantization={req!r} was requested but the checkpoint is {method or 'not quantized'}; pass "
            f"quantization={method or 'fp8|int8|int4'!r} or 'auto'")
    return QuantPlan(method, None, keep=True, gptq_zero_offset=offset)
