"""Structured output: constrained decoding with a grammar engine (xgrammar).

``StructuredOutputsParams`` (pure Python) says what a request wants; ``fdpp.structured.backend``
compiles it (cached, with limits) and keeps one matcher per sequence that fills the token bitmask
the sampler applies on the device.
"""
from fdpp.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
