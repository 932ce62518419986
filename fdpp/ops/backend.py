"""Which implementation each op uses: one ``Backends`` object per engine, seen by the ops through a
context variable.

- An engine's worker resolves its ``Backends`` once (``Backends.resolve(config, device)``; one per rank
  under tensor parallelism) and its model runner enters it with the forward context
  (``fdpp.layers.context.forward_context``) around every forward pass, CUDA-graph capture and the LM head
  included. Two engines in one process therefore never see each other's choice.
- Outside a forward pass (a direct op call: kernel tests, benchmarks), an op uses the default of its
  tensors' device: Triton kernels (and the tuned GEMM table) on CUDA, the plain-PyTorch reference
  elsewhere (``Backends.default``).
- ``use_backends(...)`` forces the named fields for every op called in its block, inside engine forward
  passes too: tests compare implementations on one loaded model (Triton under ``TRITON_INTERPRET=1`` on
  the CPU), calibration runs the reference attention to observe the scores. Graphs captured earlier keep
  the kernels they captured.

The state is a ``contextvars.ContextVar``, not a module global: each thread (and each asyncio task) has
its own.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

ATTENTION_BACKENDS = ("auto", "reference", "triton", "triton-sync")
LINEAR_BACKENDS = ("auto", "reference", "cpu", "table", "gemv", "flat", "cublas")
KERNEL_BACKENDS = ("auto", "reference", "triton")  # RMSNorm and the fused rotary + KV-cache store

_CHOICES = {"attention": ATTENTION_BACKENDS, "linear": LINEAR_BACKENDS,
            "norm": KERNEL_BACKENDS, "rotary": KERNEL_BACKENDS}


def _check(field: str, value: str) -> None:
    choices = _CHOICES[field]
    if value not in choices:
        raise ValueError(f"{field} backend {value!r} unknown; choose one of {choices}")


@dataclass(frozen=True)
class Backends:
    """The resolved implementation of each op (never "auto").

    attention: reference | triton (unified-max softmax where calibrated) | triton-sync;
    linear: reference | cpu (the reference matmul; 4- and 8-bit weights through PyTorch's packed int4 CPU
    kernel, ``fdpp.quant.cpu_int4``) | table (the tuned dataflow) | gemv | flat | cublas;
    norm: reference | triton (RMSNorm, with the residual add fused);
    rotary: reference | triton (rotary embedding fused with the paged KV-cache store).
    """

    attention: str
    linear: str
    norm: str
    rotary: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check(f.name, value)
            if value == "auto":
                raise ValueError(f"Backends.{f.name}='auto' is not resolved; build it with Backends.resolve "
                                 "(config, device) or Backends.default(device)")

    @classmethod
    def default(cls, device: torch.device | str) -> Backends:
        """The documented default of a device: Triton kernels and the tuned GEMM table on CUDA; on the CPU the
        reference ops with the ``cpu`` linear (packed 4- and 8-bit weights); the reference ops elsewhere."""
        kind = torch.device(device).type
        return _DEFAULT_CUDA if kind == "cuda" else _DEFAULT_CPU if kind == "cpu" else _DEFAULT_OTHER

    @classmethod
    def resolve(cls, config: Any, device: torch.device | str) -> Backends:
        """The backends ``config`` (an ``EngineConfig``: ``attention_backend``, ``linear_backend``) names on
        ``device``; "auto" fields take the device's default. Norm and rotary follow the device."""
        attention = getattr(config, "attention_backend", "auto")
        linear = getattr(config, "linear_backend", "auto")
        _check("attention", attention)
        _check("linear", linear)
        base = cls.default(device)
        return replace(base, attention=base.attention if attention == "auto" else attention,
                       linear=base.linear if linear == "auto" else linear)


_DEFAULT_CUDA = Backends(attention="triton", linear="table", norm="triton", rotary="triton")
_DEFAULT_OTHER = Backends(attention="reference", linear="reference", norm="reference", rotary="reference")
_DEFAULT_CPU = replace(_DEFAULT_OTHER, linear="cpu")


@dataclass(frozen=True)
class _Scope:
    engine: Backends | None = None  # the forward pass's engine backends (None: outside a forward)
    override: tuple[tuple[str, str], ...] = ()  # use_backends' forced fields
    effective: Backends | None = None  # engine with override applied (what the ops use in a forward)


def _scope_with(engine: Backends | None, override: tuple[tuple[str, str], ...]) -> _Scope:
    effective = engine if engine is None or not override else replace(engine, **dict(override))
    return _Scope(engine, override, effective)


# (_Scope is frozen: a shared default is safe)
_SCOPE: contextvars.ContextVar[_Scope] = contextvars.ContextVar("fdpp_backends", default=_Scope())  # noqa: B039


def current_backends(device: torch.device | str) -> Backends:
    """The backends an op on ``device`` uses now: the forward pass's engine backends, else the device's
    default; either with the active ``use_backends`` fields forced."""
    scope = _SCOPE.get()
    if scope.effective is not None:
        return scope.effective
    base = Backends.default(device)
    return replace(base, **dict(scope.override)) if scope.override else base


def attention_backend(device: torch.device | str) -> str:
    """The attention implementation for tensors on ``device``: reference | triton | triton-sync."""
    return current_backends(device).attention


def linear_backend(device: torch.device | str) -> str:
    """The linear implementation for tensors on ``device``: reference | cpu | table | gemv | flat | cublas."""
    return current_backends(device).linear


def norm_backend(device: torch.device | str) -> str:
    """The RMSNorm implementation for tensors on ``device``: reference | triton."""
    return current_backends(device).norm


def rotary_backend(device: torch.device | str) -> str:
    """The rotary + KV-store implementation for tensors on ``device``: reference | triton."""
    return current_backends(device).rotary


@contextlib.contextmanager
def engine_backends(backends: Backends | None) -> Iterator[None]:
    """Make ``backends`` the ops' choice in this block (the model runner enters it through the forward
    context; ``use_backends`` fields still win). None: leave the current choice."""
    if backends is None:
        yield
        return
    if not isinstance(backends, Backends):
        raise TypeError(f"engine_backends: expected a Backends, got {type(backends).__name__}")
    scope = _SCOPE.get()
    token = _SCOPE.set(_scope_with(backends, scope.override))
    try:
        yield
    finally:
        _SCOPE.reset(token)


@contextlib.contextmanager
def use_backends(attention: str | None = None, linear: str | None = None, norm: str | None = None,
                 rotary: str | None = None) -> Iterator[None]:
    """Force the named implementations for every op called in this block, in engine forward passes too
    (tests, benchmarks, calibration). None leaves a field as it is; nested blocks add to the outer one."""
    forced = {"attention": attention, "linear": linear, "norm": norm, "rotary": rotary}
    for name, value in forced.items():
        if value is None:
            continue
        _check(name, value)
        if value == "auto":
            raise ValueError(f"use_backends({name}='auto'): use_backends forces an implementation; pass None "
                             "to leave the field to the engine (or the device default)")
    scope = _SCOPE.get()
    override = dict(scope.override)
    override.update({k: v for k, v in forced.items() if v is not None})
    token = _SCOPE.set(_scope_with(scope.engine, tuple(sorted(override.items()))))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def set_backends(*args: Any, **kwargs: Any) -> None:
    """Removed: the backends are per engine now (no process-wide setting). Raises."""
    raise RuntimeError(
        "fdpp.ops.backend.set_backends was removed: backends are chosen per engine. Give them to the engine "
        "(LLM(attention_backend=..., linear_backend=...) or EngineConfig), or force them for a block of code "
        "with `with fdpp.ops.backend.use_backends(attention=..., linear=...):` (tests, benchmarks)"
    )
