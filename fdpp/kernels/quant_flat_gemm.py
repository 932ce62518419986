"""Weight-only quantized flat GEMM (ImplB for packed weights): tensor cores on weights dequantized in registers.

The same transposed flat GEMM as flat_gemm.py (``y^T [N, M] = W [N, K] @ x^T [K, M]``: weight rows fill
the large side of the MMA tile, M is padded only to 16), except that each W tile is read packed and
dequantized in registers by ``_dequant_tile`` (quant_gemv.py) before ``tl.dot`` in x's dtype. fp8 / int8
row scales are applied once to the accumulator. Split-K and the epilogue are shared with the GEMV.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fdpp.kernels.gemv import _epilogue_store, launch_splitk_epilogue, num_sms
from fdpp.kernels.quant_gemv import (
    _dequant_tile,
    check_quant_args,
    quant_launch_args,
    split_k_grid,
    sub_block,
)


@triton.jit
def quant_flat_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_rm, stride_om,
    KB_PER_SPLIT,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NSB: tl.constexpr,
    SB: tl.constexpr,
    QK: tl.constexpr,
    BB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,
    CHANNEL_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 activations (or the interpreter): dot in fp32 with IEEE precision
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    BLOCK_K: tl.constexpr = NSB * SB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (offs_n % N).to(tl.int64)  # NOTE: out-of-range rows / columns wrap; the store mask drops them
    cols = offs_m % M
    k_start = pid_k * KB_PER_SPLIT * BLOCK_K
    offs_kk = tl.arange(0, BLOCK_K)
    xt_cols = x_ptr + cols[None, :] * stride_xm  # [1, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in range(KB_PER_SPLIT):
        k0 = k_start + kb * BLOCK_K
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, rows, k0, K, stride_wn, stride_sn, FMT, GROUP, NSB, SB, QK, BB)
        w = tl.reshape(w, [BLOCK_N, BLOCK_K])
        offs_k = k0 + offs_kk
        xt = tl.load(xt_cols + offs_k[:, None], mask=offs_k[:, None] < K, other=0.0)  # [BLOCK_K, BLOCK_M]
        if DOT_FP32:
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    if CHANNEL_SCALE:
        acc = acc * tl.load(s_ptr + rows).to(tl.float32)[:, None]
    offs_m_e = offs_m[None, :]
    offs_n_e = offs_n[:, None]
    if USE_WORKSPACE:
        tl.store(ws_ptr + (pid_k * M + offs_m_e) * N + offs_n_e, acc, mask=(offs_m_e < M) & (offs_n_e < N))
    else:
        _epilogue_store(acc, acc, offs_m_e, offs_n_e, M, N, 0, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                        HAS_BIAS, HAS_RESIDUAL, False)


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_quant_flat_config(fmt: str, n: int, k: int, m: int, group_size: int = 0, sms: int = 132) -> dict:
    """The quantized flat-GEMM config used without a tuned one: 64 weight rows x 128 k per tile, 3 stages,
    split-K while the grid would fill less than half of the SMs."""
    block_m = max(16, min(64, triton.next_power_of_2(max(m, 1))))
    block_n, block_k = 64, max(128, sub_block(fmt, group_size))
    progs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k, num_kb = 1, triton.cdiv(k, block_k)
    while 2 * progs * split_k < sms and split_k * 2 <= num_kb and split_k < 8:
        split_k *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4,
            "num_stages": 3}


def quant_flat_gemm(
    x: torch.Tensor,
    data: torch.Tensor,
    fmt: str,
    n: int,
    k: int,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    group_size: int = 0,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias) (+ residual)`` on tensor cores, reading W packed. x [M, K] -> [M, N].

    Arguments as ``quant_gemv``; ``config``: BLOCK_M (>= 16), BLOCK_N (>= 16), BLOCK_K, SPLIT_K, num_warps,
    num_stages; missing keys from ``default_quant_flat_config``.
    """
    check_quant_args("quant_flat_gemm", x, data, fmt, n, k, scale, zero, group_size)
    m = x.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    cfg = default_quant_flat_config(fmt, n, k, m, group_size, num_sms(x.device))
    if config:
        cfg.update(config)
    sb = sub_block(fmt, group_size)
    block_m = max(16, min(triton.next_power_of_2(m), int(cfg["BLOCK_M"])))
    block_n = int(cfg["BLOCK_N"])
    nsb = max(1, int(cfg["BLOCK_K"]) // sb)
    if block_n < 16 or nsb * sb < 16:
        raise ValueError(f"quant_flat_gemm: BLOCK_N and BLOCK_K must be >= 16 (tl.dot), got {block_n}, {nsb * sb}")
    kb_per_split, num_splits = split_k_grid(triton.cdiv(k, nsb * sb), int(cfg.get("SPLIT_K", 1)))
    use_ws = num_splits > 1
    ws = torch.empty((num_splits, m, n), device=x.device, dtype=torch.float32) if use_ws else out
    args, flags = quant_launch_args(x, data, fmt, scale, zero, bias, residual, out, ws, n, kb_per_split, use_ws)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), num_splits)
    # NOTE: the interpreter's bf16/fp16 tl.dot is unreliable on the CPU: dot in fp32 there (never on a GPU).
    quant_flat_gemm_kernel[grid](
        *args, FMT=fmt, GROUP=max(group_size, 1), BLOCK_M=block_m, BLOCK_N=block_n, NSB=nsb, SB=sb, **flags,
        DOT_FP32=x.dtype == torch.float32 or _INTERPRETING,
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)),
    )
    if use_ws:
        launch_splitk_epilogue(ws, num_splits, bias, residual, out, n, False)
    return out
