"""Weight-only quantized GEMV (ImplA for packed weights) and the dequantize kernel behind the large-M path.

``y[M, N] = x[M, K] @ dequant(W)[N, K]^T``: batch-1 decode reads every weight byte once per token, so
reading packed weights (1 byte for fp8/int8, ~0.5-0.6 for int4 and the 4-bit GGUF blocks) and
dequantizing in registers is what makes a quantized model faster: the multiply is free in a
memory-bound kernel.

Weights stay in their packed layout, row-major over N (``fdpp.quant.formats``):

* ``fp8`` / ``int8``: one byte per weight [N, K] and a float32 scale per output row, applied once to the
  reduced dot product (not per weight).
* ``int4``: [N, K/2] bytes (k = 2j low nibble, 2j+1 high), float16 scale and uint8 zero per group of
  GROUP weights along K: w = (q - zero) * scale.
* GGUF ``q8_0``, ``q4_0``, ``q4_1``, ``q4_k``, ``q5_k``, ``q6_k``: llama.cpp's blocks byte for byte, each
  row a run of blocks; the block header (float16 scales, 6-bit sub-block scales) is decoded in the kernel.

``_dequant_tile`` is the one place that knows the formats; it returns a [BLOCK_N, NSB, SB] float32 tile
(NSB sub-blocks of SB weights: SB is the format's smallest scale group, so every scale is loaded once per
sub-block and broadcast over its SB weights). The GEMV multiplies that tile with the matching chunk of
one row of x and keeps FastGEMV's deferred reduction (an fp32 accumulator of products, reduced once after
the K loop); the flat GEMM (quant_flat_gemm.py) feeds it to ``tl.dot``; the dequantize kernel writes it
out for cuBLAS at large M. Split-K and the bias / residual epilogue are shared with gemv.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fdpp.kernels.gemv import _epilogue_store, launch_splitk_epilogue, num_sms

# weights per scale group (the tile's sub-block SB) and GGUF block geometry (weights, bytes)
SUB_BLOCK = {"fp8": 32, "int8": 32, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q4_k": 32, "q5_k": 32, "q6_k": 16}
GGUF_BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q5_k": (256, 176),
               "q6_k": (256, 210)}
CHANNEL_SCALED = ("fp8", "int8")
QUANT_FORMATS = ("fp8", "int8", "int4", *GGUF_BLOCKS)


@triton.jit
def _f16_at(ptr, mask):
    """A little-endian float16 stored in two bytes at ``ptr`` -> float32 (the GGUF block scales)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, rows, k0, K, stride_wn, stride_sn, FMT: tl.constexpr, GROUP: tl.constexpr,
                  NSB: tl.constexpr, SB: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr):
    """Weights of rows ``rows`` [BLOCK_N] (int64) and k in [k0, k0 + NSB * SB) as float32 [BLOCK_N, NSB, SB].

    Columns k >= K come back as 0. fp8 / int8 tiles are not scaled (the caller scales the reduced rows).
    ``w_ptr`` points at bytes (uint8) for every format; ``stride_wn`` is a row's length in bytes.
    QK, BB: weights and bytes per GGUF block (unused otherwise).
    """
    offs_s = tl.arange(0, NSB)
    offs_e = tl.arange(0, SB)
    ks = k0 + offs_s * SB  # first k of each sub-block [NSB]
    k3 = ks[None, :, None] + offs_e[None, None, :]  # [1, NSB, SB]
    msub = (ks < K)[None, :, None]  # [1, NSB, 1]
    m3 = k3 < K
    row = rows[:, None, None] * stride_wn  # [BLOCK_N, 1, 1] byte offset of each row
    if FMT == "fp8":
        b = tl.load(w_ptr + row + k3, mask=m3, other=0)
        w = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif FMT == "int8":
        w = tl.load(w_ptr + row + k3, mask=m3, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    elif FMT == "int4":
        # NOTE: each byte is loaded once (SB/2 contiguous bytes per sub-block, so loads vectorize) and its two
        # nibbles are interleaved back into k order with join + reshape.
        kb3 = ks[None, :, None] // 2 + tl.arange(0, SB // 2)[None, None, :]  # [1, NSB, SB/2] byte index
        b = tl.load(w_ptr + row + kb3, mask=(kb3 * 2) < K, other=0).to(tl.int32)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), [rows.shape[0], NSB, SB])
        srow = rows[:, None, None] * stride_sn + (ks // GROUP)[None, :, None]
        s = tl.load(s_ptr + srow, mask=msub, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + srow, mask=msub, other=0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
    else:
        blk = w_ptr + row + (ks // QK)[None, :, None] * BB  # [BLOCK_N, NSB, 1] pointer to each sub-block's block
        j = k3 % QK  # position in the block
        if FMT == "q8_0":
            d = _f16_at(blk, msub)
            q = tl.load(blk + 2 + j, mask=m3, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = d * q
        elif FMT == "q4_0" or FMT == "q4_1":
            # a sub-block is one block (SB == QK == 32): its 16 quant bytes follow the 2-4 header bytes; byte j
            # holds weights j (low nibble) and j + 16 (high). Each byte is loaded once.
            b = tl.load(blk + (BB - 16) + tl.arange(0, 16)[None, None, :], mask=msub, other=0).to(tl.int32)
            q = tl.reshape(tl.permute(tl.join(b & 0xF, b >> 4), (0, 1, 3, 2)), [rows.shape[0], NSB, SB])
            q = q.to(tl.float32)
            d = _f16_at(blk, msub)
            if FMT == "q4_0":
                w = d * (q - 8.0)
            else:
                w = d * q + _f16_at(blk + 2, msub)
        elif FMT == "q4_k" or FMT == "q5_k":
            sub = (ks % QK)[None, :, None] // 32  # 32-weight sub-block 0..7
            is_lo = sub < 4
            sc_ptr = blk + 4  # 12 bytes: 8 six-bit (scale, min) pairs
            a = tl.load(sc_ptr + sub, mask=msub, other=0).to(tl.int32)
            bb = tl.load(sc_ptr + sub + 4, mask=msub, other=0).to(tl.int32)
            c = tl.load(sc_ptr + tl.where(is_lo, sub, sub - 4), mask=msub, other=0).to(tl.int32)
            sc = tl.where(is_lo, a & 63, (bb & 0xF) | ((c >> 6) << 4)).to(tl.float32)
            mn = tl.where(is_lo, bb & 63, (bb >> 4) | ((a >> 6) << 4)).to(tl.float32)
            d = _f16_at(blk, msub) * sc
            dm = _f16_at(blk + 2, msub) * mn
            # 4 chunks of 64 weights, 32 bytes each (the last 128 bytes): low nibbles = first 32, high = next 32
            b = tl.load(blk + (BB - 128) + (j // 64) * 32 + (j % 32), mask=m3, other=0).to(tl.int32)
            q = (b >> (((j // 32) % 2) * 4)) & 0xF
            if FMT == "q5_k":
                qh = tl.load(blk + 16 + (j % 32), mask=m3, other=0).to(tl.int32)
                q += ((qh >> (j // 32)) & 1) << 4
            w = d * q.to(tl.float32) - dm
        else:  # q6_k: ql[128], qh[64], int8 scales[16] (one per 16 weights, in weight order), d
            half = j // 128
            quarter = (j % 128) // 32
            ll = j % 32
            ql = tl.load(blk + half * 64 + (quarter % 2) * 32 + ll, mask=m3, other=0).to(tl.int32)
            qh = tl.load(blk + 128 + half * 32 + ll, mask=m3, other=0).to(tl.int32)
            q = (((ql >> ((quarter // 2) * 4)) & 0xF) | (((qh >> (quarter * 2)) & 3) << 4)) - 32
            sub16 = (ks % QK)[None, :, None] // 16
            sc = tl.load(blk + 192 + sub16, mask=msub, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = (_f16_at(blk + 208, msub) * sc) * q.to(tl.float32)
    return w


@triton.jit
def quant_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # packed weight bytes, [N, row_bytes]
    s_ptr,  # scales (fp8/int8: [N] fp32; int4: [N, K/GROUP] fp16) or dummy
    z_ptr,  # int4 zero points [N, K/GROUP] uint8, or dummy
    bias_ptr,
    res_ptr,
    out_ptr,  # [M, N]
    ws_ptr,  # [SPLIT_K, M, N] fp32 or dummy
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_rm,
    stride_om,
    KB_PER_SPLIT,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NSB: tl.constexpr,
    SB: tl.constexpr,
    QK: tl.constexpr,
    BB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,
    CHANNEL_SCALE: tl.constexpr,
):
    # One row of x per program; programs of the same W rows are adjacent, so M > 1 re-reads W from L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = pid % M
    pid_n = pid // M
    BLOCK_K: tl.constexpr = NSB * SB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # NOTE: rows past N wrap (valid memory); the store drops them
    k_start = pid_k * KB_PER_SPLIT * BLOCK_K
    kx = tl.arange(0, NSB)[:, None] * SB + tl.arange(0, SB)[None, :]  # [NSB, SB]
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, NSB, SB], dtype=tl.float32)
    for kb in range(KB_PER_SPLIT):
        k0 = k_start + kb * BLOCK_K
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, rows, k0, K, stride_wn, stride_sn, FMT, GROUP, NSB, SB, QK, BB)
        xv = tl.load(x_row + k0 + kx, mask=(k0 + kx) < K, other=0.0).to(tl.float32)
        acc += w * xv[None, :, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BLOCK_N]
    if CHANNEL_SCALE:
        y = y * tl.load(s_ptr + rows).to(tl.float32)
    offs_m = tl.zeros([BLOCK_N], dtype=tl.int32) + m
    if USE_WORKSPACE:
        tl.store(ws_ptr + (pid_k * M + offs_m) * N + offs_n, y, mask=offs_n < N)
    else:
        _epilogue_store(y, y, offs_m, offs_n, M, N, 0, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                        HAS_BIAS, HAS_RESIDUAL, False)


@triton.jit
def quant_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                         FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, NSB: tl.constexpr,
                         SB: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, CHANNEL_SCALE: tl.constexpr):
    """out[N, K] = the dense weight (the large-M path: a tensor-core GEMM on the dequantized weight)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)
    k0 = tl.program_id(1) * NSB * SB
    w = _dequant_tile(w_ptr, s_ptr, z_ptr, rows, k0, K, stride_wn, stride_sn, FMT, GROUP, NSB, SB, QK, BB)
    if CHANNEL_SCALE:
        w = w * tl.load(s_ptr + rows).to(tl.float32)[:, None, None]
    k3 = k0 + tl.arange(0, NSB)[None, :, None] * SB + tl.arange(0, SB)[None, None, :]
    ptrs = out_ptr + rows[:, None, None] * stride_on + k3
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None, None] & (k3 < K))


# ----------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------


def sub_block(fmt: str, group_size: int = 0) -> int:
    """SB of a format: the weights that share one scale (int4: its group size)."""
    return group_size if fmt == "int4" else SUB_BLOCK[fmt]


def check_quant_args(op: str, x: torch.Tensor, data: torch.Tensor, fmt: str, n: int, k: int,
                     scale: torch.Tensor | None, zero: torch.Tensor | None, group_size: int) -> None:
    """Validate a packed weight against x; raises ValueError / TypeError naming what is wrong."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"{op}: weight format {fmt!r} unknown; choose one of {QUANT_FORMATS}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{op}: x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(1) != 1:
        raise TypeError(f"{op}: x must be a float16/bfloat16/float32 tensor with unit stride along K")
    if data.dim() != 2 or data.shape[0] != n or data.stride(1) != 1 or data.device != x.device:
        raise ValueError(f"{op}: packed weight must be a [{n}, row_bytes] row-major tensor on {x.device}, "
                         f"got {tuple(data.shape)} on {data.device}")
    if fmt in GGUF_BLOCKS and k % GGUF_BLOCKS[fmt][0]:
        raise ValueError(f"{op}: {fmt} needs K divisible by {GGUF_BLOCKS[fmt][0]}, got K={k}")
    if fmt in CHANNEL_SCALED and (scale is None or scale.shape != (n,) or scale.dtype != torch.float32):
        raise ValueError(f"{op}: {fmt} needs a float32 per-row scale of shape [{n}]")
    if fmt == "int4":
        if group_size < 16 or k % group_size or scale is None or zero is None:
            raise ValueError(f"{op}: int4 needs scale and zero [N, K/G] and K divisible by the group size")
        if scale.shape != (n, k // group_size) or zero.shape != scale.shape or scale.stride(1) != 1 \
                or zero.stride() != scale.stride():
            raise ValueError(f"{op}: int4 scale and zero must both be row-major [{n}, {k // group_size}]")


def quant_launch_args(x, data, fmt, scale, zero, bias, residual, out, ws, n, kb_per_split, use_ws):
    """Positional arguments and epilogue flags of ``quant_gemv_kernel`` / ``quant_flat_gemm_kernel``."""
    m, k = x.shape
    w_bytes = data.view(torch.uint8)
    args = (
        x, w_bytes,
        scale if scale is not None else out,
        zero if zero is not None else out,
        bias if bias is not None else out,
        residual if residual is not None else out,
        out, ws, m, n, k,
        x.stride(0), w_bytes.stride(0), scale.stride(0) if (fmt == "int4") else 0,
        residual.stride(0) if residual is not None else 0, out.stride(0),
        kb_per_split,
    )
    qk, bb = GGUF_BLOCKS.get(fmt, (1, 1))
    flags = dict(QK=qk, BB=bb, HAS_BIAS=bias is not None and not use_ws,
                 HAS_RESIDUAL=residual is not None and not use_ws, USE_WORKSPACE=use_ws,
                 CHANNEL_SCALE=fmt in CHANNEL_SCALED)
    return args, flags


def split_k_grid(num_kb: int, split_k: int) -> tuple[int, int]:
    """(K chunks per split, number of splits) with no empty split."""
    per = triton.cdiv(num_kb, max(1, split_k))
    return per, triton.cdiv(num_kb, per)


def default_quant_gemv_config(fmt: str, n: int, k: int, m: int, group_size: int = 0, sms: int = 132) -> dict:
    """The quantized GEMV config used without a tuned one: 4 rows x 512 weights per step (the fastest of the
    quick sweep in 34 of 36 format x Llama-2-7B shape points on an H200, bench_quant 2026-12-03), split-K
    while the grid leaves SMs idle."""
    block_n, block_k = 4, max(512, sub_block(fmt, group_size))
    progs = triton.cdiv(n, block_n) * m
    split_k, num_kb = 1, triton.cdiv(k, block_k)
    while progs * split_k < 2 * sms and split_k * 2 <= num_kb and split_k < 16:
        split_k *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4}


def quant_gemv(
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
    """``x @ dequant(W).T (+ bias) (+ residual)`` on CUDA cores, reading W packed. x [M, K] -> [M, N].

    ``data`` / ``scale`` / ``zero`` / ``group_size``: the packed weight of logical shape [n, k] in ``fmt``
    (see the module docstring). ``config``: BLOCK_N, BLOCK_K (a multiple of the format's sub-block),
    SPLIT_K, num_warps, num_stages; missing keys from ``default_quant_gemv_config``.
    """
    check_quant_args("quant_gemv", x, data, fmt, n, k, scale, zero, group_size)
    m = x.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    cfg = default_quant_gemv_config(fmt, n, k, m, group_size, num_sms(x.device))
    if config:
        cfg.update(config)
    sb = sub_block(fmt, group_size)
    block_n = int(cfg["BLOCK_N"])
    nsb = max(1, int(cfg["BLOCK_K"]) // sb)
    kb_per_split, num_splits = split_k_grid(triton.cdiv(k, nsb * sb), int(cfg.get("SPLIT_K", 1)))
    use_ws = num_splits > 1
    ws = torch.empty((num_splits, m, n), device=x.device, dtype=torch.float32) if use_ws else out
    args, flags = quant_launch_args(x, data, fmt, scale, zero, bias, residual, out, ws, n, kb_per_split, use_ws)
    grid = (triton.cdiv(n, block_n) * m, num_splits)
    quant_gemv_kernel[grid](*args, FMT=fmt, GROUP=max(group_size, 1), BLOCK_N=block_n, NSB=nsb, SB=sb, **flags,
                            num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 2)))
    if use_ws:
        launch_splitk_epilogue(ws, num_splits, bias, residual, out, n, False)
    return out


def quant_dequantize(data: torch.Tensor, fmt: str, n: int, k: int, scale: torch.Tensor | None = None,
                     zero: torch.Tensor | None = None, group_size: int = 0,
                     dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense [n, k] weight of ``dtype`` from its packed form (one kernel launch)."""
    probe = torch.empty((1, k), device=data.device, dtype=dtype)
    check_quant_args("quant_dequantize", probe, data, fmt, n, k, scale, zero, group_size)
    out = torch.empty((n, k), device=data.device, dtype=dtype)
    sb = sub_block(fmt, group_size)
    nsb = max(1, 256 // sb)
    block_n = 16
    w_bytes = data.view(torch.uint8)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, nsb * sb))
    qk, bb = GGUF_BLOCKS.get(fmt, (1, 1))
    quant_dequant_kernel[grid](
        w_bytes, scale if scale is not None else out, zero if zero is not None else out, out, n, k,
        w_bytes.stride(0), scale.stride(0) if fmt == "int4" else 0, out.stride(0),
        FMT=fmt, GROUP=max(group_size, 1), BLOCK_N=block_n, NSB=nsb, SB=sb, QK=qk, BB=bb,
        CHANNEL_SCALE=fmt in CHANNEL_SCALED,
        num_warps=4,
    )
    return out
