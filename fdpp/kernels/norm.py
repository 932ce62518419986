"""Fused residual add + RMSNorm: one pass over the row instead of three."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr,
    stride_x, stride_res, stride_y, stride_res_out,
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        # HF adds in the model dtype, then normalises in fp32
        xf = (xf + r).to(dtype).to(tl.float32)
        tl.store(res_out_ptr + row * stride_res_out + offs, xf.to(dtype), mask=mask)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * y).to(dtype), mask=mask)


def rms_norm_fused(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """RMSNorm of x [M, N] (after x += residual when given). Returns y or (y, x + residual)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    M, N = x.shape
    if weight.shape != (N,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {N}")
    y = torch.empty_like(x)
    block = triton.next_power_of_2(N)
    num_warps = 4 if block <= 2048 else 8
    if residual is not None:
        residual = residual.reshape(M, N)
        res_out = torch.empty_like(x)
        rms_norm_kernel[(M,)](
            x, residual, weight, y, res_out,
            x.stride(0), residual.stride(0), y.stride(0), res_out.stride(0),
            N, eps, HAS_RESIDUAL=True, BLOCK_N=block, num_warps=num_warps,
        )
        return y, res_out
    rms_norm_kernel[(M,)](
        x, x, weight, y, y, x.stride(0), 0, y.stride(0), 0, N, eps,
        HAS_RESIDUAL=False, BLOCK_N=block, num_warps=num_warps,
    )
    return y
