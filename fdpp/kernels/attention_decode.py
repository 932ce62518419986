"""Paged decode attention (one query token per sequence) with FlashDecoding++'s asynchronized softmax.

Layouts (docs/ARCHITECTURE.md): q `[num_seqs, num_heads, head_dim]`; k_cache / v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`; block_tables `[num_seqs, max_blocks]` int32;
context_lens `[num_seqs]` int32 (KV tokens including the new one).

One program handles one (sequence, KV head, split): the GROUP query heads that share the KV head form
the M dimension of one tensor-core tile (padded to 16), so each K/V tile is read from memory once
(GQA / MQA). The KV length is split across programs (FlashDecoding); `choose_num_splits` picks the
split count so that even batch 1 with 8 KV heads fills the GPU.

Two softmax schemes:
- unified max (`phi` given): each split accumulates sum_j P_j v_j and sum_j e^{s_j - phi} with
  P_j = e^{s_j - phi} cast to the K/V dtype for the dot, no running max and no rescale; the splits
  combine by a plain sum and one division.
- synchronized: classic online softmax with a running max; splits merge by log-sum-exp.

Exactness guarantee of the unified path. For every input, each output row is either
(a) the unified result, which is the synchronized result up to the rounding of P to the K/V dtype
    (the synchronized kernel rounds its P the same way), or
(b) flagged and recomputed with the synchronized loop, keeping P in fp32 for the dot with V (tf32
    tensor cores on a GPU: nothing underflows there, so a recomputed row is at least as exact as
    the synchronized kernel, which casts its P = e^{s - m} <= 1 to the K/V dtype).
A row stays on the fast path only if ALL of these hold (fp32, per row, over the whole row):
- the row max m satisfies lo < m - phi < hi (the safe window: no overflow of P, largest P normal);
- the l1 distance between the P that entered the dot and the exact fp32 P is small:
  sum_j |e^{s_j - phi} - cast(e^{s_j - phi})| <= MASS_TOL * sum_j e^{s_j - phi}.
  This bounds the unified output error by MASS_TOL * max|v| beyond fp32 rounding. Rounding alone moves
  each P by at most the unit roundoff u of the P dtype (fp16 2^-11, bf16 2^-8) relative, so the sum is
  <= u * l and a row whose only error is rounding is never flagged: MASS_TOL = 4u (fp16 2^-9, bf16
  2^-6). Mass that underflows (P below fp16's subnormal range, or subnormal P with few bits) is lost
  one-sidedly and accumulates; that is what the check catches (issue #11: one key at -5, thousands at
  -17.5 lost all of their 1.5% of the mass to fp16 underflow without a flag);
- l > 0 (some P is nonzero in fp32).
For bf16 the l1 bound holds by construction inside the window (bf16 has fp32's exponent range, see
`mass_check`), so only fp16 kernels measure it.
The test is written as `ok = (...) & (...)`, so a NaN anywhere in the row (NaN or inf in q or k, an
inf - inf) makes it fail: the row is recomputed by the synchronized loop, which propagates the NaN
into the output (`acc / l` with l NaN; no `l > 0` guard that would turn it into 0). A sequence with
no KV tokens (graph padding) is written as zeros and never flagged.

Fallback without a second launch (`fused_fallback=True`, the default): the program that finishes a
(sequence, KV head) group (the only split, or the last-arriving split of the fused reduction, see
below) checks its rows and, if any is flagged, recomputes the whole group with the synchronized loop
over the full context before storing. The recompute is serial in that one program (a rare, slow
path: a flagged 32k row reads its K/V once more from one SM); the common case is one launch per layer
with no work for the fallback. `fused_fallback=False` keeps the old scheme for comparison: a second,
always-launched synchronized kernel whose programs exit at once unless their row was flagged.
Both are graph-safe: no host sync, grids do not depend on data.

The split reduction runs inside the split kernel: each split stores its partial result, then takes a
ticket from a per-(sequence, KV head) counter in a small int32 workspace; the program that draws the
last ticket merges all splits, writes the output and resets the counter to 0 (so the next launch, or
graph replay, finds it zeroed). A separate reduce kernel (`fused_reduce=False`) does the same merge in
a second launch (then the fallback is the separate launch too).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fdpp.kernels.device import num_sms, pdl_enabled, upcast_bf16_dot

LOG2E = 1.4426950408889634

# Relative l1 tolerance for the P that entered the dot (see the module docstring): 4x the unit roundoff
# of the P dtype, so rounding alone never flags a row. fp32 P is fed uncast (the tolerance is unused).
MASS_TOL: dict[torch.dtype, float] = {
    torch.float16: 2.0 ** -9,
    torch.bfloat16: 2.0 ** -6,
    torch.float32: 2.0 ** -9,
}


def mass_check(dtype: torch.dtype) -> bool:
    """Whether the kernels must measure the mass P loses in the cast: only for fp16.

    bf16 has fp32's exponent range, so inside the window (lo > -87 nats) a P that is subnormal in bf16
    is subnormal in fp32 too (< 2^-126), while l > e^lo: such P hold < N * 2^-126 / e^-50 < 1e-7 of the
    mass for N < 2^31. Every other P rounds by <= 2^-8 relative. So sum |P - cast(P)| <= 2^-8 l + 1e-7 l
    < MASS_TOL * l holds by construction for every in-window bf16 row (fp32 P is not cast at all); NaN
    and inf still fail the `l > 0` / window tests."""
    return dtype == torch.float16


@triton.jit
def _decode_range(
    acc, l_i, m_i, e_i, q, lo, hi, bt_row, k_cache_ptr, v_cache_ptr, kvh,
    offs_n, offs_d, mask_d, scale_log2, phi_log2,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, UNIFIED: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, P_FP32: tl.constexpr, MASS_CHECK: tl.constexpr,
):
    """Accumulate the KV tokens [lo, hi) into (acc, l_i, m_i, e_i).

    m_i is the row max of s * scale * log2(e). Unified: l_i = sum 2^{s - phi}, e_i = sum of |P - P fed
    to the dot| (fp32). Synchronized: online softmax relative to m_i (e_i untouched).
    P_FP32 (the fallback recompute): P stays fp32 for the dot with V (tf32 on a GPU: fp16's mantissa but
    fp32's exponent, so nothing underflows); otherwise P is cast to the K/V dtype.
    """
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        mask_n = tok < hi
        block = tl.load(bt_row + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        in_block = (tok % BLOCK_SIZE).to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt
                    + kvh * stride_kh + offs_d[None, :], mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + kvh * stride_vh + offs_d[None, :], mask=mask_kv, other=0.0)
        if USE_DOT and UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        elif USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(mask_n[None, :], s * scale_log2, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_tile = tl.max(s, 1)
        if UNIFIED:
            p = tl.exp2(s - phi_log2)
            m_i = tl.maximum(m_i, m_tile)
        else:
            # NOTE: every tile holds a valid token, so m_new is finite for finite inputs; an all -inf
            # or NaN tile (inf/NaN in q or k) gives NaN here, which is the answer for such input.
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        l_i += tl.sum(p, 1)
        if USE_DOT and P_FP32:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee" if UPCAST_DOT else DOT_PRECISION)
        elif USE_DOT:
            p_in = p.to(v.dtype)
            if UNIFIED and MASS_CHECK:
                e_i += tl.sum(tl.abs(p - p_in.to(tl.float32)), 1)
            if UPCAST_DOT:
                acc += tl.dot(p_in.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(p_in, v, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)  # fp32 P: nothing lost
    return acc, l_i, m_i, e_i


@triton.jit
def _decode_merge(
    part_acc_ptr, part_m_ptr, part_l_ptr, part_e_ptr, seq, kvh, num_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, UNIFIED: tl.constexpr,
):
    """Merge the partial results of all splits of one (sequence, KV head): (acc, l, m, e).

    SPLIT_CHUNK splits are loaded at once ([SPLIT_CHUNK, BLOCK_G, BLOCK_D]) so the merge is not a
    chain of dependent L2 round trips.
    """
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, SPLIT_CHUNK)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    base = (seq * num_heads + heads) * num_splits  # [BLOCK_G]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    e_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        split = s0 + offs_s
        idx = base[None, :] + split[:, None]  # [SPLIT_CHUNK, BLOCK_G]
        mask_sg = (split[:, None] < num_splits) & mask_g[None, :]
        # NOTE: .cg reads bypass L1, so the partials other programs just wrote are seen.
        m_s = tl.load(part_m_ptr + idx, mask=mask_sg, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_l_ptr + idx, mask=mask_sg, other=0.0, cache_modifier=".cg")
        a_s = tl.load(part_acc_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                      mask=mask_sg[:, :, None] & mask_d[None, None, :], other=0.0, cache_modifier=".cg")
        if UNIFIED:
            # Every split used the same phi: a plain sum, no rescale.
            e_s = tl.load(part_e_ptr + idx, mask=mask_sg, other=0.0, cache_modifier=".cg")
            m_i = tl.maximum(m_i, tl.max(m_s, 0))
            l_i += tl.sum(l_s, 0)
            e_i += tl.sum(e_s, 0)
            acc += tl.sum(a_s, 0)
        else:
            m_new = tl.maximum(m_i, tl.max(m_s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty trailing splits
            alpha = tl.exp2(m_i - m_safe)
            beta = tl.exp2(m_s - m_safe[None, :])  # [SPLIT_CHUNK, BLOCK_G]
            l_i = l_i * alpha + tl.sum(l_s * beta, 0)
            acc = acc * alpha[:, None] + tl.sum(a_s * beta[:, :, None], 0)
            m_i = m_new
    return acc, l_i, m_i, e_i


@triton.jit
def _decode_epilogue(
    acc, l_i, m_i, e_i, seq, heads, mask_g, offs_d, mask_d, ctx_len,
    out_ptr, flags_ptr, stats_ptr, num_heads, phi_log2, lo_log2, hi_log2, mass_tol, stride_os, stride_oh,
    GROUP: tl.constexpr, UNIFIED: tl.constexpr, FUSED_FALLBACK: tl.constexpr,
):
    """Check the unified rows (flags, stats), divide by the softmax denominator and store the output.

    Returns the number of flagged rows of the group (0 when not UNIFIED). With FUSED_FALLBACK a group
    with a flagged row is not stored here: `_decode_recompute` stores the whole group.
    """
    num_bad = tl.zeros([], tl.int64)
    store = mask_g
    if UNIFIED:
        rel = m_i - phi_log2
        # NOTE: written as "all conditions hold" so any NaN (inf/NaN input, inf - inf) fails it.
        ok = (rel > lo_log2) & (rel < hi_log2) & (e_i <= mass_tol * l_i) & (l_i > 0.0)
        bad = (ok == 0) & mask_g & (ctx_len > 0)  # an empty (graph padding) sequence is never flagged
        tl.store(flags_ptr + seq * num_heads + heads, bad.to(tl.int32), mask=mask_g)
        if ctx_len > 0:
            tl.atomic_add(stats_ptr, tl.full([], GROUP, tl.int64))
        num_bad = tl.sum(bad.to(tl.int64), 0)
        if num_bad > 0:
            tl.atomic_add(stats_ptr + 1, num_bad)
        if FUSED_FALLBACK:
            store = mask_g & ((bad.to(tl.int64) * 0 + num_bad) == 0)  # (broadcast: interpreter-safe)
    # l == 0 only for an empty sequence (zeros) or a flagged unified row (recomputed afterwards).
    # NOTE: no `l > 0` test: a NaN l must reach the output.
    out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_i[:, None])
    out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store[:, None] & mask_d[None, :])
    return num_bad


@triton.jit
def _decode_recompute(
    q, seq, heads, mask_g, offs_n, offs_d, mask_d, kv_start, ctx_len, bt_row, k_cache_ptr, v_cache_ptr,
    out_ptr, kvh, scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_os, stride_oh,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N_FB: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Fused fallback: the whole (sequence, KV head) group with the synchronized loop (P kept in fp32),
    stored. Tiles of BLOCK_N_FB tokens: the fp32 V tile of this rare path must not raise the register
    count (and so cut the occupancy) of the kernel's fast path (measured: 43 -> 50 us at 8 x 4k GQA with
    128-token tiles here)."""
    offs_n = tl.arange(0, BLOCK_N_FB)
    acc, l_i, m_i, e_i = _decode_range(
        tl.zeros([BLOCK_G, BLOCK_D], tl.float32), tl.zeros([BLOCK_G], tl.float32),
        tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
        q, kv_start, ctx_len, bt_row, k_cache_ptr, v_cache_ptr, kvh, offs_n, offs_d, mask_d, scale_log2, 0.0,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        BLOCK_SIZE, BLOCK_N_FB, False, USE_DOT, DOT_PRECISION, UPCAST_DOT, True, False)
    out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_i[:, None])
    out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


# NOTE: ints that change from step to step are not specialized on (Triton compiles a variant for a
# value of 1 and for multiples of 16): a new split count or window would otherwise cost a ~1 s JIT
# compile in the middle of serving, seen on an H200 inside a long prompt's prefill window.
@triton.jit(do_not_specialize=["sliding_window", "num_splits"])
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, part_e_ptr, flags_ptr, counters_ptr, stats_ptr,
    scale_log2, phi_log2, lo_log2, hi_log2, mass_tol, sliding_window, num_splits,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bts, stride_os, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GR: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIFIED: tl.constexpr, IS_FALLBACK: tl.constexpr, FUSED_FALLBACK: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, FUSED_REDUCE: tl.constexpr, USE_DOT: tl.constexpr,
    HAS_SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, MASS_CHECK: tl.constexpr,
    TRIGGER_PDL: tl.constexpr = False,  # let the next kernel (a PDL GEMV) launch during this one
):
    if TRIGGER_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_heads = num_kv_heads * GROUP

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # query heads sharing this KV head: the M dim of the dot

    if IS_FALLBACK:
        flagged = tl.load(flags_ptr + seq * num_heads + heads, mask=mask_g, other=0)
        if tl.max(flagged, 0) == 0:
            return

    ctx_len = tl.load(context_lens_ptr + seq)
    kv_start = 0
    if HAS_SLIDING:
        kv_start = tl.maximum(ctx_len - sliding_window, 0)
    # Each split covers a whole number of BLOCK_N tiles; trailing splits may be empty.
    split_len = tl.cdiv(tl.cdiv(ctx_len - kv_start, num_splits), BLOCK_N) * BLOCK_N
    lo = kv_start + split * split_len
    hi = tl.minimum(lo + split_len, ctx_len)

    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if not USE_DOT:
        q = q.to(tl.float32)

    bt_row = block_tables_ptr + seq * stride_bts
    acc, l_i, m_i, e_i = _decode_range(
        tl.zeros([BLOCK_G, BLOCK_D], tl.float32), tl.zeros([BLOCK_G], tl.float32),
        tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
        q, lo, hi, bt_row, k_cache_ptr, v_cache_ptr, kvh, offs_n, offs_d, mask_d, scale_log2, phi_log2,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        BLOCK_SIZE, BLOCK_N, UNIFIED, USE_DOT, DOT_PRECISION, UPCAST_DOT, IS_FALLBACK, MASS_CHECK)

    if SINGLE_SPLIT:
        num_bad = _decode_epilogue(
            acc, l_i, m_i, e_i, seq, heads, mask_g, offs_d, mask_d, ctx_len,
            out_ptr, flags_ptr, stats_ptr, num_heads, phi_log2, lo_log2, hi_log2, mass_tol, stride_os, stride_oh,
            GROUP, UNIFIED, FUSED_FALLBACK)
        if FUSED_FALLBACK:  # noqa: SIM102 - constexpr branch: the runtime test must stay nested
            if num_bad > 0:
                _decode_recompute(
                    q, seq, heads, mask_g, offs_n, offs_d, mask_d, kv_start, ctx_len, bt_row, k_cache_ptr,
                    v_cache_ptr, out_ptr, kvh, scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                    stride_vh, stride_os, stride_oh,
                    BLOCK_G, BLOCK_D, BLOCK_SIZE, 32, USE_DOT, DOT_PRECISION, UPCAST_DOT)
    else:
        idx = (seq * num_heads + heads) * num_splits + split
        tl.store(part_m_ptr + idx, m_i, mask=mask_g)
        tl.store(part_l_ptr + idx, l_i, mask=mask_g)
        if UNIFIED:
            tl.store(part_e_ptr + idx, e_i, mask=mask_g)
        tl.store(part_acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=mask_g[:, None] & mask_d[None, :])
        if FUSED_REDUCE:
            # All threads' partial stores happen before the ticket (release); the last program's
            # acquire makes every split's partials visible to its .cg loads.
            tl.debug_barrier()
            counter = counters_ptr + seq * num_kv_heads + kvh
            ticket = tl.atomic_add(counter, 1, sem="acq_rel")
            if ticket == num_splits - 1:
                # The merge tile has GROUP rows (rounded up to a power of 2), not the dot's 16.
                offs_r = tl.arange(0, BLOCK_GR)
                mask_r = offs_r < GROUP
                heads_r = kvh * GROUP + offs_r
                acc_r, l_r, m_r, e_r = _decode_merge(
                    part_acc_ptr, part_m_ptr, part_l_ptr, part_e_ptr, seq, kvh, num_heads, num_splits,
                    GROUP, BLOCK_GR, HEAD_DIM, BLOCK_D, SPLIT_CHUNK, UNIFIED)
                tl.atomic_xchg(counter, 0)
                num_bad = _decode_epilogue(
                    acc_r, l_r, m_r, e_r, seq, heads_r, mask_r, offs_d, mask_d, ctx_len,
                    out_ptr, flags_ptr, stats_ptr, num_heads, phi_log2, lo_log2, hi_log2, mass_tol,
                    stride_os, stride_oh, GROUP, UNIFIED, FUSED_FALLBACK)
                if FUSED_FALLBACK:  # noqa: SIM102 - constexpr branch: the runtime test must stay nested
                    if num_bad > 0:
                        _decode_recompute(
                            q, seq, heads, mask_g, offs_n, offs_d, mask_d, kv_start, ctx_len, bt_row,
                            k_cache_ptr, v_cache_ptr, out_ptr, kvh, scale_log2, stride_kb, stride_kt,
                            stride_kh, stride_vb, stride_vt, stride_vh, stride_os, stride_oh,
                            BLOCK_G, BLOCK_D, BLOCK_SIZE, 32, USE_DOT, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def paged_decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, part_e_ptr, context_lens_ptr, out_ptr, flags_ptr, stats_ptr,
    phi_log2, lo_log2, hi_log2, mass_tol, num_splits, stride_os, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, UNIFIED: tl.constexpr, IS_FALLBACK: tl.constexpr,
):
    """Second-launch merge of the splits (used with fused_reduce=False; the fallback is a launch too)."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    num_heads = tl.num_programs(1) * GROUP
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    if IS_FALLBACK:
        flagged = tl.load(flags_ptr + seq * num_heads + heads, mask=mask_g, other=0)
        if tl.max(flagged, 0) == 0:
            return
    acc, l_i, m_i, e_i = _decode_merge(
        part_acc_ptr, part_m_ptr, part_l_ptr, part_e_ptr, seq, kvh, num_heads, num_splits,
        GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, SPLIT_CHUNK, UNIFIED)
    ctx_len = tl.load(context_lens_ptr + seq)
    _decode_epilogue(acc, l_i, m_i, e_i, seq, heads, mask_g, offs_d, mask_d, ctx_len,
                     out_ptr, flags_ptr, stats_ptr, num_heads, phi_log2, lo_log2, hi_log2, mass_tol,
                     stride_os, stride_oh, GROUP, UNIFIED, False)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_workspace: dict[tuple, torch.Tensor] = {}

# Split heuristic (choose_num_splits), picked by `bench/bench_attention.py --tune` on an H200 over 20
# candidates: fill ~2 programs per SM, never less than 128 tokens per split. Overridable per call.
DECODE_TARGET_PROGRAMS_PER_SM = 2
DECODE_MIN_TOKENS_PER_SPLIT = 128
DECODE_MAX_SPLITS = 64


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                      *, target_programs_per_sm: int | None = None,
                      min_tokens_per_split: int | None = None,
                      max_splits: int | None = None) -> int:
    """Split count for split-KV decode: enough programs to fill the GPU, each with enough tokens.

    Programs = num_seqs * num_kv_heads * splits. With fewer (sequence, KV head) groups than
    `target_programs_per_sm * num_sms`, the KV length is split until the GPU is full, but no split
    gets fewer than `min_tokens_per_split` tokens (a tiny split costs its fixed overhead for little
    data). The count is rounded down to a power of 2 so the splits divide the tiles evenly: measured on
    an H200 (bench/results/attention_NVIDIA_H200_2026-12-03_quick_notes.md), batch-1 GQA 32/8 at 16k
    and 32k runs 35.8 / 52.0 us with 32 splits against 38.6 / 54.5 with 33, 8 x 4k GQA 44.1 (4) vs
    50.1 (5), 1 x 4k MHA 24.8 (8) vs 25.2 (9). Batch-1 GQA 32/8 gets 8 KV heads x 32 splits = 256
    programs from 4k on (two per SM on 132 SMs).
    """
    target = target_programs_per_sm or DECODE_TARGET_PROGRAMS_PER_SM
    min_tokens = min_tokens_per_split or DECODE_MIN_TOKENS_PER_SPLIT
    cap = max_splits or DECODE_MAX_SPLITS
    groups = max(1, num_seqs * num_kv_heads)
    want = -(-target * num_sms // groups)
    by_len = max(1, max_context_len // min_tokens)
    n = int(max(1, min(want, by_len, cap)))
    return 1 << (n.bit_length() - 1)


# Unequal rows (balance_num_splits): a batch counts as unbalanced when its longest context is at least
# DECODE_BALANCE_MIN_TOKENS and DECODE_BALANCE_RATIO times the mean; the split count then keeps the longest
# row's programs at about the work a program gets with DECODE_BALANCE_PROGRAMS_PER_SM programs per SM.
DECODE_BALANCE_MIN_TOKENS = 2048
DECODE_BALANCE_RATIO = 4
DECODE_BALANCE_PROGRAMS_PER_SM = 4


def balance_num_splits(context_lens: Sequence[int], num_kv_heads: int, num_sms: int) -> int | None:
    """Split count for a decode batch whose longest row would otherwise be the step's tail, else None.

    `choose_num_splits` sizes the split count for the batch: with 32 rows x 32 KV heads the GPU is already
    full at 1 split. But one 16k-token row among 32 rows of ~1k then walks its 16k keys in one program per
    head while the rest of the GPU idles (an H200 step of 27-30 ms against 6.3 ms with equal rows:
    bench_prefix.py itl, 2026-12-03). Every row is split into the same number of equal parts, so s splits
    cap the longest program at max / s keys (short rows get short splits). Returns the power of 2 s nearest
    to the count that brings max / s down to the balanced work per program (total keys x KV heads / (programs per SM x SMs)),
    within DECODE_MAX_SPLITS and at least DECODE_MIN_TOKENS_PER_SPLIT keys per split of the longest row;
    None when the batch is balanced (longest < DECODE_BALANCE_MIN_TOKENS or < DECODE_BALANCE_RATIO x mean).
    """
    n = len(context_lens)
    if n < 2:
        return None
    longest, total = max(context_lens), sum(context_lens)
    if longest < DECODE_BALANCE_MIN_TOKENS or longest * n < DECODE_BALANCE_RATIO * total:
        return None
    per_program = max(total * num_kv_heads / (DECODE_BALANCE_PROGRAMS_PER_SM * max(1, num_sms)),
                      DECODE_MIN_TOKENS_PER_SPLIT)
    want = min(-(-longest // int(per_program)), DECODE_MAX_SPLITS, max(1, longest // DECODE_MIN_TOKENS_PER_SPLIT))
    n = 1 << round(math.log2(want))  # the nearest power of 2: the splits divide the tiles evenly
    return n if n > 1 else None


def split_counters(device: torch.device, numel: int) -> torch.Tensor:
    """Zeroed int32 tickets for the fused split reduction; kernels leave them zeroed again.

    NOTE: shared by every launch on the device, so decode attention must not run on two streams at
    once. Allocated once per device and grown only when too small. Growing allocates, so warm up at
    the largest batch before capturing CUDA graphs (the engine's warm-up run does this).
    """
    key = ("counters", str(device))
    buf = _workspace.get(key)
    if buf is None or buf.numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "decode attention needs a larger split-counter workspace while a CUDA graph is being "
                "captured; run one eager step at the largest batch size before capturing")
        with torch.inference_mode(False):  # a process-lifetime buffer, not an inference tensor
            buf = torch.zeros(max(numel, 1 << 16), dtype=torch.int32, device=device)
        _workspace[key] = buf
    return buf


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3:
        raise ValueError(f"decode attention: q must be [num_seqs, num_heads, head_dim], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("decode attention: k_cache and v_cache must both be "
                         f"[num_blocks, block_size, num_kv_heads, head_dim]; got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode attention: q/k_cache/v_cache must share one of {_SUPPORTED_DTYPES}; got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    num_seqs, num_heads, head_dim = q.shape
    _, _, num_kv_heads, kv_head_dim = k_cache.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"decode attention: q head_dim {head_dim} != cache head_dim {kv_head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"decode attention: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode attention: the head_dim axis of q, k_cache and v_cache must be contiguous")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError("decode attention: block_tables and context_lens must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] < num_seqs or context_lens.shape[0] < num_seqs:
        raise ValueError("decode attention: block_tables must be [num_seqs, max_blocks] and context_lens [num_seqs]")
    if block_tables.stride(1) != 1 or not context_lens.is_contiguous():
        raise ValueError("decode attention: block_tables rows and context_lens must be contiguous")
    if head_dim > 256:
        raise ValueError(f"decode attention: head_dim {head_dim} > 256 is not supported")


# Kernel configs for 16-bit head_dim <= 128, picked by `bench/bench_attention.py --tune` on an H200
# (bench/results/attention_NVIDIA_H200_2026-11-26.md): one for steps with fewer (sequence, KV head)
# groups than SMs, where the KV length is split (long tiles: fewer, larger loads per program), one for
# batched steps (groups >= SMs, mostly one split: small CTAs, deeper pipelining).
DECODE_CONFIG_SPLIT = {"block_n": 128, "num_warps": 4, "num_stages": 2}
DECODE_CONFIG_BATCH = {"block_n": 64, "num_warps": 2, "num_stages": 3}


def _default_config(head_dim: int, group: int, dtype: torch.dtype, is_batched: bool) -> dict:
    # NOTE: the dot path (query rows padded to 16) beats broadcast-multiply-reduce even for MHA:
    # measured 2.2 vs 1.5 TB/s at 1 x 4k and 4.1 vs 2.6 TB/s at 8 x 4k on an H200.
    cfg = dict(DECODE_CONFIG_BATCH if is_batched else DECODE_CONFIG_SPLIT, use_dot=True)
    if head_dim > 128 or dtype == torch.float32:
        cfg["block_n"] = 32
    return cfg


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    max_context_len: int,
    phi: float | None = None,
    window: tuple[float, float] = (-60.0, 60.0),
    sliding_window: int | None = None,
    fallback: bool = True,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    fused_reduce: bool = True,
    fused_fallback: bool = True,
    mass_tol: float | None = None,
    flags_out: list | None = None,
) -> torch.Tensor:
    """Paged decode attention. Returns `[num_seqs, num_heads, head_dim]` in q's dtype.

    phi: unified max value (in units of the scaled score s = scale * q.k). None runs the
    synchronized online softmax. window: (lo, hi) such that rows whose max score m satisfies
    lo < m - phi < hi and whose P lost at most mass_tol (relative l1; default MASS_TOL[dtype]) in the
    cast for the dot are trusted; others are flagged and, with fallback=True, recomputed with the
    synchronized softmax: inside the same launch (fused_fallback=True, default; needs fused_reduce or
    one split) or by a second, always-launched, graph-safe kernel (fused_fallback=False).
    stats: int64 `[2]` device tensor, += (rows checked, rows flagged) by the unified kernel.
    flags_out: if a list is given, the per-(seq, head) int32 flag tensor is appended (tests).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    cfg = _default_config(head_dim, group, q.dtype, num_seqs * num_kv_heads >= num_sms(q.device))
    auto_block_n = block_n is None
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    use_dot = cfg["use_dot"] if use_dot is None else use_dot
    block_g = triton.next_power_of_2(group)
    if use_dot:
        block_g = max(16, block_g)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_gr = triton.next_power_of_2(group)  # merge tile: no padding needed there
    split_chunk = max(1, min(32, 4096 // (block_gr * block_d)))
    device = q.device

    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("decode attention: out must match q's shape and dtype with a contiguous last axis")
    if num_seqs == 0:
        return out
    eff_len = max_context_len if sliding_window is None else min(max_context_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, eff_len, num_sms(device))
    num_splits = max(1, int(num_splits))
    if auto_block_n and num_splits > 1:
        # Splits cover whole BLOCK_N tiles: with fewer than BLOCK_N tokens per split the trailing
        # splits would be empty programs. Shrink the tile so every split gets work (batch 1, short
        # context: the parallelism the split count asked for).
        per_split = -(-eff_len // num_splits)
        while block_n > 32 and block_n // 2 >= per_split:
            block_n //= 2
    if stats is None:
        stats = torch.zeros(2, dtype=torch.int64, device=device)

    single = num_splits == 1
    if single:
        part_acc = part_m = part_l = out  # unused
    else:
        part_acc = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=device)
        part_m = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=device)
        part_l = torch.empty_like(part_m)
    part_e = part_l if phi is None or single else torch.empty_like(part_m)
    counters = split_counters(device, num_seqs * num_kv_heads) if (not single and fused_reduce) else context_lens
    flags = torch.empty(num_seqs, num_heads, dtype=torch.int32, device=device) if phi is not None else context_lens

    scale_log2 = float(scale) * LOG2E
    lo, hi = window
    if mass_tol is None:
        mass_tol = MASS_TOL[q.dtype]
    in_kernel_fallback = fallback and fused_fallback and (single or fused_reduce)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_seqs, num_kv_heads, num_splits)

    def launch(unified: bool, is_fallback: bool):
        paged_decode_kernel[grid](
            q, k_cache, v_cache, block_tables, context_lens,
            out, part_acc, part_m, part_l, part_e, flags, counters, stats,
            scale_log2, (phi or 0.0) * LOG2E, lo * LOG2E, hi * LOG2E, float(mass_tol),
            int(sliding_window or 0), num_splits,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=group, BLOCK_G=block_g, BLOCK_GR=block_gr, SPLIT_CHUNK=split_chunk,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n,
            UNIFIED=unified, IS_FALLBACK=is_fallback, FUSED_FALLBACK=unified and in_kernel_fallback,
            SINGLE_SPLIT=single,
            FUSED_REDUCE=fused_reduce, USE_DOT=use_dot, HAS_SLIDING=sliding_window is not None,
            DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_bf16_dot(q.dtype),
            MASS_CHECK=mass_check(q.dtype), TRIGGER_PDL=pdl_enabled(q.device),
            num_warps=num_warps, num_stages=num_stages,
        )
        if not single and not fused_reduce:
            paged_decode_reduce_kernel[(num_seqs, num_kv_heads)](
                part_acc, part_m, part_l, part_e, context_lens, out, flags, stats,
                (phi or 0.0) * LOG2E, lo * LOG2E, hi * LOG2E, float(mass_tol), num_splits,
                out.stride(0), out.stride(1), GROUP=group, BLOCK_G=block_gr, HEAD_DIM=head_dim, BLOCK_D=block_d,
                SPLIT_CHUNK=split_chunk, UNIFIED=unified, IS_FALLBACK=is_fallback, num_warps=4,
            )

    if phi is None:
        launch(unified=False, is_fallback=False)
    else:
        if not math.isfinite(phi):
            raise ValueError(f"decode attention: phi must be finite, got {phi}")
        launch(unified=True, is_fallback=False)
        if fallback and not in_kernel_fallback:
            launch(unified=False, is_fallback=True)
        if flags_out is not None:
            flags_out.append(flags)
    return out
