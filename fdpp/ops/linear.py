"""The linear op: ``y = epilogue(x @ weight.T)`` dispatched to one of FlashDecoding++'s three GEMM
implementations.

Backends (``fdpp.ops.backend.linear_backend``):
- ``reference``: plain PyTorch (the CPU default).
- ``cublas``: torch.nn.functional.linear (cuBLAS on a GPU) plus the epilogue in PyTorch (ImplC).
- ``gemv`` / ``flat``: force the CUDA-core GEMV (ImplA) or the flat tensor-core GEMM (ImplB).
- ``table``: the heuristic dataflow (the CUDA default): an O(1), sync-free lookup of (GPU, dtype, N, K, M)
  in the tuned table (fdpp.dataflow), falling back to a rule (gemv for M = 1, flat for M <= 64, else
  cuBLAS) where the table has no entry.
"""
from __future__ import annotations

import torch

from fdpp.dataflow.table import choose_impl
from fdpp.kernels.gemv import linear_reference
from fdpp.ops.backend import linear_backend

ACTS = (None, "silu_and_mul")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """``y = x @ weight.T (+ bias)``, then ``act``, then ``+ residual``.

    x: ``[..., K]`` (leading dims are flattened into M); weight: ``[N, K]``; bias: ``[N]``.
    ``act="silu_and_mul"``: weight is a fused [gate; up] of ``2F`` rows and y is
    ``silu(x @ gate.T) * (x @ up.T)`` with last dim F. residual: ``[..., N_out]``, added last.
    Returns ``[..., N_out]`` in x's dtype.
    """
    if act not in ACTS:
        raise ValueError(f"linear: act={act!r} is not supported; use one of {ACTS}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match; expected x [..., K] "
            f"and weight [N, K]"
        )
    n, k = weight.shape
    n_out = n
    if act == "silu_and_mul":
        if n % 2:
            raise ValueError(f"linear: act='silu_and_mul' needs a fused [gate; up] weight with even N, got N={n}")
        n_out = n // 2
    lead = x.shape[:-1]
    if residual is not None and residual.shape != (*lead, n_out):
        raise ValueError(f"linear: residual must have shape {(*lead, n_out)}, got {tuple(residual.shape)}")

    backend = linear_backend(x.device)
    if backend in ("reference", "cublas"):
        return linear_reference(x, weight, bias, residual, act)

    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    res2 = residual.reshape(-1, n_out) if residual is not None else None
    if res2 is not None and res2.stride(-1) != 1:
        res2 = res2.contiguous()
    m = x2.shape[0]

    config = None
    impl = backend
    if backend == "table":
        impl, config = choose_impl(x.device, x.dtype, n, k, m)
    if impl == "gemv":
        from fdpp.kernels.gemv import gemv

        y = gemv(x2, weight, bias, residual=res2, act=act, config=config)
    elif impl == "flat":
        from fdpp.kernels.flat_gemm import flat_gemm

        y = flat_gemm(x2, weight, bias, residual=res2, act=act, config=config)
    elif impl == "cublas":
        y = linear_reference(x2, weight, bias, res2, act)
    else:
        raise ValueError(f"linear: backend {impl!r} unknown; choose reference | table | gemv | flat | cublas")
    return y.reshape(*lead, n_out)
