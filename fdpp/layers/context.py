"""The forward context: per-step attention metadata and the engine's op backends, set by the model
runner around a forward pass.

A context manager over ``contextvars`` instead of a bare global (each thread and asyncio task has its
own); nesting is refused so a stale context can never leak into another forward pass.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from fdpp.ops.attention import AttentionMetadata
from fdpp.ops.backend import Backends, engine_backends

_META: contextvars.ContextVar[Any] = contextvars.ContextVar("fdpp_forward_meta", default=None)


@contextlib.contextmanager
def forward_context(meta: Any, backends: Backends | None = None) -> Iterator[Any]:
    """Run a forward pass with ``meta`` (the step's ``AttentionMetadata``) and ``backends`` (the
    engine's; None: the ops use their device's default, as in tests that call a model directly).
    The metadata memoizes what its layers derive alike for the pass (``AttentionMetadata.forward_pass``)."""
    if _META.get() is not None:
        raise RuntimeError("forward_context entered twice: a forward pass is already in progress")
    token = _META.set(meta)
    try:
        with engine_backends(backends), _memoizing(meta):
            yield meta
    finally:
        _META.reset(token)


def _memoizing(meta: Any) -> contextlib.AbstractContextManager:
    return meta.forward_pass() if isinstance(meta, AttentionMetadata) else contextlib.nullcontext()


def get_attention_metadata() -> Any:
    meta = _META.get()
    if meta is None:
        raise RuntimeError("attention called outside a forward_context (the model runner sets it)")
    return meta
