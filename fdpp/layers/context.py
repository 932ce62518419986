"""The forward context: per-step attention metadata, set by the model runner around a forward pass.

A context manager instead of a bare global; nesting is refused so a stale context can never leak
into another forward pass.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_current: Any = None


@contextlib.contextmanager
def forward_context(meta: Any) -> Iterator[Any]:
    global _current
    if _current is not None:
        raise RuntimeError("forward_context entered twice: a forward pass is already in progress")
    _current = meta
    try:
        yield meta
    finally:
        _current = None


def get_attention_metadata() -> Any:
    if _current is None:
        raise RuntimeError("attention called outside a forward_context (the model runner sets it)")
    return _current
