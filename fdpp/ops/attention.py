"""Attention ops: KV-cache writes and paged attention, dispatched to Triton or the PyTorch reference.

Backends (fdpp.ops.backend.attention_backend): "reference" (plain PyTorch, fp32 softmax, any device),
"triton" (asynchronized softmax with the layer's unified max phi and an exact fallback: rows whose
max leaves the safe window or whose P lost mass in the fp16/bf16 cast are recomputed, see
fdpp.kernels.attention_decode; the synchronized kernel when phi is None), "triton-sync" (always the synchronized online softmax).

Fallback statistics are kept in device tensors updated by the kernels themselves (no host sync on
the hot path, safe inside CUDA graphs); `fallback_stats()` reads them.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fdpp.kernels.device import capability
from fdpp.ops.backend import attention_backend

# Safe window (lo, hi) for s - phi, in nats, per KV dtype. A row is trusted when its max score m has
# lo < m - phi < hi AND the P that entered the dot with V lost at most MASS_TOL of the row's mass
# (fdpp.kernels.attention_decode: the kernels measure it per row); otherwise it is recomputed with the
# synchronized softmax in the same launch (decode) or a second, always-launched one (prefill).
# - fp16: P = e^{s-phi} is cast to fp16 for the tensor-core dot with V; fp16 overflows at e^{11.09}
#   and is subnormal below e^{-9.7} (absolute precision 6e-8): hi = 10.5 keeps P finite, lo = -8
#   keeps the row's largest P within 2 nats of the normal range.
# - bf16 / fp32: P has fp32's exponent range (e^{+-87}); +-50 leaves room for sums over long rows.
SAFE_WINDOWS: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (-8.0, 10.5),
    torch.bfloat16: (-50.0, 50.0),
    torch.float32: (-50.0, 50.0),
}

MAX_LAYERS_TRACKED = 512


def safe_window(dtype: torch.dtype) -> tuple[float, float]:
    """(lo, hi) of the trusted s - phi range for a model in `dtype`."""
    try:
        return SAFE_WINDOWS[dtype]
    except KeyError:
        raise TypeError(f"attention: no safe window for dtype {dtype}; use float16, bfloat16 or float32") from None


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built once per step by the model runner (see docs/ARCHITECTURE.md).

    is_prefill: some sequence of the step is a prefill chunk (else all decode: one query per sequence).
    cu_seqlens_q: `[num_seqs + 1]` int32 packed query offsets (prefill; may be None in decode).
    max_seqlen_q: largest q_len of the step (prefill).
    context_lens: `[num_seqs]` int32, KV tokens per sequence INCLUDING the new ones.
    block_tables: `[num_seqs, max_blocks_per_seq]` int32.
    slot_mapping: `[num_tokens]` int64, cache slot of each new token (-1: skip).
    max_context_len: largest context_lens entry (host int; fixes the decode split count).
    fresh_prefill: every sequence's queries are its whole context (no cached prefix, no earlier
    chunk; host bool): the step may take the TMA prefill kernel, which reads this step's own k/v.
    decode_num_splits: the decode kernel's split count (None: `choose_num_splits` for the batch; the
    model runner sets it for batches of unequal rows, see `balance_num_splits`).
    """
    is_prefill: bool
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1
    max_context_len: int = 0
    fresh_prefill: bool = False
    decode_num_splits: int | None = None
    prefill_num_splits: int | None = None  # set by the first prefill attention call of the step
    # A mixed step (decode rows first, then prefill chunks): the metadata of each part. Attention
    # runs each part through its own kernel; the fields above describe the whole step (cache writes).
    decode_part: AttentionMetadata | None = None
    prefill_part: AttentionMetadata | None = None
    # What every layer of one forward pass derives alike from the fields above (the reference decode's
    # gather indices and masks): a dict while `forward_pass` is open, else None (derived per call).
    memo: dict | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[AttentionMetadata]:
        """Memoize per-step derived tensors (`memoized`) for the block: one forward pass, during which the
        fields do not change. Closed after it, since a static step's metadata (fdpp.engine.cuda_graph) is
        reused with new contents by the next step."""
        parts = [m for m in (self, self.decode_part, self.prefill_part) if m is not None]
        for m in parts:
            m.memo = {}
        try:
            yield self
        finally:
            for m in parts:
                m.memo = None

    def memoized(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per forward pass under ``key`` (every call outside `forward_pass`)."""
        if self.memo is None:
            return build()
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = build()
        return value


# ------------------------------------------------------------------------------------------------
# Score observer (calibration)
# ------------------------------------------------------------------------------------------------

_score_observer: Callable[[int, torch.Tensor], None] | None = None


@contextlib.contextmanager
def observe_scores(callback: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While active, the reference attention calls `callback(layer_idx, scores)` once per sequence.

    scores: `[num_heads, q_len, kv_len]` float32, the scaled pre-softmax scores scale * q.k; entries
    a query cannot see (causal mask, sliding window) are -inf. Only the reference backend calls it,
    so run calibration under `use_backends(attention="reference")`. Does not nest.
    """
    global _score_observer
    if _score_observer is not None:
        raise RuntimeError("observe_scores: an observer is already installed (observers do not nest)")
    _score_observer = callback
    try:
        yield
    finally:
        _score_observer = None


# ------------------------------------------------------------------------------------------------
# Fallback statistics
# ------------------------------------------------------------------------------------------------

_stats: dict[str, torch.Tensor] = {}


def _stats_tensor(device: torch.device) -> torch.Tensor:
    """int64 `[MAX_LAYERS_TRACKED, 2]`: (rows checked, rows recomputed) per layer, on `device`."""
    key = str(device)
    t = _stats.get(key)
    if t is None:
        # NOTE: the engine runs under inference_mode; a tensor born there could not be reset later.
        with torch.inference_mode(False):
            t = torch.zeros(MAX_LAYERS_TRACKED, 2, dtype=torch.int64, device=device)
        _stats[key] = t
    return t


def fallback_stats() -> dict:
    """Rows checked by the unified-max kernels, rows recomputed by the fallback, and their ratio.

    A decode row is one (sequence, query head); a prefill row is one (query token, query head).
    Reads device counters (synchronizes): call it outside the hot path.
    """
    total = torch.zeros(MAX_LAYERS_TRACKED, 2, dtype=torch.int64)
    for t in _stats.values():
        total += t.cpu()
    checked = int(total[:, 0].sum())
    fell_back = int(total[:, 1].sum())
    per_layer = {i: {"checked": int(total[i, 0]), "fallback": int(total[i, 1])}
                 for i in range(MAX_LAYERS_TRACKED) if total[i, 0] > 0}
    return {
        "rows_checked": checked,
        "rows_fallback": fell_back,
        "rate": fell_back / checked if checked else 0.0,
        "per_layer": per_layer,
    }


def reset_fallback_stats() -> None:
    for t in _stats.values():
        t.zero_()


# ------------------------------------------------------------------------------------------------
# store_kv
# ------------------------------------------------------------------------------------------------

def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v `[num_tokens, num_kv_heads, head_dim]` into the caches at `slot_mapping` (-1: skip)."""
    if attention_backend(k.device) == "reference":
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    from fdpp.kernels.kv_cache import store_kv as store_kv_triton
    store_kv_triton(k, v, k_cache, v_cache, slot_mapping)


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """The cache write in plain PyTorch: one `index_copy_` per cache, of the tokens whose slot is not -1.

    When every slot is valid (any step but a padded one) the tokens are copied as they are: the boolean
    selection (a nonzero, two gathers) would cost this per-layer op about four times the copy itself."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        rows = valid.nonzero().squeeze(1)
        slots, k, v = slots.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows)
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
              scale: float, layer_idx: int, phi: float | None = None,
              sliding_window: int | None = None) -> torch.Tensor:
    """Paged attention of `q` `[num_tokens, num_heads, head_dim]` over the cache; returns q's shape.

    phi: the layer's calibrated unified max (None: synchronized softmax). The result never depends on
    phi, only the speed does (out-of-window rows are recomputed exactly).
    """
    if meta.decode_part is not None and meta.prefill_part is not None:
        # NOTE: a mixed step runs its decode rows through the split-KV decode kernel (full speed for
        # one query per sequence) and its chunks through the prefill kernel, instead of one prefill
        # launch where each one-token row would occupy a whole query tile.
        nd = meta.decode_part.num_seqs
        kw = dict(scale=scale, layer_idx=layer_idx, phi=phi, sliding_window=sliding_window)
        return torch.cat([attention(q[:nd], k_cache, v_cache, meta.decode_part, **kw),
                          attention(q[nd:], k_cache, v_cache, meta.prefill_part, **kw)])
    backend = attention_backend(q.device)
    if backend == "reference":
        return attention_reference(q, k_cache, v_cache, meta, scale=scale, layer_idx=layer_idx,
                                   sliding_window=sliding_window)
    if backend == "triton-sync":
        phi = None
    window = safe_window(q.dtype)
    stats = _stats_tensor(q.device)[min(layer_idx, MAX_LAYERS_TRACKED - 1)]
    if meta.is_prefill:
        from fdpp.kernels.attention_prefill import paged_prefill_attention
        if meta.cu_seqlens_q is None:
            raise ValueError("attention: prefill metadata needs cu_seqlens_q")
        # NOTE: only a fresh prefill takes the TMA kernel: it would compute a chunk with a cached
        # prefix (a later chunk of a long prompt, a prefix-cache hit) in its unsplit synchronized
        # fallback, slower than the paged kernel (split-KV over long contexts).
        if meta.prefill_num_splits is None:  # once per step, not once per layer
            meta.prefill_num_splits = prefill_splits(q, k_cache, meta)
        num_splits = meta.prefill_num_splits
        if meta.fresh_prefill and num_splits == 1:
            out = prefill_tma_dispatch(q, k_cache, v_cache, meta, scale=scale, phi=phi, window=window,
                                       sliding_window=sliding_window, stats=stats)
            if out is not None:
                return out
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
            scale=scale, max_seqlen_q=meta.max_seqlen_q, phi=phi, window=window,
            sliding_window=sliding_window, stats=stats, num_splits=num_splits)
    from fdpp.kernels.attention_decode import paged_decode_attention
    if q.shape[0] != meta.num_seqs:
        raise ValueError(f"attention: decode step has {q.shape[0]} query tokens but {meta.num_seqs} sequences")
    max_context_len = meta.max_context_len or int(k_cache.shape[1] * meta.block_tables.shape[1])
    return paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens,
        scale=scale, max_context_len=max_context_len, phi=phi, window=window,
        sliding_window=sliding_window, stats=stats, num_splits=meta.decode_num_splits)


def decode_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """The decode kernel's split count for a batch (`choose_num_splits` on this device's SMs)."""
    from fdpp.kernels.attention_decode import choose_num_splits
    from fdpp.kernels.device import num_sms
    return choose_num_splits(num_seqs, num_kv_heads, max_context_len, num_sms(device))


def balanced_decode_splits(context_lens: list[int], num_kv_heads: int, device: torch.device) -> int | None:
    """A split count for decode rows so unequal that the longest is the step's tail (`balance_num_splits`)
    when it is above the batch's own (`decode_splits`); else None (the batch's own)."""
    from fdpp.kernels.attention_decode import balance_num_splits
    from fdpp.kernels.device import num_sms
    want = balance_num_splits(context_lens, num_kv_heads, num_sms(device))
    if want is None or want <= decode_splits(len(context_lens), num_kv_heads, max(context_lens), device):
        return None
    return want


def prefill_splits(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> int:
    """Key splits for the paged prefill of `q` (split-KV for chunks over long contexts).

    FDPP_PREFILL_SPLITS=N forces N (1: never split; for tests and benchmarks); else on a CUDA device
    `choose_prefill_splits` from the grid (q tiles x heads x sequences), the SM count and
    meta.max_context_len: the step's longest context in an eager step, max_model_len in a captured
    mixed step (the split length is computed in the kernel from each tile's keys, so a split count
    fixed at capture is right for any context the graph sees; splits past a short context are empty
    and cheap). Off the GPU (Triton's interpreter) 1 unless forced."""
    forced = os.environ.get("FDPP_PREFILL_SPLITS", "")
    if forced:
        try:
            n = int(forced)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"FDPP_PREFILL_SPLITS must be an integer >= 1 (1: no split), got {forced!r}")
        return n
    if q.device.type != "cuda" or meta.cu_seqlens_q is None:
        return 1
    from fdpp.kernels.attention_prefill import choose_prefill_splits, prefill_block_m
    from fdpp.kernels.device import num_sms
    sms = num_sms(q.device)
    block_m = prefill_block_m(q.shape[-1], q.dtype, True)
    q_tiles = -(-max(1, meta.max_seqlen_q) // block_m)
    max_context = meta.max_context_len or int(k_cache.shape[1] * meta.block_tables.shape[1])
    return choose_prefill_splits(q_tiles, q.shape[1], int(meta.cu_seqlens_q.shape[0]) - 1, max_context, sms)


# Head dims whose Hopper TMA prefill config has been measured on an H200 (bench/sweep_prefill.py).
PREFILL_TMA_HEAD_DIMS = (128,)


def prefill_tma_enabled(q: torch.Tensor) -> bool:
    """Whether a prefill of `q` may use fdpp.kernels.attention_prefill_tma: a CUDA device of compute
    capability >= 9 (TMA), fp16/bf16, a measured head_dim, and not switched off (FDPP_PREFILL_TMA=0).
    On an H200 it is 1.29-1.41x the paged kernel (bench/sweep_prefill.py, 2026-12-03)."""
    return prefill_tma_available(q.device, q.dtype, int(q.shape[-1]))


def prefill_tma_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """``prefill_tma_enabled`` for a device, dtype and head_dim (no tensor needed)."""
    if os.environ.get("FDPP_PREFILL_TMA", "1") == "0" or device.type != "cuda":
        return False
    if dtype not in (torch.float16, torch.bfloat16) or head_dim not in PREFILL_TMA_HEAD_DIMS:
        return False
    return capability(device)[0] >= 9


def prefill_tma_dispatch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                         scale: float, phi: float | None, window: tuple[float, float], sliding_window: int | None,
                         stats: torch.Tensor, force: bool = False) -> torch.Tensor | None:
    """Prefill through the TMA kernel when it applies (see `prefill_tma_enabled`; force=True skips that
    test, for tests), else None (the caller runs the paged kernel).

    The kernel reads this step's k/v as contiguous `[num_tokens, num_kv_heads, head_dim]` tensors:
    they are gathered back from the cache through slot_mapping (the layer has just written them
    there; the rotary kernel rotates k only on its way into the cache): O(tokens) bytes against the
    O(tokens^2) attention. Sequences with a cached prefix (context_lens > query count) are detected
    in the kernel and computed by the paged fallback, so any prefill metadata gives the right result.
    """
    if not (force or prefill_tma_enabled(q)) or sliding_window is not None:
        return None
    slots = meta.slot_mapping
    if slots is None or slots.shape[0] != q.shape[0] or meta.cu_seqlens_q is None:
        return None
    from fdpp.kernels.attention_prefill_tma import prefill_attention_tma
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    # NOTE: a padding token (slot -1) reads slot 0; its query row is not one a sequence attends from.
    idx = slots.clamp_min(0)
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, idx)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, idx)
    if q.stride(2) != 1 or q.stride(1) != head_dim or (q.stride(0) * q.element_size()) % 16 != 0:
        q = q.contiguous()
    return prefill_attention_tma(
        q, k, v, meta.cu_seqlens_q, meta.context_lens, scale=scale, max_seqlen_q=meta.max_seqlen_q,
        k_cache=k_cache, v_cache=v_cache, block_tables=meta.block_tables, phi=phi, window=window, stats=stats)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache: `[length, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(num_blocks * block_size, *cache.shape[2:])[:length]


@dataclass(frozen=True)
class DecodePlan:
    """What the batched reference decode of one step shares across layers (`decode_plan`).

    blocks: `[num_seqs * num_blocks]` int64 cache blocks to gather, row by row (entries past a sequence's
    table are clamped to block 0: they lie past its end, so they are hidden).
    hidden: `[num_seqs, 1, 1, max_len]` bool, the gathered slots a sequence's query may not see (past its
    end, before its sliding window); None when it sees them all (no mask, no zeroed V).
    empty: `[num_seqs, 1, 1]` bool, the rows with no context (graph padding); None when there are none.
    """
    num_blocks: int
    max_len: int
    blocks: torch.Tensor
    hidden: torch.Tensor | None
    empty: torch.Tensor | None


def decode_plan(meta: AttentionMetadata, block_size: int, sliding_window: int | None) -> DecodePlan:
    """The step's `DecodePlan` for caches of `block_size` (memoized per forward pass: one per window)."""
    return meta.memoized(("decode_plan", block_size, sliding_window),
                         lambda: _build_decode_plan(meta, block_size, sliding_window))


def _build_decode_plan(meta: AttentionMetadata, block_size: int, sliding_window: int | None) -> DecodePlan:
    ctx = meta.context_lens.to(torch.int64)
    max_len = int(ctx.max())
    num_blocks = -(-max_len // block_size)
    blocks = meta.block_tables[:, :num_blocks].long().clamp_min(0).reshape(-1)
    pos = torch.arange(max_len, device=ctx.device)
    visible = pos[None, :] < ctx[:, None]  # [B, L]
    if sliding_window is not None:
        visible &= pos[None, :] > ctx[:, None] - 1 - sliding_window
    hidden = None if bool(visible.all()) else ~visible[:, None, None, :]
    empty = ctx == 0
    return DecodePlan(num_blocks, max_len, blocks, hidden, empty[:, None, None] if bool(empty.any()) else None)


def _decode_reference_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float, sliding_window: int | None,
                              compute_dtype: torch.dtype) -> torch.Tensor:
    """Decode (one query per sequence) for the whole batch at once: one gather, two batched products.

    The same math as the per-sequence loop of `attention_reference` (masked softmax in compute_dtype);
    what does not depend on the layer (gather indices, masks) comes from the step's `decode_plan`, and the
    masking is skipped where nothing is hidden (a batch of equal contexts with no window cut, as one
    sequence's decode): this path runs once per layer and step of every CPU decode."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    plan = decode_plan(meta, block_size, sliding_window)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B, Hkv, L, D]
        rows = cache.index_select(0, plan.blocks).view(num_seqs, plan.num_blocks * block_size, num_kv_heads, head_dim)
        return rows[:, :plan.max_len].to(compute_dtype).transpose(1, 2)

    k, v = gather(k_cache), gather(v_cache)
    qg = q.to(compute_dtype).view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(2, 3)).mul_(scale)  # [B, Hkv, G, L]
    if plan.hidden is not None:
        scores.masked_fill_(plan.hidden, float("-inf"))
        # NOTE: slots past a sequence's end were gathered too and may hold anything (NaN included):
        # zero them, since 0 * NaN would poison the weighted sum.
        v = v.masked_fill(plan.hidden.transpose(2, 3), 0.0)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, Hkv, G, D]
    if plan.empty is not None:
        # a sequence with no context (graph padding) has all -inf scores: give it zeros, not NaN
        out.masked_fill_(plan.empty[..., None], 0.0)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, *, scale: float, layer_idx: int = 0,
                        sliding_window: int | None = None,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-PyTorch paged attention (gather K/V through the block table, softmax in compute_dtype)."""
    if not meta.is_prefill and _score_observer is None:
        return _decode_reference_batched(q, k_cache, v_cache, meta, scale, sliding_window, compute_dtype)
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    context_lens = meta.context_lens.tolist()
    if meta.is_prefill:
        cu = meta.cu_seqlens_q.tolist()
    else:
        cu = list(range(len(context_lens) + 1))
    out = torch.zeros_like(q)
    for i, ctx_len in enumerate(context_lens):
        q_i = q[cu[i]:cu[i + 1]].to(compute_dtype)  # [q_len, num_heads, head_dim]
        q_len = q_i.shape[0]
        if q_len == 0 or ctx_len == 0:
            continue
        k = gather_kv(k_cache, meta.block_tables[i], ctx_len).to(compute_dtype)
        v = gather_kv(v_cache, meta.block_tables[i], ctx_len).to(compute_dtype)
        k = k.repeat_interleave(group, dim=1)  # [ctx_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_i, k) * scale  # [num_heads, q_len, ctx_len]
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        k_pos = torch.arange(ctx_len, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        if _score_observer is not None:
            _score_observer(layer_idx, scores.float())
        probs = torch.softmax(scores, dim=-1)
        out[cu[i]:cu[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
