"""Small helpers shared across fdpp's layers (no fdpp imports: anything may use them)."""
from __future__ import annotations

import os

import torch

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """"float16" for torch.float16 (and for "float16" / "fp16" / "half" / "torch.float16")."""
    if isinstance(dtype, torch.dtype):
        return DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def cache_dir(*parts: str) -> str:
    """fdpp's cache directory ($FDPP_CACHE_DIR, else ~/.cache/fdpp), joined with ``parts``."""
    base = os.environ.get("FDPP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fdpp")
    return os.path.join(base, *parts)
