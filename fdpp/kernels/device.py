"""What a kernel wrapper needs to know about where it runs: the SM count and Triton's CPU interpreter.

Kernel-side helpers only (torch and the environment; nothing else of fdpp), shared by every kernel.
"""
from __future__ import annotations

import os

import torch

_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached per device).

    Off CUDA (Triton's interpreter on the CPU) the answer is 1: the interpreter runs one program at a
    time, so grid-sizing heuristics see one processor there. Tests that need a split path pass the
    split count explicitly instead of relying on a pretend GPU."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _NUM_SMS.get(idx)
    if n is None:
        n = _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def interpreting() -> bool:
    """Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_bf16_dot(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast bf16 ``tl.dot`` operands to fp32: Triton's interpreter multiplies
    bf16 dot operands as raw uint16 bits (garbage of ~1e10). Never true on a GPU."""
    return dtype == torch.bfloat16 and interpreting()


_CAPABILITY: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability of ``device`` (cached per device); (0, 0) off CUDA."""
    if device.type != "cuda":
        return (0, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cap


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` use programmatic dependent launch (PDL, compute capability >= 9).

    A PDL kernel is launched while its predecessor in the stream still runs: it reads only immutable
    data (weights) before ``gdc_wait`` and everything else after it, so its launch and its first weight
    loads overlap the predecessor's tail. Kernels that precede one call ``gdc_launch_dependents`` early.
    ``FDPP_PDL=1`` turns it on, ``FDPP_PDL=0`` off (the default); never in the interpreter."""
    if device.type != "cuda" or interpreting() or os.environ.get("FDPP_PDL", "0") != "1":
        return False
    return capability(device)[0] >= 9
