"""silu(gate) * up of a fused [gate; up] GEMM output in one pass: the epilogue the GEMV and flat GEMM have
built in, for the tensor-core GEMM that does not (cuBLAS at large M: prefill, big decode batches).

PyTorch spends two kernels on it (``silu(gate)`` written out in the model dtype, then ``* up``): three
reads and two writes of an [M, F] tensor against two reads and one write here, and one launch fewer. The
math is the GEMV epilogue's: fp32, one cast at the end (PyTorch rounds ``silu(gate)`` to the model dtype
before the product, so the two differ by that one rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_and_mul_kernel(y_ptr, out_ptr, F, stride_y, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    gate = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(y_ptr + row * stride_y + F + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """``silu(y[:, :F]) * y[:, F:]`` of y [M, 2F] (rows contiguous along the last axis); returns [M, F]."""
    if y.dim() != 2 or y.shape[1] % 2 or y.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: y must be [M, 2F] with a contiguous last axis, got {tuple(y.shape)} "
                         f"strides {y.stride()}")
    m, f = y.shape[0], y.shape[1] // 2
    out = torch.empty((m, f), dtype=y.dtype, device=y.device)
    if m == 0 or f == 0:
        return out
    block = min(1024, triton.next_power_of_2(f))
    silu_and_mul_kernel[(m, triton.cdiv(f, block))](y, out, f, y.stride(0), out.stride(0), BLOCK=block,
                                                    num_warps=4)
    return out
