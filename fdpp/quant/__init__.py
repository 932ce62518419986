"""Quantized weights: formats and reference dequantization (``formats``), checkpoint layouts
(``packing``: AWQ, GPTQ, compressed-tensors FP8, GGUF tensors) and the load-time quantization config."""
from fdpp.quant.formats import (
    FORMATS,
    GGUF_BLOCKS,
    QuantParts,
    QuantTensor,
    dequantize,
    quantize,
    random_quant,
)

__all__ = ["FORMATS", "GGUF_BLOCKS", "QuantParts", "QuantTensor", "dequantize", "quantize", "random_quant"]
