"""Varlen causal prefill attention over the paged KV cache with FlashDecoding++'s asynchronized softmax.

Queries are packed: sequence i owns q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] (`[num_tokens, num_heads,
head_dim]`) and these are the LAST q_len tokens of its context_lens[i] keys, which are read from the
paged cache `[num_blocks, block_size, num_kv_heads, head_dim]` through block_tables. So chunked prefill
and a cached prefix need nothing special: the query at position p sees keys 0..p (with a sliding window
W: keys p-W+1..p).

One program computes one (query tile of BLOCK_M rows, query head, sequence). GQA: the KV head is
head // GROUP; the query heads of a group re-read the same K/V tiles, mostly from L2.

Unified max (phi given): each KV tile adds P V with P = e^{s - phi}, no running max and no rescale of
the accumulator; the output is acc / l once at the end. P is cast to the K/V dtype for the tensor-core
dot with V. The row max is tracked (off the critical path: P does not depend on it) only for the
check below.

Exactness guarantee (same as decode, see fdpp.kernels.attention_decode): a query row stays on the
fast path only if its max m has lo < m - phi < hi, the P that entered the dot is within
MASS_TOL * l of the exact fp32 P in l1 norm (sum_j |P_j - cast(P_j)| <= MASS_TOL * sum_j P_j: fp16
underflow of mass far below the max is caught, rounding alone is not flagged), and l > 0. The test is
NaN-propagating (a NaN anywhere fails it). A query tile with any failing row is flagged and a second,
always-launched launch of the synchronized (online-softmax) kernel recomputes only flagged tiles (its
other programs exit at once; no host sync, graph-safe), keeping P in fp32 for the dot with V (tf32 on
a GPU), so NaN/inf in q or k reaches the output as NaN and a recomputed row is at least as exact as the
synchronized kernel.

Split-KV (num_splits > 1; see `choose_prefill_splits`): a late chunk of a long prompt is a small grid
(256 queries = 2 tiles x 32 heads = 64 programs on a 132-SM H200) whose programs each walk up to the
whole context, so the key range of each tile is cut into num_splits parts, each its own program
(program_id(0) = split * max_q_tiles + tile). The part length is computed in the kernel from the
tile's key range, rounded to BLOCK_N, so one num_splits works for any context (CUDA-graph safe); a
part past a short context runs no iteration (l = 0, m = -inf). Parts write fp32 (acc, m, l, e) to a
workspace; `prefill_combine_kernel` sums them (unified: a plain sum, no rescale, since every part uses
the same phi; synchronized: rescaled by the max), writes `out` and makes the exactness check above on
the COMBINED rows; the always-launched fallback then recomputes flagged tiles unsplit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fdpp.kernels.attention_decode import MASS_TOL, mass_check
from fdpp.kernels.device import upcast_bf16_dot

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_tile(
    acc, l_i, m_i, e_i, q, q_pos, start, kv_hi, bt_row, k_cache_ptr, v_cache_ptr, kvh,
    offs_n, offs_d, mask_d, scale_log2, phi_log2, sliding_window,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    BLOCK_SIZE: tl.constexpr, UNIFIED: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    HAS_SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, P_FP32: tl.constexpr,
    MASS_CHECK: tl.constexpr,
):
    """Accumulate one KV tile [start, start + BLOCK_N) into (acc, l_i, m_i, e_i).

    e_i (unified): sum of |P - P fed to the dot|. P_FP32 (fallback): P stays fp32 for the dot with V."""
    tok = start + offs_n
    mask_n = tok < kv_hi
    block = tl.load(bt_row + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    in_block = (tok % BLOCK_SIZE).to(tl.int64)
    mask_kv = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt
                + kvh * stride_kh + offs_d[None, :], mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = s * scale_log2  # [BLOCK_M, BLOCK_N]
    if CAUSAL_MASK or HAS_SLIDING:
        visible = mask_n[None, :]
        if CAUSAL_MASK:
            visible = visible & (tok[None, :] <= q_pos[:, None])
        if HAS_SLIDING:
            visible = visible & (tok[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
    v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                + kvh * stride_vh + offs_d[None, :], mask=mask_kv, other=0.0)
    m_tile = tl.max(s, 1)
    if UNIFIED:
        p = tl.exp2(s - phi_log2)
        m_i = tl.maximum(m_i, m_tile)
    else:
        m_new = tl.maximum(m_i, m_tile)
        # A row may see no key in this tile yet (sliding window): keep exp2 away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    l_i += tl.sum(p, 1)
    if P_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee" if UPCAST_DOT else DOT_PRECISION)
    else:
        p_in = p.to(v.dtype)
        if UNIFIED and MASS_CHECK:
            e_i += tl.sum(tl.abs(p - p_in.to(tl.float32)), 1)
        if UPCAST_DOT:
            acc = tl.dot(p_in.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p_in, v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i, e_i


# NOTE: ints that change from step to step (the chunk's query tiles) are not specialized on: each new
# value class (1, a multiple of 16, other) cost a ~1 s JIT compile inside a long prompt's prefill on an
# H200 (bench_prefix.py itl, 2026-12-03).
@triton.jit(do_not_specialize=["sliding_window", "max_q_tiles", "num_splits", "ws_tokens"])
def paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr,
    out_ptr, flags_ptr, stats_ptr,
    scale_log2, phi_log2, lo_log2, hi_log2, mass_tol, sliding_window, max_q_tiles,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bts, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    UNIFIED: tl.constexpr, IS_FALLBACK: tl.constexpr, HAS_SLIDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, MASS_CHECK: tl.constexpr,
    # NOTE: split-KV arguments last, with defaults: fdpp.kernels.attention_prefill_tma launches this
    # kernel (its fallback) positionally without them.
    SPLIT: tl.constexpr = False, ws_acc_ptr=None, ws_mle_ptr=None, num_splits=1, ws_tokens=0,
):
    """One (query tile, head, sequence) program; SPLIT: one key split of it (program_id(0) is
    split * max_q_tiles + tile), writing fp32 partials (acc, m, l, e) for `prefill_combine_kernel`."""
    if SPLIT:
        tile_m = tl.program_id(0) % max_q_tiles
        split = tl.program_id(0) // max_q_tiles
    else:
        tile_m = tl.program_id(0)
        split = 0
    head = tl.program_id(1)
    seq = tl.program_id(2)
    num_heads = tl.num_programs(1)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile_m * BLOCK_M >= q_len:
        return
    flag_idx = (seq * num_heads + head) * max_q_tiles + tile_m
    if IS_FALLBACK:  # noqa: SIM102 - constexpr branch: the runtime test must stay nested
        if tl.load(flags_ptr + flag_idx) == 0:
            return

    ctx_len = tl.load(context_lens_ptr + seq)
    first_pos = ctx_len - q_len  # position of the sequence's first query
    kvh = head // GROUP
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = first_pos + offs_m
    q = tl.load(q_ptr + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh
                + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    tile_first = first_pos + tile_m * BLOCK_M
    kv_hi = tl.minimum(tile_first + BLOCK_M, ctx_len)  # keys past the tile's last query are never seen
    kv_lo = 0
    if HAS_SLIDING:
        kv_lo = (tl.maximum(tile_first - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
    # Keys before full_end precede every query of the tile: no causal mask there (kv_lo <= full_end).
    full_end = (tile_first // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    e_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bts
    lo_end = full_end
    hi_start = full_end
    if SPLIT:
        # Split s walks keys [kv_lo + s * L, kv_lo + (s + 1) * L) of the tile's visible range, L a
        # multiple of BLOCK_N computed here from kv_hi: one num_splits serves any context length
        # (graph-safe), and a split past the range (short context) runs no iteration (l = 0, m = -inf).
        span = tl.cdiv(tl.cdiv(kv_hi - kv_lo, BLOCK_N), num_splits) * BLOCK_N
        s_lo = kv_lo + split * span
        s_hi = tl.minimum(s_lo + span, kv_hi)
        lo_end = tl.minimum(full_end, s_hi)
        hi_start = tl.maximum(full_end, s_lo)
        kv_lo = s_lo
        kv_hi = s_hi
    for start in range(kv_lo, lo_end, BLOCK_N):
        acc, l_i, m_i, e_i = _prefill_tile(
            acc, l_i, m_i, e_i, q, q_pos, start, kv_hi, bt_row, k_cache_ptr, v_cache_ptr, kvh,
            offs_n, offs_d, mask_d, scale_log2, phi_log2, sliding_window,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            BLOCK_SIZE, UNIFIED, False, HAS_SLIDING, DOT_PRECISION, UPCAST_DOT, IS_FALLBACK, MASS_CHECK)
    for start in range(hi_start, kv_hi, BLOCK_N):
        acc, l_i, m_i, e_i = _prefill_tile(
            acc, l_i, m_i, e_i, q, q_pos, start, kv_hi, bt_row, k_cache_ptr, v_cache_ptr, kvh,
            offs_n, offs_d, mask_d, scale_log2, phi_log2, sliding_window,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            BLOCK_SIZE, UNIFIED, True, HAS_SLIDING, DOT_PRECISION, UPCAST_DOT, IS_FALLBACK, MASS_CHECK)

    if SPLIT:
        rows = (q_start + offs_m).to(tl.int64)
        row_mask = mask_m[:, None] & mask_d[None, :]
        # workspace rows: [num_splits, ws_tokens, num_heads] (acc: x HEAD_DIM, m/l/e: x 3), fp32
        ws_row = (split.to(tl.int64) * ws_tokens + rows) * num_heads + head
        tl.store(ws_acc_ptr + ws_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_mask)
        tl.store(ws_mle_ptr + ws_row * 3, m_i, mask=mask_m)
        tl.store(ws_mle_ptr + ws_row * 3 + 1, l_i, mask=mask_m)
        tl.store(ws_mle_ptr + ws_row * 3 + 2, e_i, mask=mask_m)
    else:  # NOTE: if/else, not an early return inside the constexpr branch
        # NOTE: no `l > 0` test: a NaN l must reach the output (every query sees itself, so l > 0 else).
        out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_i[:, None])
        tl.store(out_ptr + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + head * stride_oh
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        if UNIFIED:
            rel = m_i - phi_log2
            # NOTE: written as "all conditions hold" so any NaN (inf/NaN input, inf - inf) fails it.
            ok = (rel > lo_log2) & (rel < hi_log2) & (e_i <= mass_tol * l_i) & (l_i > 0.0)
            bad = (ok == 0) & mask_m
            is_bad = tl.max(bad.to(tl.int32), 0)
            tl.store(flags_ptr + flag_idx, is_bad)
            num_rows = tl.minimum(q_len - tile_m * BLOCK_M, BLOCK_M).to(tl.int64)
            tl.atomic_add(stats_ptr, num_rows)
            if is_bad > 0:
                tl.atomic_add(stats_ptr + 1, num_rows)


@triton.jit(do_not_specialize=["max_q_tiles", "num_splits", "ws_tokens"])
def prefill_combine_kernel(
    cu_seqlens_q_ptr, out_ptr, flags_ptr, stats_ptr, ws_acc_ptr, ws_mle_ptr,
    lo_log2, hi_log2, phi_log2, mass_tol, max_q_tiles, num_splits, ws_tokens,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UNIFIED: tl.constexpr,
):
    """Sum the key splits of one (query tile, head, sequence) into `out`, then (unified) run the
    tile's exactness check on the COMBINED rows and write its flag and stats.

    Unified max: every split's partials share the exponent base phi, so the combine is a plain sum of
    acc and l (no rescale: FlashDecoding++'s point; the same holds across splits as across KV tiles).
    The row max is the max over splits and the mass error e the sum, so the check is exactly the one
    an unsplit program makes. Synchronized: partials are rescaled by e^{m_s - m} (split-KV decode)."""
    tile_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    num_heads = tl.num_programs(1)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile_m * BLOCK_M >= q_len:
        return
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    row_mask = mask_m[:, None] & mask_d[None, :]
    rows = (q_start + offs_m).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    e_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        ws_row = (split * ws_tokens + rows) * num_heads + head
        acc_s = tl.load(ws_acc_ptr + ws_row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0)
        m_s = tl.load(ws_mle_ptr + ws_row * 3, mask=mask_m, other=float("-inf"))
        l_s = tl.load(ws_mle_ptr + ws_row * 3 + 1, mask=mask_m, other=0.0)
        if UNIFIED:
            e_s = tl.load(ws_mle_ptr + ws_row * 3 + 2, mask=mask_m, other=0.0)
            # NOTE: a NaN m_s (NaN input) may be dropped by the max, but its NaN l_s and acc_s are not.
            m_i = tl.maximum(m_i, m_s)
            l_i += l_s
            e_i += e_s
            acc += acc_s
        else:
            m_new = tl.maximum(m_i, m_s)
            # An empty split (m_s = -inf, l_s = 0) or no key yet: keep exp2 away from -inf - -inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            beta = tl.exp2(m_s - m_safe)
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
            l_i = l_i * alpha + l_s * beta
            m_i = m_new

    out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_i[:, None])
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask)
    if UNIFIED:
        rel = m_i - phi_log2
        ok = (rel > lo_log2) & (rel < hi_log2) & (e_i <= mass_tol * l_i) & (l_i > 0.0)
        bad = (ok == 0) & mask_m
        is_bad = tl.max(bad.to(tl.int32), 0)
        tl.store(flags_ptr + (seq * num_heads + head) * max_q_tiles + tile_m, is_bad)
        num_rows = tl.minimum(q_len - tile_m * BLOCK_M, BLOCK_M).to(tl.int64)
        tl.atomic_add(stats_ptr, num_rows)
        if is_bad > 0:
            tl.atomic_add(stats_ptr + 1, num_rows)


# Split heuristic (see choose_prefill_splits): ~1 program per SM, >= 1k keys per split, <= 16. Measured on
# an H200 (bench/bench_chunk_attention.py, 2026-12-03, 32 heads, fp16): the best split count of a 128/256-
# query chunk at 4k and 16k keys is the one that makes ~128 programs (4 / 2 splits: 2.73x / 1.64x the
# unsplit kernel at 16k); the first constants (2 per SM, 2k keys) picked 8 / 4, 0.77-0.91x of the best.
SPLIT_TARGET_PROGRAMS_PER_SM = 1
SPLIT_MIN_KEYS = 1024
SPLIT_MAX = 16


def choose_prefill_splits(num_q_tiles: int, num_heads: int, num_seqs: int, max_context: int, num_sms: int,
                          *, min_keys_per_split: int = SPLIT_MIN_KEYS, max_splits: int = SPLIT_MAX) -> int:
    """Key splits for a paged prefill launch of num_q_tiles x num_heads x num_seqs programs whose
    longest context is max_context keys on a GPU of num_sms SMs (pure host function; 1: no split).

    Splits only when the grid is well below SPLIT_TARGET_PROGRAMS_PER_SM x num_sms programs (a late
    chunk of a long prompt: 2 tiles x 32 heads = 64 programs on 132 SMs, each walking up to 16k keys)
    AND every split would still get >= min_keys_per_split keys; at most max_splits."""
    for name, v in (("num_q_tiles", num_q_tiles), ("num_heads", num_heads), ("num_seqs", num_seqs),
                    ("num_sms", num_sms)):
        if v < 1:
            raise ValueError(f"choose_prefill_splits: {name} must be >= 1, got {v}")
    programs = num_q_tiles * num_heads * num_seqs
    by_occupancy = (SPLIT_TARGET_PROGRAMS_PER_SM * num_sms) // programs
    by_length = max(0, int(max_context)) // max(1, min_keys_per_split)
    splits = min(by_occupancy, by_length, max_splits)
    return splits if splits >= 2 else 1


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _default_config(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    if not on_gpu:
        return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}
    if head_dim <= 128:
        return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2}


def prefill_block_m(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> int:
    """Query rows per program of the default config (what `choose_prefill_splits` counts tiles in)."""
    return _default_config(head_dim, dtype, on_gpu)["block_m"]


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    scale: float,
    max_seqlen_q: int,
    phi: float | None = None,
    window: tuple[float, float] = (-8.0, 10.5),
    sliding_window: int | None = None,
    fallback: bool = True,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    mass_tol: float | None = None,
    flags_out: list | None = None,
    num_splits: int = 1,
) -> torch.Tensor:
    """Causal varlen prefill over the paged cache. Returns `[num_tokens, num_heads, head_dim]`.

    phi: unified max value for the scaled scores (None: synchronized online softmax). window (lo,
    hi): query tiles where a row's max score m has m - phi outside (lo, hi), or whose P lost more than
    mass_tol (relative l1; default MASS_TOL[dtype]) in the cast for the dot, are flagged and, with
    fallback=True, recomputed by the synchronized kernel (second graph-safe launch, P in fp32).
    stats: int64 `[2]` device tensor, += (query rows checked, query rows recomputed) per head.
    num_splits: key splits per query tile (split-KV for chunks over long contexts, see
    `choose_prefill_splits`). 1: the single-kernel path. > 1: each split writes fp32 partials to a
    workspace (allocated per call like `flags`: under CUDA-graph capture it comes from the graph's
    pool), `prefill_combine_kernel` sums them into `out` and runs the exactness check on the combined
    rows, then the fallback launch (unsplit) recomputes flagged tiles. The split length is computed
    in the kernel from each tile's key range, so one num_splits is right for any context length.
    """
    if q.dim() != 3:
        raise ValueError(f"prefill attention: q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("prefill attention: k_cache and v_cache must both be "
                         "[num_blocks, block_size, num_kv_heads, head_dim]")
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"prefill attention: q/k_cache/v_cache must share one of {_SUPPORTED_DTYPES}; got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kv_head_dim = k_cache.shape
    if kv_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"prefill attention: q heads/head_dim ({num_heads}, {head_dim}) do not fit the cache "
                         f"({num_kv_heads}, {kv_head_dim})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("prefill attention: the head_dim axis of q, k_cache and v_cache must be contiguous")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32 or cu_seqlens_q.dtype != torch.int32:
        raise TypeError("prefill attention: block_tables, context_lens and cu_seqlens_q must be int32")
    if block_tables.stride(1) != 1 or not context_lens.is_contiguous() or not cu_seqlens_q.is_contiguous():
        raise ValueError("prefill attention: block_tables rows, context_lens and cu_seqlens_q must be contiguous")
    if head_dim > 256:
        raise ValueError(f"prefill attention: head_dim {head_dim} > 256 is not supported")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"prefill attention: num_splits must be an int >= 1, got {num_splits!r}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    device = q.device
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs <= 0:
        return out

    cfg = _default_config(head_dim, q.dtype, device.type == "cuda")
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_q_tiles = triton.cdiv(max(1, int(max_seqlen_q)), block_m)
    if stats is None:
        stats = torch.zeros(2, dtype=torch.int64, device=device)
    flags = (torch.empty(num_seqs * num_heads * max_q_tiles, dtype=torch.int32, device=device)
             if phi is not None else context_lens)
    lo, hi = window
    if mass_tol is None:
        mass_tol = MASS_TOL[q.dtype]
    grid = (max_q_tiles, num_heads, num_seqs)
    if num_splits > 1:
        ws_acc = torch.empty(num_splits * num_tokens * num_heads * head_dim, dtype=torch.float32, device=device)
        ws_mle = torch.empty(num_splits * num_tokens * num_heads * 3, dtype=torch.float32, device=device)
    else:
        ws_acc = ws_mle = None  # unused (SPLIT=False)
    common = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
                  HAS_SLIDING=sliding_window is not None,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  UPCAST_DOT=upcast_bf16_dot(q.dtype), MASS_CHECK=mass_check(q.dtype), num_warps=num_warps)

    def launch(unified: bool, is_fallback: bool, splits: int = 1):
        paged_prefill_kernel[(max_q_tiles * splits, num_heads, num_seqs)](
            q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
            out, flags, stats,
            float(scale) * LOG2E, (phi or 0.0) * LOG2E, lo * LOG2E, hi * LOG2E, float(mass_tol),
            int(sliding_window or 0), max_q_tiles,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1),
            UNIFIED=unified, IS_FALLBACK=is_fallback,
            SPLIT=splits > 1, ws_acc_ptr=ws_acc, ws_mle_ptr=ws_mle, num_splits=splits, ws_tokens=num_tokens,
            # NOTE: the fallback's fp32 V tile needs twice the shared memory: one stage less.
            num_stages=max(1, num_stages - 1) if is_fallback else num_stages, **common,
        )
        if splits > 1:
            prefill_combine_kernel[grid](
                cu_seqlens_q, out, flags, stats, ws_acc, ws_mle,
                lo * LOG2E, hi * LOG2E, (phi or 0.0) * LOG2E, float(mass_tol), max_q_tiles, splits, num_tokens,
                out.stride(0), out.stride(1),
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, UNIFIED=unified, num_warps=4,
            )

    if phi is None:
        launch(unified=False, is_fallback=False, splits=num_splits)
    else:
        if not math.isfinite(phi):
            raise ValueError(f"prefill attention: phi must be finite, got {phi}")
        launch(unified=True, is_fallback=False, splits=num_splits)
        if fallback:
            launch(unified=False, is_fallback=True)
        if flags_out is not None:
            flags_out.append(flags.view(num_seqs, num_heads, max_q_tiles))
    return out
