"""ImplB of the heuristic dataflow: flat GEMM on tensor cores with a multi-stage (double-buffered) K loop.

Decode GEMMs are flat: M (tokens) is 1..~128 while N, K are the model's. A conventional GEMM tiles M
to 64-128 and wastes most of its tensor-core work on padding. Here the product is computed transposed,
``y^T [N, M] = W [N, K] @ x^T [K, M]``, so the weight rows fill the large side of the MMA tile
(BLOCK_N = 64/128, the wgmma M-side on Hopper) and M is padded only to the smallest dot tile Triton
supports (BLOCK_M = 16). N is split across programs; each program walks its K range sequentially and
``num_stages >= 2`` makes Triton's software pipeliner keep that many W/x tiles in flight in shared
memory, so the loads of chunk k+1.. overlap the MMA of chunk k (the paper's double buffering).

For small N, ``SPLIT_K`` programs share a row block and reduce through an fp32 workspace in a second
pass (deterministic, no atomics; shared with the GEMV in gemv.py).

Epilogues: bias, ``silu_and_mul`` (gate rows j and up rows j + F loaded in the same program), residual.
Configs come from the dataflow table (fdpp.dataflow); nothing is auto-tuned on the hot path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fdpp.kernels.device import num_sms, upcast_bf16_dot
from fdpp.kernels.gemv import (
    _epilogue_store,
    check_linear_args,
    launch_splitk_epilogue,
    linear_launch_args,
)


@triton.jit
def flat_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (N = 2F when gated)
    bias_ptr,
    res_ptr,  # [M, N_OUT] or dummy
    out_ptr,  # [M, N_OUT]
    ws_ptr,  # [SPLIT_K, M, N] fp32 workspace or dummy
    M,
    N_OUT,
    K,
    F,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    KB_PER_SPLIT,
    nw_ptr,  # [K] RMSNorm weight (HAS_NORM) or dummy
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_GATED: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_NORM: tl.constexpr = False,  # RMSNorm prologue: x * w_norm in the K loop, rstd per row after it
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # NOTE: rows/columns past the end wrap around (valid memory, results dropped by the store mask), so
    # only K needs a load mask and the pipelined loads stay simple.
    rows = offs_n % N_OUT
    cols = offs_m % M
    k_start = pid_k * KB_PER_SPLIT * BLOCK_K
    offs_kk = tl.arange(0, BLOCK_K)

    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    if IS_GATED:
        w_rows_up = w_ptr + (rows + F)[:, None].to(tl.int64) * stride_wn
    xt_cols = x_ptr + cols[None, :] * stride_xm  # [1, BLOCK_M]: x^T tile columns

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in range(KB_PER_SPLIT):
        offs_k = k_start + kb * BLOCK_K + offs_kk
        mask_k = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=mask_k[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        xt = tl.load(xt_cols + offs_k[:, None], mask=mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_M]
        if HAS_NORM:
            wn = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            xt = (xt.to(tl.float32) * wn[:, None]).to(xt.dtype)
        if UPCAST_DOT:
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        if IEEE_FP32:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
        if IS_GATED:
            w_up = tl.load(w_rows_up + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            if UPCAST_DOT:
                w_up = w_up.to(tl.float32)
            if IEEE_FP32:
                acc_up = tl.dot(w_up, xt, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(w_up, xt, acc_up)

    if HAS_NORM:
        # 1/rms of each of the BLOCK_M rows, by a pass over the whole rows (L2-resident, W is what streams)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_kk
            v = tl.load(xt_cols + offs_k[:, None], mask=(offs_k < K)[:, None], other=0.0).to(tl.float32)
            ss += tl.sum(v * v, axis=0)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc *= rstd[None, :]
        acc_up *= rstd[None, :]
    offs_m_e = offs_m[None, :]
    offs_n_e = offs_n[:, None]
    if USE_WORKSPACE:
        mask = (offs_m_e < M) & (offs_n_e < N_OUT)
        tl.store(ws_ptr + (pid_k * M + offs_m_e) * N_OUT + offs_n_e, acc, mask=mask)
    else:
        _epilogue_store(
            acc, acc_up, offs_m_e, offs_n_e, M, N_OUT, F, bias_ptr, res_ptr, out_ptr,
            stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL, IS_GATED,
        )


FLAT_MIN_BLOCK_M = 16  # smallest M side tl.dot accepts


def default_flat_config(n_out: int, k: int, m: int, sms: int = 132) -> dict:
    """The flat-GEMM config used when no tuned one is given: the most frequent winners of the H200 sweep
    (bench/results): 128-row tiles, 4 stages for large N; 64-row tiles, 6 stages for small N; split-K
    only when the grid would fill less than half of the SMs."""
    block_m = max(FLAT_MIN_BLOCK_M, min(64, triton.next_power_of_2(max(m, 1))))
    if n_out >= 8192:
        block_n, block_k, stages = 128, 128, 4
    else:
        block_n, block_k, stages = 64, 128, 6
    progs = triton.cdiv(n_out, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    num_kb = triton.cdiv(k, block_k)
    while 2 * progs * split_k < sms and split_k * 2 <= num_kb and split_k < 8:
        split_k *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": 4, "num_stages": stages}


def flat_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    config: dict | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """``epilogue(x @ weight.T)`` on tensor cores; ``norm_weight``: RMSNorm of x in the prologue. x [M, K], weight [N, K]; returns [M, N] or [M, N/2].

    ``config`` keys (all optional): BLOCK_M (largest M tile, >= 16, power of 2), BLOCK_N, BLOCK_K,
    SPLIT_K, num_warps, num_stages (>= 2: the depth of the shared-memory pipeline over K).
    """
    M, N, K, n_out = check_linear_args("flat_gemm", x, weight, bias, residual, act, norm_weight)
    is_gated = act == "silu_and_mul"
    out = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    cfg = default_flat_config(n_out, K, M, num_sms(x.device))
    if config:
        cfg.update(config)
    block_m = max(FLAT_MIN_BLOCK_M, min(triton.next_power_of_2(M), int(cfg["BLOCK_M"])))
    block_n, block_k = int(cfg["BLOCK_N"]), int(cfg["BLOCK_K"])
    if block_n < 16 or block_k < 16:
        raise ValueError(f"flat_gemm: BLOCK_N and BLOCK_K must be >= 16 (tl.dot), got {block_n}, {block_k}")
    num_kb = triton.cdiv(K, block_k)
    kb_per_split = triton.cdiv(num_kb, max(1, int(cfg.get("SPLIT_K", 1))))
    num_splits = triton.cdiv(num_kb, kb_per_split)
    use_ws = num_splits > 1
    if is_gated and not use_ws and block_n > 16:
        # NOTE: a gated program keeps gate and up tiles in shared memory: half the rows keep the tuned
        # (ungated) config's shared-memory footprint and bytes in flight.
        block_n //= 2
    n_ws = N
    ws = torch.empty((num_splits, M, n_ws), device=x.device, dtype=torch.float32) if use_ws else out
    kernel_n = n_ws if use_ws else n_out
    grid = (triton.cdiv(kernel_n, block_n), triton.cdiv(M, block_m), num_splits)
    # NOTE: Triton's CPU interpreter computes bf16 tl.dot wrongly (garbage of ~1e10 in triton 3.9), so
    # under TRITON_INTERPRET the bf16 tiles are upcast to fp32 before the dot. Never taken on a GPU.
    upcast_dot = upcast_bf16_dot(x.dtype)
    args, flags = linear_launch_args(x, weight, bias, residual, out, ws, kernel_n, n_out if is_gated else 0,
                                     kb_per_split, use_ws, norm_weight, norm_eps)
    flat_gemm_kernel[grid](
        *args,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **flags,
        IEEE_FP32=x.dtype == torch.float32 or upcast_dot,
        UPCAST_DOT=upcast_dot,
        num_warps=int(cfg.get("num_warps", 4)),
        num_stages=int(cfg.get("num_stages", 3)),
    )
    if use_ws:
        launch_splitk_epilogue(ws, num_splits, bias, residual, out, n_ws, is_gated)
    return out
