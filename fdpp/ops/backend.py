"""Which implementation each op uses.

``auto`` resolves per call from the tensor's device: Triton kernels on CUDA, the plain-PyTorch reference
elsewhere. Tests force Triton on the CPU (under ``TRITON_INTERPRET=1``) with ``use_backends``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

ATTENTION_BACKENDS = ("auto", "reference", "triton", "triton-sync")
LINEAR_BACKENDS = ("auto", "reference", "table", "gemv", "flat", "cublas")


@dataclass(frozen=True)
class Backends:
    attention: str = "auto"
    linear: str = "auto"


_current = Backends()


def get_backends() -> Backends:
    return _current


def set_backends(attention: str | None = None, linear: str | None = None) -> Backends:
    """Set the process-wide backends; returns the previous setting."""
    global _current
    if attention is not None and attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {attention!r} unknown; choose one of {ATTENTION_BACKENDS}")
    if linear is not None and linear not in LINEAR_BACKENDS:
        raise ValueError(f"linear backend {linear!r} unknown; choose one of {LINEAR_BACKENDS}")
    prev = _current
    _current = replace(
        _current,
        attention=attention if attention is not None else _current.attention,
        linear=linear if linear is not None else _current.linear,
    )
    return prev


@contextlib.contextmanager
def use_backends(attention: str | None = None, linear: str | None = None) -> Iterator[None]:
    prev = set_backends(attention, linear)
    try:
        yield
    finally:
        set_backends(prev.attention, prev.linear)


def attention_backend(device: torch.device) -> str:
    """Resolved attention backend for tensors on ``device``: reference | triton | triton-sync."""
    b = _current.attention
    if b == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return b


def linear_backend(device: torch.device) -> str:
    """Resolved linear backend: reference | table | gemv | flat | cublas."""
    b = _current.linear
    if b == "auto":
        return "table" if device.type == "cuda" else "reference"
    return b
