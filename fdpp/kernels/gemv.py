"""ImplA of the heuristic dataflow: GEMV on CUDA cores for the smallest M (FastGEMV style).

``y[M, N] = x[M, K] @ W[N, K]^T`` with W in its loaded (row-major [N, K]) layout. Each program owns
``BLOCK_N`` rows of W and streams them along K in ``BLOCK_K`` chunks with wide (16-byte) loads; the
math is broadcast-multiply + ``tl.sum`` in fp32 on the CUDA cores (no ``tl.dot``: M is far below the
smallest tensor-core tile). Partial products are kept in a [BLOCK_N, BLOCK_K] fp32 accumulator per row
of x and reduced once after the loop (FastGEMV's deferred reduction, no cross-lane work in the hot loop).
One program multiplies its W tile with up to 4 rows of x (explicit accumulators); larger M runs more
row blocks, scheduled next to each other so that W is re-read from L2. The K loop double-buffers its
W and x chunks in registers (the next chunk's loads are issued before the current chunk's math).

When N alone gives too few programs to fill the SMs, ``SPLIT_K`` programs share a row block: each
writes an fp32 partial into a workspace ``[SPLIT_K, M, N]`` and a second small kernel
(``splitk_epilogue_kernel``) sums the partials and applies the epilogue. The 2-pass reduction needs no
zero-filled buffer and no atomics, so results are deterministic.

Epilogues (fused into the last pass): bias, ``silu_and_mul`` (W is a fused [gate; up] of 2F rows; the
program loads gate rows j and up rows j + F and writes silu(gate) * up), residual add.

Prologue (optional, ``norm_weight``): RMSNorm of x fused in front of the product, so the norm costs no
launch of its own. ``rms_norm(x) @ W^T = rstd * ((x * w_norm) @ W^T)`` with one scalar ``rstd`` per row:
the K loop multiplies every x chunk by the norm weight and, when the program walks the whole row (one
split), also sums the chunk's squares, so rstd costs no second pass over x; the partial sums are scaled
by rstd before the epilogue. A split-K program sees only its part of the row: it sums x^2 over the whole
row after its loop (x is a few KB and stays in L1/L2, W is what streams from HBM) and scales its own
partial (the scaling is linear).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fdpp.kernels.device import num_sms, pdl_enabled

ACTS = (None, "silu_and_mul")


@triton.jit
def _epilogue_store(
    acc,
    acc_up,
    offs_m,
    offs_n,
    M,
    N_OUT,
    F,
    bias_ptr,
    res_ptr,
    out_ptr,
    stride_rm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_GATED: tl.constexpr,
):
    """Bias, SiLU(gate) * up and residual on an fp32 tile, then one cast and store.

    ``offs_m`` and ``offs_n`` are any mutually broadcastable index tensors (a scalar row and a [BLOCK_N]
    vector for the M == 1 GEMV, [BLOCK_M, 1] x [1, BLOCK_N] or the transposed [1, BLOCK_M] x [BLOCK_N, 1]
    of the flat GEMM). ``acc_up`` is ignored unless IS_GATED.
    """
    mask_n = offs_n < N_OUT
    mask = (offs_m < M) & mask_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if IS_GATED:
            acc_up += tl.load(bias_ptr + F + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if IS_GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_m * stride_rm + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_x_rows(x0, x1, x2, x3, offs_k, mask_k, nw_ptr, ss0, ss1, ss2, ss3, BLOCK_M: tl.constexpr,
                 HAS_NORM: tl.constexpr, NORM_IN_LOOP: tl.constexpr):
    """One K chunk of up to 4 rows of x (rows past BLOCK_M alias row 0 and are never used); with
    HAS_NORM multiplied by the norm weight, in fp32, and with NORM_IN_LOOP each row's squares added to
    its [BLOCK_K] sum-of-squares accumulator ``ss*`` (returned after the four rows)."""
    xa = tl.load(x0 + offs_k, mask=mask_k, other=0.0)
    xb = xa
    xc = xa
    xd = xa
    if BLOCK_M > 1:
        xb = tl.load(x1 + offs_k, mask=mask_k, other=0.0)
    if BLOCK_M > 2:
        xc = tl.load(x2 + offs_k, mask=mask_k, other=0.0)
        xd = tl.load(x3 + offs_k, mask=mask_k, other=0.0)
    if HAS_NORM:
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        xc = xc.to(tl.float32)
        xd = xd.to(tl.float32)
        if NORM_IN_LOOP:
            ss0 += xa * xa
            if BLOCK_M > 1:
                ss1 += xb * xb
            if BLOCK_M > 2:
                ss2 += xc * xc
                ss3 += xd * xd
        wn = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xa = xa * wn
        xb = xb * wn
        xc = xc * wn
        xd = xd * wn
    return xa, xb, xc, xd, ss0, ss1, ss2, ss3


@triton.jit
def _row_rstd(x_row, ss, K, eps, BLOCK_K: tl.constexpr, NORM_IN_LOOP: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row of x (fp32): from ``ss``, the squares the K loop summed
    (NORM_IN_LOOP: the program walked the whole row), else by a pass over the whole row (a split-K
    program saw only its part). Both sum the same BLOCK_K chunks in the same order."""
    if not NORM_IN_LOOP:
        offs = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            ss += v * v
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _fma_rows(acc0, acc1, acc2, acc3, w, xa, xb, xc, xd, BLOCK_M: tl.constexpr):
    """acc_r[BLOCK_N, BLOCK_K] += W chunk * x_r chunk, elementwise in fp32 (reduced after the K loop)."""
    wf = w.to(tl.float32)
    acc0 += wf * xa.to(tl.float32)[None, :]
    if BLOCK_M > 1:
        acc1 += wf * xb.to(tl.float32)[None, :]
    if BLOCK_M > 2:
        acc2 += wf * xc.to(tl.float32)[None, :]
        acc3 += wf * xd.to(tl.float32)[None, :]
    return acc0, acc1, acc2, acc3


@triton.jit
def _finish_row(acc, acc_up, m, pid_k, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr, ws_ptr,
                stride_rm, stride_om, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, IS_GATED: tl.constexpr, USE_WORKSPACE: tl.constexpr):
    """Reduce one row's [BLOCK_N, BLOCK_K] partial products and write the row (or its split-K partial)."""
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    offs_m = tl.zeros([BLOCK_N], dtype=tl.int32) + m  # a tensor, so masks stay vector-shaped
    if USE_WORKSPACE:
        mask = (offs_m < M) & (offs_n < N_OUT)
        tl.store(ws_ptr + (pid_k * M + offs_m) * N_OUT + offs_n, y, mask=mask)
    else:
        y_up = tl.sum(acc_up, axis=1)
        _epilogue_store(y, y_up, offs_m, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr,
                        stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL, IS_GATED)


@triton.jit
def _rope_finish_row(acc, acc_hi, m, offs_n, p, M, NP, bias_ptr, out_ptr, stride_om, pos_ptr, cs_ptr, stride_cs,
                     kc_ptr, vc_ptr, slot_ptr, num_q_heads, num_kv_heads,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The ROPE epilogue of one row of x: the program's dims i (``acc``) and i + HEAD_DIM/2 (``acc_hi``)
    of pair indices ``p`` (wrapped; ``offs_n`` unwrapped, for the mask) are rotated by the row's
    position (neox style: halves) and stored, q to ``out`` [M, num_q_heads * HEAD_DIM], k to ``kc_ptr``
    and v (not rotated) to ``vc_ptr`` at the row's cache slot ([slot, num_kv_heads, HEAD_DIM]; slot -1: no
    write)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    y_lo = tl.sum(acc, axis=1)  # [BLOCK_N]
    y_hi = tl.sum(acc_hi, axis=1)
    head = p // HALF  # q heads, then k heads, then v heads
    i = p % HALF
    lo = head * HEAD_DIM + i  # the row of W (and of a plain qkv output)
    offs_m = tl.zeros([BLOCK_N], dtype=tl.int32) + m  # a tensor, so masks stay vector-shaped
    ok = (offs_n < NP) & (offs_m < M)
    if HAS_BIAS:
        y_lo += tl.load(bias_ptr + lo, mask=ok, other=0.0).to(tl.float32)
        y_hi += tl.load(bias_ptr + lo + HALF, mask=ok, other=0.0).to(tl.float32)
    row = m % M  # rows past M alias a valid one (their stores are masked)
    pos = tl.load(pos_ptr + row)
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=ok, other=1.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + i, mask=ok, other=0.0)
    is_q = head < num_q_heads
    is_v = head >= num_q_heads + num_kv_heads
    r_lo = tl.where(is_v, y_lo, y_lo * cos - y_hi * sin)
    r_hi = tl.where(is_v, y_hi, y_hi * cos + y_lo * sin)
    q_ptrs = out_ptr + offs_m * stride_om + lo
    tl.store(q_ptrs, r_lo.to(out_ptr.dtype.element_ty), mask=ok & is_q)
    tl.store(q_ptrs + HALF, r_hi.to(out_ptr.dtype.element_ty), mask=ok & is_q)
    slot = tl.zeros([BLOCK_N], dtype=tl.int64) + tl.load(slot_ptr + row).to(tl.int64)  # vector-shaped
    kv_head = tl.where(is_v, head - num_q_heads - num_kv_heads, head - num_q_heads)
    c_off = slot * (num_kv_heads * HEAD_DIM) + kv_head * HEAD_DIM + i
    ok_c = ok & (slot >= 0) & (head >= num_q_heads)
    is_k = head < num_q_heads + num_kv_heads
    tl.store(kc_ptr + c_off, r_lo.to(kc_ptr.dtype.element_ty), mask=ok_c & is_k)
    tl.store(kc_ptr + c_off + HALF, r_hi.to(kc_ptr.dtype.element_ty), mask=ok_c & is_k)
    tl.store(vc_ptr + c_off, r_lo.to(vc_ptr.dtype.element_ty), mask=ok_c & is_v)
    tl.store(vc_ptr + c_off + HALF, r_hi.to(vc_ptr.dtype.element_ty), mask=ok_c & is_v)


@triton.jit
def gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (N = 2F when gated)
    bias_ptr,  # [N] or dummy
    res_ptr,  # [M, N_OUT] or dummy
    out_ptr,  # [M, N_OUT]
    ws_ptr,  # [SPLIT_K, M, N] fp32 workspace or dummy
    M,
    N_OUT,  # output columns computed here: F when gated, else N
    K,
    F,  # row offset of the "up" half of a gated weight
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    KB_PER_SPLIT,  # number of BLOCK_K chunks each split walks
    nw_ptr,  # [K] RMSNorm weight (HAS_NORM) or dummy
    eps,  # RMSNorm epsilon (HAS_NORM)
    BLOCK_M: tl.constexpr,  # rows of x per program: 1, 2 or 4
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_GATED: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,
    PREFETCH: tl.constexpr,  # software double buffering of the W/x chunks in registers
    HAS_NORM: tl.constexpr = False,  # RMSNorm prologue (see the module docstring)
    USE_PDL: tl.constexpr = False,  # programmatic dependent launch: W's first chunk before gdc_wait
    NORM_IN_LOOP: tl.constexpr = False,  # HAS_NORM and one split: the K loop also sums x^2 (no 2nd pass)
    # ROPE: W is a merged [q; k; v] projection and the epilogue rotates q and k and writes k and v into the
    # paged cache (_rope_finish_row); N_OUT is then the number of (i, i + HEAD_DIM/2) row pairs
    ROPE: tl.constexpr = False,
    pos_ptr=None,  # [M] positions (ROPE)
    cs_ptr=None,  # [max_positions, HEAD_DIM] fp32 cos | sin (ROPE)
    stride_cs=0,
    kc_ptr=None,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM] contiguous (ROPE)
    vc_ptr=None,
    slot_ptr=None,  # [M] cache slots, -1: no write (ROPE)
    num_q_heads=0,
    num_kv_heads=0,
    HEAD_DIM: tl.constexpr = 2,
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Programs that share W rows (same pid_n, consecutive row blocks of x) are adjacent in launch order,
    # so when M > BLOCK_M the second read of a W tile comes from L2, not HBM.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_mb = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_mb
    pid_n = pid // num_mb
    m0 = pid_m * BLOCK_M

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # NOTE: out-of-range rows of W and x wrap around instead of being masked: they load valid memory,
    # their results are dropped by the store mask, and the hot loop keeps unmasked row addressing.
    rows = offs_n % N_OUT
    k_start = pid_k * KB_PER_SPLIT * BLOCK_K
    if ROPE:  # rows are pairs: dim i of a head (its "lo" row) and dim i + HEAD_DIM/2 (the "up" row set)
        rows = (rows // (HEAD_DIM // 2)) * HEAD_DIM + rows % (HEAD_DIM // 2)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    w_rows_up = w_rows
    if IS_GATED:
        w_rows_up = w_ptr + (rows + F)[:, None].to(tl.int64) * stride_wn
    if ROPE:
        w_rows_up = w_ptr + (rows + HEAD_DIM // 2)[:, None].to(tl.int64) * stride_wn
    x0 = x_ptr + (m0 % M) * stride_xm
    x1 = x_ptr + ((m0 + 1) % M) * stride_xm
    x2 = x_ptr + ((m0 + 2) % M) * stride_xm
    x3 = x_ptr + ((m0 + 3) % M) * stride_xm

    # FastGEMV's deferred reduction: per row of x an fp32 [BLOCK_N, BLOCK_K] accumulator of products,
    # summed across K only once after the loop (no cross-lane reductions in the hot loop).
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss0 = tl.zeros([BLOCK_K], dtype=tl.float32)  # RMSNorm: sums of x^2 per row (NORM_IN_LOOP)
    ss1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    ss2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    ss3 = tl.zeros([BLOCK_K], dtype=tl.float32)
    offs_kk = tl.arange(0, BLOCK_K)
    if PREFETCH:
        # Register double buffering: chunk kb is requested before chunk kb-1 is multiplied, so every
        # thread keeps two chunks of loads in flight without relying on the compiler's pipeliner.
        offs_k = k_start + offs_kk
        mask_k = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        w_up = w
        if IS_GATED or ROPE:
            w_up = tl.load(w_rows_up + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        if USE_PDL:  # x (and the residual) are the previous kernel's output: wait for it
            tl.extra.cuda.gdc_wait()
        xa, xb, xc, xd, ss0, ss1, ss2, ss3 = _load_x_rows(
            x0, x1, x2, x3, offs_k, mask_k, nw_ptr, ss0, ss1, ss2, ss3, BLOCK_M, HAS_NORM, NORM_IN_LOOP)
        for kb in range(1, KB_PER_SPLIT):
            offs_k = k_start + kb * BLOCK_K + offs_kk
            mask_k = offs_k < K
            w_next = tl.load(w_rows + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            w_up_next = w_next
            if IS_GATED or ROPE:
                w_up_next = tl.load(w_rows_up + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            xa_n, xb_n, xc_n, xd_n, ss0, ss1, ss2, ss3 = _load_x_rows(
                x0, x1, x2, x3, offs_k, mask_k, nw_ptr, ss0, ss1, ss2, ss3, BLOCK_M, HAS_NORM, NORM_IN_LOOP)
            acc0, acc1, acc2, acc3 = _fma_rows(acc0, acc1, acc2, acc3, w, xa, xb, xc, xd, BLOCK_M)
            if IS_GATED or ROPE:
                up0, up1, up2, up3 = _fma_rows(up0, up1, up2, up3, w_up, xa, xb, xc, xd, BLOCK_M)
            w = w_next
            w_up = w_up_next
            xa = xa_n
            xb = xb_n
            xc = xc_n
            xd = xd_n
        acc0, acc1, acc2, acc3 = _fma_rows(acc0, acc1, acc2, acc3, w, xa, xb, xc, xd, BLOCK_M)
        if IS_GATED or ROPE:
            up0, up1, up2, up3 = _fma_rows(up0, up1, up2, up3, w_up, xa, xb, xc, xd, BLOCK_M)
    else:
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        for kb in range(KB_PER_SPLIT):
            offs_k = k_start + kb * BLOCK_K + offs_kk
            mask_k = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            xa, xb, xc, xd, ss0, ss1, ss2, ss3 = _load_x_rows(
                x0, x1, x2, x3, offs_k, mask_k, nw_ptr, ss0, ss1, ss2, ss3, BLOCK_M, HAS_NORM, NORM_IN_LOOP)
            acc0, acc1, acc2, acc3 = _fma_rows(acc0, acc1, acc2, acc3, w, xa, xb, xc, xd, BLOCK_M)
            if IS_GATED or ROPE:
                w_up = tl.load(w_rows_up + offs_k[None, :], mask=mask_k[None, :], other=0.0)
                up0, up1, up2, up3 = _fma_rows(up0, up1, up2, up3, w_up, xa, xb, xc, xd, BLOCK_M)

    if HAS_NORM:
        r0 = _row_rstd(x0, ss0, K, eps, BLOCK_K, NORM_IN_LOOP)
        acc0 *= r0
        up0 *= r0
        if BLOCK_M > 1:
            r1 = _row_rstd(x1, ss1, K, eps, BLOCK_K, NORM_IN_LOOP)
            acc1 *= r1
            up1 *= r1
        if BLOCK_M > 2:
            r2 = _row_rstd(x2, ss2, K, eps, BLOCK_K, NORM_IN_LOOP)
            acc2 *= r2
            up2 *= r2
            r3 = _row_rstd(x3, ss3, K, eps, BLOCK_K, NORM_IN_LOOP)
            acc3 *= r3
            up3 *= r3
    if ROPE:
        p = offs_n % N_OUT
        _rope_finish_row(acc0, up0, m0, offs_n, p, M, N_OUT, bias_ptr, out_ptr, stride_om, pos_ptr, cs_ptr,
                         stride_cs, kc_ptr, vc_ptr, slot_ptr, num_q_heads, num_kv_heads, BLOCK_N, HEAD_DIM,
                         HAS_BIAS)
        if BLOCK_M > 1:
            _rope_finish_row(acc1, up1, m0 + 1, offs_n, p, M, N_OUT, bias_ptr, out_ptr, stride_om, pos_ptr,
                             cs_ptr, stride_cs, kc_ptr, vc_ptr, slot_ptr, num_q_heads, num_kv_heads, BLOCK_N,
                             HEAD_DIM, HAS_BIAS)
        if BLOCK_M > 2:
            _rope_finish_row(acc2, up2, m0 + 2, offs_n, p, M, N_OUT, bias_ptr, out_ptr, stride_om, pos_ptr,
                             cs_ptr, stride_cs, kc_ptr, vc_ptr, slot_ptr, num_q_heads, num_kv_heads, BLOCK_N,
                             HEAD_DIM, HAS_BIAS)
            _rope_finish_row(acc3, up3, m0 + 3, offs_n, p, M, N_OUT, bias_ptr, out_ptr, stride_om, pos_ptr,
                             cs_ptr, stride_cs, kc_ptr, vc_ptr, slot_ptr, num_q_heads, num_kv_heads, BLOCK_N,
                             HEAD_DIM, HAS_BIAS)
    else:
        _finish_row(acc0, up0, m0, pid_k, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr, ws_ptr, stride_rm,
                    stride_om, BLOCK_N, HAS_BIAS, HAS_RESIDUAL, IS_GATED, USE_WORKSPACE)
        if BLOCK_M > 1:
            _finish_row(acc1, up1, m0 + 1, pid_k, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr, ws_ptr,
                        stride_rm, stride_om, BLOCK_N, HAS_BIAS, HAS_RESIDUAL, IS_GATED, USE_WORKSPACE)
        if BLOCK_M > 2:
            _finish_row(acc2, up2, m0 + 2, pid_k, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr, ws_ptr,
                        stride_rm, stride_om, BLOCK_N, HAS_BIAS, HAS_RESIDUAL, IS_GATED, USE_WORKSPACE)
            _finish_row(acc3, up3, m0 + 3, pid_k, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr, ws_ptr,
                        stride_rm, stride_om, BLOCK_N, HAS_BIAS, HAS_RESIDUAL, IS_GATED, USE_WORKSPACE)


@triton.jit
def splitk_epilogue_kernel(
    ws_ptr,  # [num_splits, M, N_WS] fp32 partial sums
    bias_ptr,
    res_ptr,
    out_ptr,  # [M, N_OUT]
    M,
    N_OUT,
    N_WS,  # row length of the workspace: 2F when gated, else N_OUT
    F,
    NUM_SPLITS,
    stride_rm,
    stride_om,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_GATED: tl.constexpr,
):
    """Second pass of split-K: sum the fp32 partials of one output row block, apply the epilogue."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask_n = offs_n < N_OUT
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        row = ws_ptr + (s * M + m) * N_WS
        acc += tl.load(row + offs_n, mask=mask_n, other=0.0)
        if IS_GATED:
            acc_up += tl.load(row + F + offs_n, mask=mask_n, other=0.0)
    offs_m = tl.zeros([BLOCK], dtype=tl.int32) + m
    _epilogue_store(
        acc, acc_up, offs_m, offs_n, M, N_OUT, F, bias_ptr, res_ptr, out_ptr,
        stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL, IS_GATED,
    )


# ----------------------------------------------------------------------------------------------------
# Shared wrapper helpers (also used by flat_gemm.py)
# ----------------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_linear_args(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: str | None,
    norm_weight: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate the inputs of a linear kernel; returns (M, N, K, N_OUT).

    x must be a 2-D [M, K] tensor and weight [N, K], both of one supported dtype, on one device, with
    unit stride along K. ``act="silu_and_mul"`` needs an even N (fused [gate; up]) and gives N_OUT = N/2.
    """
    if act not in ACTS:
        raise ValueError(f"{op}: act={act!r} is not supported; use one of {ACTS}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{op}: expected x [M, K] and weight [N, K], got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    M, K = x.shape
    N, Kw = weight.shape
    if K != Kw:
        raise ValueError(f"{op}: x has K={K} columns but weight has K={Kw}; weight must be [N, K]")
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(
            f"{op}: x and weight must share one dtype of {_SUPPORTED_DTYPES}, got {x.dtype} and {weight.dtype}"
        )
    if x.device != weight.device:
        raise ValueError(f"{op}: x is on {x.device} but weight is on {weight.device}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{op}: x and weight need unit stride along K; call .contiguous() first")
    if norm_weight is not None and (norm_weight.shape != (K,) or norm_weight.device != x.device
                                    or norm_weight.stride(0) != 1):
        raise ValueError(
            f"{op}: norm_weight must be a contiguous [{K}] tensor on {x.device} (the RMSNorm weight of x), "
            f"got {tuple(norm_weight.shape)} on {norm_weight.device}"
        )
    n_out = N
    if act == "silu_and_mul":
        if N % 2:
            raise ValueError(f"{op}: act='silu_and_mul' needs a fused [gate; up] weight with even N, got N={N}")
        n_out = N // 2
    if bias is not None and (
        bias.shape != (N,) or bias.dtype != x.dtype or bias.device != x.device or bias.stride(0) != 1
    ):
        raise ValueError(
            f"{op}: bias must be a contiguous [{N}] {x.dtype} tensor on {x.device}, got "
            f"{tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    if residual is not None:
        if residual.shape != (M, n_out) or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"{op}: residual must be [{M}, {n_out}] {x.dtype} on {x.device}, got "
                f"{tuple(residual.shape)} {residual.dtype} on {residual.device}"
            )
        if residual.stride(1) != 1:
            raise ValueError(f"{op}: residual needs unit stride along its last dim; call .contiguous() first")
    return M, N, K, n_out


def linear_launch_args(x, weight, bias, residual, out, ws, kernel_n: int, n_gate: int, kb_per_split: int,
                       use_ws: bool, norm_weight: torch.Tensor | None = None,
                       norm_eps: float = 1e-6) -> tuple[tuple, dict]:
    """Positional arguments and epilogue flags shared by the GEMV and flat-GEMM kernels (same signature).

    Missing bias / residual pointers are replaced by ``out`` (never read: their flag is off); with a
    split-K workspace the epilogue runs in the second pass, so the kernel's own epilogue flags are off.
    """
    M, K = x.shape
    args = (
        x, weight,
        bias if bias is not None else out,
        residual if residual is not None else out,
        out, ws, M, kernel_n, K, n_gate,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        kb_per_split,
        norm_weight if norm_weight is not None else x, float(norm_eps),
    )
    flags = dict(
        HAS_NORM=norm_weight is not None,
        HAS_BIAS=bias is not None and not use_ws,
        HAS_RESIDUAL=residual is not None and not use_ws,
        IS_GATED=n_gate > 0 and not use_ws,
        USE_WORKSPACE=use_ws,
    )
    return args, flags


def launch_splitk_epilogue(
    ws: torch.Tensor,
    num_splits: int,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    n_ws: int,
    is_gated: bool,
) -> None:
    """Reduce the fp32 partials in ``ws`` [num_splits, M, n_ws] into ``out`` [M, N_OUT] with the epilogue."""
    M, n_out = out.shape
    block = min(1024, triton.next_power_of_2(n_out))
    grid = (M, triton.cdiv(n_out, block))
    splitk_epilogue_kernel[grid](
        ws,
        bias if bias is not None else out,
        residual if residual is not None else out,
        out,
        M,
        n_out,
        n_ws,
        n_out if is_gated else 0,
        num_splits,
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        BLOCK=block,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        IS_GATED=is_gated,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------------------
# GEMV wrapper
# ----------------------------------------------------------------------------------------------------

GEMV_MAX_BLOCK_M = 4  # rows of x one program multiplies with its W tile (explicit accumulators)


def default_gemv_config(n_out: int, k: int, m: int, sms: int = 132) -> dict:
    """The GEMV config used when no tuned one is given: the most frequent winner of the H200 sweep
    (bench/results), split-K only when the grid would leave SMs idle."""
    block_m = min(triton.next_power_of_2(max(m, 1)), GEMV_MAX_BLOCK_M)
    if block_m == 1:
        block_n, block_k, warps = 4, 512, 2
    else:
        block_n, block_k, warps = 8, 256, 4
    progs = triton.cdiv(n_out, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    num_kb = triton.cdiv(k, block_k)
    while progs * split_k < sms and split_k * 2 <= num_kb and split_k < 8:
        split_k *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": warps}


def _gemv_tiles(n_out: int, k: int, m: int, device: torch.device, config: dict | None) -> tuple[dict, int, int, int]:
    """(config, BLOCK_M, BLOCK_N, BLOCK_K) of a GEMV launch: ``default_gemv_config`` updated by ``config``,
    BLOCK_M capped by M and GEMV_MAX_BLOCK_M."""
    cfg = default_gemv_config(n_out, k, m, num_sms(device))
    if config:
        cfg.update(config)
    block_m = min(triton.next_power_of_2(m), int(cfg["BLOCK_M"]), GEMV_MAX_BLOCK_M)
    return cfg, block_m, int(cfg["BLOCK_N"]), int(cfg["BLOCK_K"])


def _launch_gemv(grid, args: tuple, flags: dict, cfg: dict, block_m: int, block_n: int, block_k: int,
                 **extra) -> None:
    """``gemv_kernel`` over ``grid`` with the shared arguments (``linear_launch_args``), the tile sizes and
    ``cfg``'s prefetch / warps / stages; ``extra``: the variant's own keywords (norm, PDL, RoPE)."""
    gemv_kernel[grid](
        *args,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **flags,
        PREFETCH=bool(cfg.get("PREFETCH", True)),
        num_warps=int(cfg.get("num_warps", 4)),
        num_stages=int(cfg.get("num_stages", 2)),
        **extra,
    )


def gemv(
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
    """``epilogue(x @ weight.T)`` on CUDA cores. x [M, K], weight [N, K]; returns [M, N] or [M, N/2] (gated).

    ``norm_weight`` [K]: x is RMS-normalised first (``rms_norm(x, norm_weight, norm_eps)``), in the
    kernel's prologue.

    ``config`` keys (all optional): BLOCK_M (max rows of x per program: 1, 2 or 4), BLOCK_N, BLOCK_K,
    SPLIT_K, PREFETCH (register double buffering of the K chunks, default on), num_warps, num_stages.
    Missing keys come from ``default_gemv_config``.
    """
    M, N, K, n_out = check_linear_args("gemv", x, weight, bias, residual, act, norm_weight)
    is_gated = act == "silu_and_mul"
    out = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    cfg, block_m, block_n, block_k = _gemv_tiles(n_out, K, M, x.device, config)
    num_kb = triton.cdiv(K, block_k)
    kb_per_split = triton.cdiv(num_kb, max(1, int(cfg.get("SPLIT_K", 1))))
    num_splits = triton.cdiv(num_kb, kb_per_split)  # no empty splits
    use_ws = num_splits > 1
    if is_gated and not use_ws and block_n > 1:
        # NOTE: a gated program streams gate and up rows: half the rows keep the registers and the bytes
        # in flight of the tuned (ungated) config.
        block_n //= 2
    # With split-K the workspace holds the raw [M, N] product; gating happens in the second pass.
    n_ws = N
    ws = torch.empty((num_splits, M, n_ws), device=x.device, dtype=torch.float32) if use_ws else out
    kernel_n = n_ws if use_ws else n_out
    grid = (triton.cdiv(kernel_n, block_n) * triton.cdiv(M, block_m), num_splits)
    args, flags = linear_launch_args(x, weight, bias, residual, out, ws, kernel_n, n_out if is_gated else 0,
                                     kb_per_split, use_ws, norm_weight, norm_eps)
    pdl = {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(x.device) else {}
    _launch_gemv(grid, args, flags, cfg, block_m, block_n, block_k,
                 NORM_IN_LOOP=norm_weight is not None and num_splits == 1, **pdl)
    if use_ws:
        launch_splitk_epilogue(ws, num_splits, bias, residual, out, n_ws, is_gated)
    return out


def gemv_rope_store(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    config: dict | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """The qkv projection, rotary embedding and KV-cache write of attention in one GEMV launch.

    ``weight`` [(Hq + 2 Hkv) D, K] is a merged [q; k; v] projection; each program streams the rows of
    dims i and i + D/2 of one head (a pair, as the gated GEMV streams gate and up rows), so its epilogue
    rotates them (neox style, every dim rotated) by the row's position in ``cos_sin_cache`` [P, D] (cos |
    sin halves, fp32) and stores the rotated q in the returned [M, Hq * D] tensor, the rotated k and the
    v in ``k_cache`` / ``v_cache`` [num_blocks, block_size, Hkv, D] at ``slot_mapping`` [M] (-1: no write).
    Same math as ``gemv`` then ``fdpp.kernels.rotary.rope_store_kv``, one rounding fewer (q and k are
    rotated before the cast). ``norm_weight``: an RMSNorm prologue, as ``gemv``'s. Never split along K
    (the epilogue needs the whole dot product): the config's SPLIT_K is ignored.
    """
    M, N, K, _ = check_linear_args("gemv_rope_store", x, weight, bias, None, None, norm_weight)
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("gemv_rope_store: k_cache and v_cache must be contiguous [num_blocks, block_size, "
                         f"num_kv_heads, head_dim] tensors of one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    num_kv_heads, head_dim = int(k_cache.shape[2]), int(k_cache.shape[3])
    if head_dim % 2 or N != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"gemv_rope_store: weight has {N} rows; a [q; k; v] projection of {num_q_heads} + 2 x "
                         f"{num_kv_heads} heads of an even head_dim {head_dim} has "
                         f"{(num_q_heads + 2 * num_kv_heads) * head_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"gemv_rope_store: cos_sin_cache must be a float32 [max_positions, {head_dim}] tensor "
                         f"(every dim rotated), got {tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}")
    if positions.shape != (M,) or slot_mapping.shape != (M,):
        raise ValueError(f"gemv_rope_store: positions and slot_mapping must be [{M}] (one per row of x), got "
                         f"{tuple(positions.shape)} and {tuple(slot_mapping.shape)}")
    out = torch.empty((M, num_q_heads * head_dim), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    num_pairs = N // 2
    cfg, block_m, block_n, block_k = _gemv_tiles(num_pairs, K, M, x.device, config)
    if block_n > 1:  # NOTE: two row sets (dims i and i + D/2), as the gated GEMV: half the rows each
        block_n //= 2
    num_kb = triton.cdiv(K, block_k)
    grid = (triton.cdiv(num_pairs, block_n) * triton.cdiv(M, block_m), 1)
    args, flags = linear_launch_args(x, weight, bias, None, out, out, num_pairs, 0, num_kb, False, norm_weight,
                                     norm_eps)
    _launch_gemv(grid, args, flags, cfg, block_m, block_n, block_k, NORM_IN_LOOP=norm_weight is not None,
                 ROPE=True, pos_ptr=positions, cs_ptr=cos_sin_cache, stride_cs=cos_sin_cache.stride(0),
                 kc_ptr=k_cache, vc_ptr=v_cache, slot_ptr=slot_mapping, num_q_heads=num_q_heads,
                 num_kv_heads=num_kv_heads, HEAD_DIM=head_dim)
    return out


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """What every linear kernel here computes, in plain PyTorch and in x's dtype: x @ weight.T (+ bias),
    then ``act`` ("silu_and_mul": silu(gate) * up of a fused [gate; up] weight), then + residual.
    ``norm_weight``: x is replaced by RMSNorm(x) first (fp32 statistics, cast once, as Hugging Face)."""
    if norm_weight is not None:
        xf = x.float()
        x = norm_weight.to(x.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)).to(x.dtype)
    y = torch.nn.functional.linear(x, weight, bias)
    if act == "silu_and_mul":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual
    return y


def gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """``linear_reference`` in float64 (returns float64): the yardstick of the kernel tests."""

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.double()

    return linear_reference(x.double(), weight.double(), f64(bias), f64(residual), act, f64(norm_weight), norm_eps)
