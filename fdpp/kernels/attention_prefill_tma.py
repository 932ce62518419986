"""Causal varlen prefill attention for a FRESH prompt, read through TMA tensor descriptors (Hopper).

The common prefill step: a sequence with no cached prefix, so its keys are exactly this step's own
k/v. Then q, k and v are contiguous `[num_tokens, heads, head_dim]` tensors packed by cu_seqlens (no
paged gather) and every tile is a rectangular box of a 2-D `[num_tokens, heads * head_dim]` view:
one TMA copy (`tl.make_tensor_descriptor`) lands it in shared memory, where wgmma reads it. Sequence
i owns rows cu_seqlens[i]:cu_seqlens[i+1]; the query at position p sees keys 0..p of its sequence.

Grid: (query tile, query head, sequence), longest tiles first (`reverse`: causal tiles near the end
of a prompt have the most keys; launching them first shortens the tail). KV tiles that precede the
query tile entirely run without the causal mask; only the diagonal tiles build it (`split_causal`).

Unified max (phi given, FlashDecoding++): P = 2^(s * scale * log2e - phi * log2e), no running max,
no rescale of the accumulator, one division at the end. Per score element the unified loop does one
FFMA + one EX2 + the row sum of P, the cast of P for the dot, and (fp16 only) the row sum of the cast
P; the row max is one FMNMX on the raw score (the window test is done on it once at the end).

Exactness guarantee (the same test as fdpp.kernels.attention_prefill): a query row stays on the fast
path only if its max m has lo < m - phi < hi, the P that entered the dot lost at most MASS_TOL * l of
the row's mass in l1 norm, and l > 0, written so that NaN fails it. A query tile with a failing row is
flagged and recomputed by an always-launched, graph-safe second launch: the synchronized kernel of
fdpp.kernels.attention_prefill over the paged cache (P in fp32 for the dot with V), whose programs
exit at once for unflagged tiles. A sequence whose context is longer than its queries (cached prefix,
chunked prefill) is not this kernel's case: all its tiles are flagged and the paged kernel does them,
so the result is right for any metadata, only slower.

Mass check without a per-element |P - cast(P)| (mass_mode "rtz", the default for fp16): P is cast
with round-toward-zero, so cast(P) <= P for every element (P >= 0) and
    sum_j |P_j - cast(P_j)| = sum_j P_j - sum_j cast(P_j) = l - l_c
exactly (up to the fp32 summation rounding, ~N * 2^-24 relative, far below MASS_TOL). So the l1 test
needs only a second row sum (l_c of the cast tile, upcast to fp32), not a subtract, an abs and a sum.
A plain signed sum with round-to-nearest would NOT be equivalent: rounding errors of both signs cancel
while an adversarial V can correlate with them. Rounding toward zero moves each P by < 2^-10
relative (fp16), so rounding alone gives l - l_c < 2^-10 l < MASS_TOL = 2^-9 l and never flags a row.
The output is divided by l_c (`norm_lc`, default): the weights cast(P)/l_c then sum to one, so
RTZ's downward bias cancels instead of shrinking the output by up to 2^-10 (interpreter, random fp16
rows: relative error 2.7e-4 with l_c, 5.2e-4 with l, 3.1e-4 for the paged kernel's round-to-nearest
with l). The price: the weights' l1 distance to the exact softmax is bounded by
2 (l - l_c) / l_c <= 2 MASS_TOL / (1 - MASS_TOL), twice the paged kernel's MASS_TOL bound on
sum |P - cast P| / l; norm_lc=False divides by l and has exactly that bound. mass_mode "abs" is the paged kernel's test
(round to nearest, sum |P - cast(P)|), kept for the cost comparison; "off" skips the test (bf16:
by construction, see fdpp.kernels.attention_decode.mass_check).

Window on the row sum instead of the row max (`window_on="sum"`, a variant: no max per element).
The max window has two jobs, both also done by l = sum_j e^(s_j - phi) (l >= every P): keep the cast
P finite and keep the mass out of the cast's underflow. fp16 with the mass test: a P that overflows
the cast is clamped to 65504 (RTZ) or becomes inf (round to nearest) and fails the l1 test like any
lost mass, lost low mass fails it directly, and l < inf keeps fp32 finite, so the test is l1 <=
MASS_TOL * l, 0 < l < inf: the same error bound, and rows are flagged only where the bound is at
risk. bf16 (no mass test): e^lo < l < e^hi gives bf16's by-construction argument (mass_check: l >
e^lo, every P < e^hi) directly. Rows with many keys near phi + hi are flagged under a window on l
but not under the max window, so hi on l is only used for bf16 (+-50 nats: never reached).

Synchronized mode (phi None): the online softmax (running max, rescale per tile) on the same loads,
for the unified-vs-synchronized comparison; only prefix sequences are flagged there.

Kernel-side variants are constexpr / launch kwargs so one GPU run can sweep them: use_tma (True or
"device": descriptors built in the kernel, `tl.make_tensor_descriptor`, scratch from
`triton.set_allocator`; "host": `TensorDescriptor` kernel parameters built by the wrapper; False:
pointer loads), block_m, block_n, num_warps, num_stages (tl.range pipelining depth), warp_specialize,
mass_mode, split_causal, overlap (QK^T of the next tile issued before the softmax of this one),
reverse. GQA: the kv head of query head h is h // GROUP; the query heads of a group are adjacent
programs and re-read the same K/V tiles from L2. Packing them into the M dimension is not done: a
128-row tile of one head already reuses each K/V tile 128 times, the same arithmetic intensity as
32 tokens x 4 heads, and packing would shorten the causal band per tile without saving FLOPs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fdpp.kernels.attention_decode import MASS_TOL, mass_check
from fdpp.kernels.attention_prefill import paged_prefill_kernel
from fdpp.kernels.device import interpreting, upcast_bf16_dot

LOG2E = 1.4426950408889634

MASS_MODES = {"off": 0, "abs": 1, "rtz": 2}


@triton.jit
def _load_rows(desc, ptr, row0, start, kv_len, kvh, offs_n, offs_d, stride_t,
               HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Key/value rows [start, start + BLOCK_N) of the sequence whose first row is row0: [BLOCK_N, HEAD_DIM]."""
    if USE_TMA:
        x = desc.load([row0 + start, kvh * HEAD_DIM])
    else:
        tok = start + offs_n
        rows = (row0 + tok).to(tl.int64)
        x = tl.load(ptr + rows[:, None] * stride_t + kvh * HEAD_DIM + offs_d[None, :],
                    mask=(tok < kv_len)[:, None], other=0.0)
    return x


@triton.jit
def _scores(q, k, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _update(
    acc, l_i, m_i, c_i, s, v, start, kv_len, q_pos, offs_n, scale_log2, phi_log2,
    USE_TMA: tl.constexpr, MASKED: tl.constexpr, UNIFIED: tl.constexpr, MASS_MODE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Fold the raw scores s of keys [start, start + BLOCK_N) and their values v into the row state.

    Unified: m_i is the max of the RAW scores, c_i the l1 mass measure (l_c for "rtz", sum |P - cast P|
    for "abs"). Synchronized: m_i is the running max in log2 units."""
    if MASKED:
        tok = start + offs_n
        s = tl.where((tok[None, :] <= q_pos[:, None]) & (tok < kv_len)[None, :], s, float("-inf"))
        if USE_TMA:
            # NOTE: rows past the sequence belong to the next one (or are TMA's zero fill): P is 0
            # there, but 0 * (NaN or inf in a neighbour's V) would leak into this sequence.
            v = tl.where((tok < kv_len)[:, None], v, 0.0)
    if UNIFIED:
        if UNIFIED == 1:  # window on the row max (else on l, at the end)
            m_i = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s * scale_log2 - phi_log2)
        l_i += tl.sum(p, 1)
        if MASS_MODE == 2:
            p_in = p.to(v.dtype, fp_downcast_rounding="rtz")
            c_i += tl.sum(p_in.to(tl.float32), 1)
        elif MASS_MODE == 1:
            p_in = p.to(v.dtype)
            c_i += tl.sum(tl.abs(p - p_in.to(tl.float32)), 1)
        else:
            p_in = p.to(v.dtype)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * scale_log2 - m_new[:, None])
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p_in = p.to(v.dtype)
    if UPCAST_DOT:
        acc = tl.dot(p_in.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p_in, v, acc)
    return acc, l_i, m_i, c_i


@triton.jit
def _tile(
    acc, l_i, m_i, c_i, q, k_desc, v_desc, k_ptr, v_ptr, row0, start, kv_len, kvh, q_pos,
    offs_n, offs_d, stride_kt, stride_vt, scale_log2, phi_log2,
    HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr,
    UNIFIED: tl.constexpr, MASS_MODE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Load, score and fold one KV tile [start, start + BLOCK_N)."""
    k = _load_rows(k_desc, k_ptr, row0, start, kv_len, kvh, offs_n, offs_d, stride_kt, HEAD_DIM, USE_TMA)
    s = _scores(q, k, UPCAST_DOT)
    v = _load_rows(v_desc, v_ptr, row0, start, kv_len, kvh, offs_n, offs_d, stride_vt, HEAD_DIM, USE_TMA)
    return _update(acc, l_i, m_i, c_i, s, v, start, kv_len, q_pos, offs_n, scale_log2, phi_log2,
                   USE_TMA, MASKED, UNIFIED, MASS_MODE, UPCAST_DOT)


@triton.jit(do_not_specialize=["max_q_tiles", "num_tokens", "num_heads", "num_kv_heads"])
def prefill_tma_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr, flags_ptr, stats_ptr,
    scale_log2, phi_log2, lo_log2, hi_log2, mass_tol, num_tokens, max_q_tiles, num_heads, num_kv_heads,
    stride_qt, stride_kt, stride_vt, stride_ot,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIFIED: tl.constexpr, USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr, MASS_MODE: tl.constexpr,
    NORM_LC: tl.constexpr,
    SPLIT_CAUSAL: tl.constexpr, OVERLAP: tl.constexpr, REVERSE: tl.constexpr,
    LOOP_STAGES: tl.constexpr, WARP_SPEC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    if REVERSE:
        tile_m = max_q_tiles - 1 - tl.program_id(0)
    else:
        tile_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    row0 = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - row0
    if tile_m * BLOCK_M >= q_len:
        return
    flag_idx = (seq * num_heads + head) * max_q_tiles + tile_m
    if tl.load(context_lens_ptr + seq) != q_len:
        # A cached prefix: the keys are not this step's k/v. The paged fallback does the tile.
        tl.store(flags_ptr + flag_idx, 1)
        return
    kvh = head // (num_heads // num_kv_heads)
    tile_first = tile_m * BLOCK_M
    offs_m = tile_first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len

    if HOST_DESC:  # q_ptr, k_ptr, v_ptr are host-built TensorDescriptors (kernel parameters)
        k_desc = k_ptr
        v_desc = v_ptr
        q = q_ptr.load([row0 + tile_first, head * HEAD_DIM])
    elif USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[num_tokens, num_heads * HEAD_DIM], strides=[stride_qt, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[num_tokens, num_kv_heads * HEAD_DIM],
                                           strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[num_tokens, num_kv_heads * HEAD_DIM],
                                           strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        q = q_desc.load([row0 + tile_first, head * HEAD_DIM])
    else:
        k_desc = k_ptr
        v_desc = v_ptr
        q = tl.load(q_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_qt + head * HEAD_DIM + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0)

    kv_hi = tl.minimum(tile_first + BLOCK_M, q_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if SPLIT_CAUSAL:
        full_end = (tile_first // BLOCK_N) * BLOCK_N  # keys before it precede every query of the tile
        if OVERLAP:
            # FA3-style intra-warpgroup overlap: QK^T of tile j + 1 is issued before the softmax of
            # tile j, so the tensor cores work while exp2 runs (one more score tile in registers).
            if full_end > 0:
                k = _load_rows(k_desc, k_ptr, row0, 0, q_len, kvh, offs_n, offs_d, stride_kt, HEAD_DIM, USE_TMA)
                s = _scores(q, k, UPCAST_DOT)
                for start in tl.range(0, full_end - BLOCK_N, BLOCK_N, num_stages=LOOP_STAGES,
                                      warp_specialize=WARP_SPEC):
                    k = _load_rows(k_desc, k_ptr, row0, start + BLOCK_N, q_len, kvh, offs_n, offs_d, stride_kt,
                                   HEAD_DIM, USE_TMA)
                    s_next = _scores(q, k, UPCAST_DOT)
                    v = _load_rows(v_desc, v_ptr, row0, start, q_len, kvh, offs_n, offs_d, stride_vt,
                                   HEAD_DIM, USE_TMA)
                    acc, l_i, m_i, c_i = _update(acc, l_i, m_i, c_i, s, v, start, q_len, offs_m, offs_n,
                                                 scale_log2, phi_log2, USE_TMA, False, UNIFIED, MASS_MODE,
                                                 UPCAST_DOT)
                    s = s_next
                v = _load_rows(v_desc, v_ptr, row0, full_end - BLOCK_N, q_len, kvh, offs_n, offs_d, stride_vt,
                               HEAD_DIM, USE_TMA)
                acc, l_i, m_i, c_i = _update(acc, l_i, m_i, c_i, s, v, full_end - BLOCK_N, q_len, offs_m, offs_n,
                                             scale_log2, phi_log2, USE_TMA, False, UNIFIED, MASS_MODE, UPCAST_DOT)
        else:
            for start in tl.range(0, full_end, BLOCK_N, num_stages=LOOP_STAGES, warp_specialize=WARP_SPEC):
                acc, l_i, m_i, c_i = _tile(
                    acc, l_i, m_i, c_i, q, k_desc, v_desc, k_ptr, v_ptr, row0, start, q_len, kvh, offs_m,
                    offs_n, offs_d, stride_kt, stride_vt, scale_log2, phi_log2,
                    HEAD_DIM, USE_TMA, False, UNIFIED, MASS_MODE, UPCAST_DOT)
    else:
        full_end = 0
    for start in tl.range(full_end, kv_hi, BLOCK_N, num_stages=LOOP_STAGES, warp_specialize=WARP_SPEC):
        acc, l_i, m_i, c_i = _tile(
            acc, l_i, m_i, c_i, q, k_desc, v_desc, k_ptr, v_ptr, row0, start, q_len, kvh, offs_m,
            offs_n, offs_d, stride_kt, stride_vt, scale_log2, phi_log2,
            HEAD_DIM, USE_TMA, True, UNIFIED, MASS_MODE, UPCAST_DOT)

    if UNIFIED and MASS_MODE == 2 and NORM_LC:
        out = acc / c_i[:, None]
    else:
        out = acc / l_i[:, None]
    tl.store(out_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_ot + head * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    if UNIFIED:
        # NOTE: written as "all conditions hold" so any NaN (inf/NaN input, inf - inf) fails it.
        if UNIFIED == 1:
            rel = m_i * scale_log2 - phi_log2  # m_i: max raw score (scale > 0)
            ok = (rel > lo_log2) & (rel < hi_log2) & (l_i > 0.0)
        elif MASS_MODE != 0:
            ok = (l_i > 0.0) & (l_i < float("inf"))  # fp16: the mass test covers both window edges
        else:
            ok = (l_i > tl.exp2(lo_log2)) & (l_i < tl.exp2(hi_log2))
        if MASS_MODE == 2:
            ok = ok & (l_i - c_i <= mass_tol * l_i)
        elif MASS_MODE == 1:
            ok = ok & (c_i <= mass_tol * l_i)
        bad = (ok == 0) & mask_m
        is_bad = tl.max(bad.to(tl.int32), 0)
        tl.store(flags_ptr + flag_idx, is_bad)
        num_rows = tl.minimum(q_len - tile_first, BLOCK_M).to(tl.int64)
        tl.atomic_add(stats_ptr, num_rows)
        if is_bad > 0:
            tl.atomic_add(stats_ptr + 1, num_rows)
    else:
        tl.store(flags_ptr + flag_idx, 0)


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def _set_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need global scratch from Triton's allocator. Set on every call:
    Triton keeps it per thread (a ContextVar), and the engine may launch from another thread."""

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)


def default_config(head_dim: int, dtype: torch.dtype, on_gpu: bool, max_seqlen_q: int = 0) -> dict:
    """Launch kwargs of `prefill_attention_tma` when the caller gives none (GPU: Hopper defaults).

    head_dim 128 on an H200 (bench/sweep_prefill.py, 2026-12-03, fp16 and bf16, 32/32 and 32/8): up to
    4k queries per sequence 64x64 tiles with 4 warps and device-side descriptors win (1k: 0.67-0.68x
    cuDNN, 4k: 0.80-0.81x); beyond, 128x64 tiles with 8 warps, host descriptors, the next tile's
    QK^T issued before this tile's softmax and the window test on l (8k: 0.83-0.87x, 16k: 0.83-0.90x).
    """
    if not on_gpu:
        return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1, "use_tma": True,
                "warp_specialize": False, "overlap": False, "window_on": "max"}
    if head_dim == 128 and max_seqlen_q <= 4096:
        return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "use_tma": True,
                "warp_specialize": False, "overlap": False, "window_on": "max"}
    if head_dim == 128:
        return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "use_tma": "host",
                "warp_specialize": False, "overlap": True, "window_on": "sum"}
    if head_dim <= 64:
        return {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "use_tma": True,
                "warp_specialize": False, "overlap": False, "window_on": "max"}
    return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2,
            "use_tma": True, "warp_specialize": False, "overlap": False, "window_on": "max"}


def check_fresh_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error unless q, k, v are `[num_tokens, heads, head_dim]` this kernel can read."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"prefill_attention_tma: q must be [T, Hq, D] and k, v [T, Hkv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"prefill_attention_tma: q/k/v must share one of {_SUPPORTED_DTYPES}; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype} (float32 models use fdpp.kernels.attention_prefill)")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or hq % k.shape[1] != 0:
        raise ValueError(f"prefill_attention_tma: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         "(same tokens and head_dim, Hq a multiple of Hkv)")
    if d not in (64, 128, 256):
        raise ValueError(f"prefill_attention_tma: head_dim {d} not in (64, 128, 256); use the paged kernel")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # NOTE: the 2-D [T, H * D] view of each tensor is what the TMA descriptor reads.
        if x.stride(2) != 1 or x.stride(1) != d or (x.stride(0) * x.element_size()) % 16 != 0 \
                or x.data_ptr() % 16 != 0:
            raise ValueError(f"prefill_attention_tma: {name} must have contiguous heads and head_dim, a token "
                             f"stride that is a multiple of 16 bytes and a 16-byte aligned base; got strides "
                             f"{tuple(x.stride())} (call .contiguous())")


def prefill_attention_tma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    max_seqlen_q: int,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    phi: float | None = None,
    window: tuple[float, float] = (-8.0, 10.5),
    fallback: bool = True,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | str | None = None,
    warp_specialize: bool | None = None,
    mass_mode: str | None = None,
    norm_lc: bool = True,
    window_on: str | None = None,
    split_causal: bool = True,
    overlap: bool | None = None,
    reverse: bool = True,
    mass_tol: float | None = None,
    flags_out: list | None = None,
) -> torch.Tensor:
    """Causal varlen prefill of a fresh prompt from contiguous q `[T, Hq, D]`, k, v `[T, Hkv, D]`.

    cu_seqlens_q: int32 `[num_seqs + 1]`; context_lens: int32 `[num_seqs]` (a sequence with
    context_lens != its query count has a cached prefix: the paged fallback computes it).
    phi: unified max (None: synchronized online softmax). Flagged tiles (window, mass, l > 0, NaN,
    prefix) are recomputed by the paged synchronized kernel over k_cache/v_cache/block_tables (which
    must hold this step's k/v, as the engine's cache does after its write) when fallback=True; with
    fallback=False (benchmarks) they keep the fast path's value and k_cache may be None.
    stats: int64 `[2]` device tensor, += (query rows checked, query rows flagged) per head (unified).
    The keyword knobs (block_m ... reverse, window_on) select kernel variants; None picks `default_config`
    (by head_dim and max_seqlen_q).
    window_on: "max" (the paged kernel's window on the row max) or "sum" (on l; see the module doc).
    """
    check_fresh_inputs(q, k, v)
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("context_lens", context_lens)):
        if x.dtype != torch.int32 or not x.is_contiguous():
            raise TypeError(f"prefill_attention_tma: {name} must be a contiguous int32 tensor, got {x.dtype}")
    if fallback and (k_cache is None or v_cache is None or block_tables is None):
        raise ValueError("prefill_attention_tma: fallback=True needs k_cache, v_cache and block_tables "
                         "(the paged cache holding this step's k/v)")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if not scale > 0:
        raise ValueError(f"prefill_attention_tma: scale must be > 0 (the row max is tracked on raw scores), got {scale}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs <= 0:
        return out
    cfg = default_config(head_dim, q.dtype, q.device.type == "cuda", int(max_seqlen_q))
    window_on = cfg["window_on"] if window_on is None else window_on
    overlap = cfg["overlap"] if overlap is None else overlap
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    use_tma = cfg["use_tma"] if use_tma is None else use_tma
    warp_specialize = cfg["warp_specialize"] if warp_specialize is None else warp_specialize
    if block_m % block_n != 0 and split_causal:
        raise ValueError(f"prefill_attention_tma: split_causal needs block_n ({block_n}) to divide block_m ({block_m})")
    if mass_mode is None:
        mass_mode = "rtz" if mass_check(q.dtype) else "off"
    if window_on not in ("max", "sum"):
        raise ValueError(f"prefill_attention_tma: window_on must be 'max' or 'sum', got {window_on!r}")
    if mass_mode not in MASS_MODES:
        raise ValueError(f"prefill_attention_tma: mass_mode {mass_mode!r} not in {sorted(MASS_MODES)}")
    if mass_mode == "off" and mass_check(q.dtype) and phi is not None and fallback:
        raise ValueError("prefill_attention_tma: fp16 needs the mass check for the exactness guarantee; "
                         "mass_mode='off' only with fallback=False (cost measurements)")
    if use_tma not in (True, False, "device", "host"):
        raise ValueError(f"prefill_attention_tma: use_tma must be True/'device', 'host' or False, got {use_tma!r}")
    host_desc = use_tma == "host"
    if use_tma and not host_desc:
        _set_allocator(q.device)
    max_q_tiles = triton.cdiv(max(1, int(max_seqlen_q)), block_m)
    if stats is None:
        stats = torch.zeros(2, dtype=torch.int64, device=q.device)
    flags = torch.empty(num_seqs * num_heads * max_q_tiles, dtype=torch.int32, device=q.device)
    if phi is not None and not math.isfinite(phi):
        raise ValueError(f"prefill_attention_tma: phi must be finite, got {phi}")
    lo, hi = window
    if mass_tol is None:
        mass_tol = MASS_TOL[q.dtype]
    grid = (max_q_tiles, num_heads, num_seqs)
    q_arg, k_arg, v_arg = q, k, v
    if host_desc:
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
            return TensorDescriptor(x, [num_tokens, x.shape[1] * head_dim], [x.stride(0), 1], [rows, head_dim])
        q_arg, k_arg, v_arg = desc(q, block_m), desc(k, block_n), desc(v, block_n)
    prefill_tma_kernel[grid](
        q_arg, k_arg, v_arg, cu_seqlens_q, context_lens, out, flags, stats,
        float(scale) * LOG2E, (phi or 0.0) * LOG2E, lo * LOG2E, hi * LOG2E, float(mass_tol), num_tokens,
        max_q_tiles, num_heads, num_kv_heads, q.stride(0), k.stride(0), v.stride(0), out.stride(0),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        UNIFIED=0 if phi is None else (1 if window_on == "max" else 2), USE_TMA=bool(use_tma),
        HOST_DESC=host_desc, MASS_MODE=MASS_MODES[mass_mode], NORM_LC=norm_lc,
        SPLIT_CAUSAL=split_causal, OVERLAP=overlap, REVERSE=reverse,
        LOOP_STAGES=None if interpreting() else num_stages, WARP_SPEC=warp_specialize,
        UPCAST_DOT=upcast_bf16_dot(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if fallback:
        block_size = k_cache.shape[1]
        paged_prefill_kernel[grid](
            q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out, flags, stats,
            float(scale) * LOG2E, 0.0, lo * LOG2E, hi * LOG2E, float(mass_tol), 0, max_q_tiles,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=head_dim,
            BLOCK_M=block_m, BLOCK_N=min(64, block_n) if q.device.type == "cuda" else block_n,
            BLOCK_SIZE=block_size, UNIFIED=False, IS_FALLBACK=True, HAS_SLIDING=False,
            DOT_PRECISION="tf32", UPCAST_DOT=upcast_bf16_dot(q.dtype), MASS_CHECK=False,
            num_warps=8 if q.device.type == "cuda" and block_m >= 128 else 4, num_stages=2,
        )
    if flags_out is not None:
        flags_out.append(flags.view(num_seqs, num_heads, max_q_tiles))
    return out
