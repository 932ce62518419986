"""CUDA graphs of the model runner: static inputs, the decode / mixed / prefill steps over them, and their
capture. A captured graph replays fixed kernels over fixed buffers, so each kind of step has padded static
inputs (``_GraphInputs``) and a static step function (``mixed_step``, ``prefill_step``; the decode step is
the plain forward), runnable eagerly too: the CPU tests drive the static steps that way.

``StaticSteps`` is a part of ``fdpp.engine.model_runner.ModelRunner``: it uses the runner's model, backends,
device, block size, KV cache, ``_slots``, ``_scatter_device_tokens`` and ``decode_splits``."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fdpp.engine.scheduler import ScheduledBatch
from fdpp.engine.sequence import Sequence
from fdpp.layers.context import forward_context
from fdpp.ops.attention import AttentionMetadata, decode_splits, prefill_tma_available

if TYPE_CHECKING:
    from fdpp.engine.model_runner import DeviceTokens


def table_width(num_blocks: int) -> int:
    """A block table's width (the kernels' row stride): ``num_blocks`` rounded up to a multiple of 16, for
    eager steps and graph inputs alike, so that both see one Triton specialization class."""
    return -(-num_blocks // 16) * 16


class _GraphInputs:
    """The static device inputs a captured graph reads, filled through pinned staging buffers.

    ``long``: ``[3, num_tokens]`` int64 (token ids, positions, cache slots); ``ints``: ``[num_ints]``
    int32 (context lengths first, then whatever else the graph reads); ``tables``: ``[num_seqs,
    max_blocks]`` int32 block tables. A step fills the host arrays of ``host()`` and calls ``upload``:
    one host->device copy per buffer.
    """

    def __init__(self, num_tokens: int, num_ints: int, num_seqs: int, max_blocks: int,
                 device: torch.device) -> None:
        self.long = torch.zeros(3, num_tokens, dtype=torch.int64, device=device)
        self.long[2].fill_(-1)
        self.ids, self.pos, self.slots = self.long[0], self.long[1], self.long[2]
        self.ints = torch.zeros(num_ints, dtype=torch.int32, device=device)
        # NOTE: the width (the kernels' block-table stride) is a multiple of 16, as the eager steps' tables
        # are (`_block_table_tensor`): Triton specializes on the stride's divisibility by 16, so with
        # max_model_len's own block count (1028 for 16448) a variant compiled at capture could not serve an
        # eager step. (Suspected source of the paged_decode_kernel compile seen 1.3 s before the long prompt
        # in bench_prefix itl on an H200, 2026-12-04; not re-measured yet.)
        max_blocks = table_width(max_blocks)
        self.tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device)
        # NOTE: two sets of pinned staging buffers, used in turn: with async scheduling step t+1's
        # inputs are written while step t's host->device copies may still be queued; the set of
        # step t-1 is free again because the host waited on step t-1's event before launching t+1.
        pin = device.type == "cuda"
        self._staging = [tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=pin)
                               for t in (self.long, self.ints, self.tables)) for _ in range(2)]
        self._turn = 0

    def host(self) -> tuple:
        """The next staging set as numpy arrays ``(long, ints, tables)``, to fill before ``upload``."""
        self._current = self._staging[self._turn % 2]
        self._turn += 1
        return tuple(t.numpy() for t in self._current)

    def upload(self, num_tokens: int, num_ints: int, num_rows: int, width: int) -> None:
        """Copy the first ``num_tokens`` columns of ``long``, ``num_ints`` ints and ``num_rows`` x
        ``width`` block-table entries of the staging set last returned by ``host()`` to the device."""
        h_long, h_ints, h_tables = self._current
        self.long[:, :num_tokens].copy_(h_long[:, :num_tokens], non_blocking=True)
        self.ints[:num_ints].copy_(h_ints[:num_ints], non_blocking=True)
        self.tables[:num_rows, :width].copy_(h_tables[:num_rows, :width], non_blocking=True)


# Mixed graphs are captured for the decode buckets up to this many rows (capture time and memory).
MAX_MIXED_GRAPH_BATCH = 64

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def graph_bucket_sizes(max_batch_size: int) -> list[int]:
    """The decode graph buckets for at most ``max_batch_size`` rows: GRAPH_BUCKETS up to it, and
    ``max_batch_size`` itself as the last, so every decode step of the engine replays a graph. (Without
    it, a 33-row engine's full batches ran eagerly: host-bound 22-28 ms steps against 6.3 ms, and a kernel
    variant compiled in the middle of serving; bench_prefix.py itl on an H200, 2026-12-03.)"""
    sizes = [b for b in GRAPH_BUCKETS if b <= max_batch_size]
    if max_batch_size > 0 and (not sizes or sizes[-1] != max_batch_size):
        sizes.append(max_batch_size)
    return sizes
# Prefill graphs (one prompt chunk, no decode rows, padded to the next of these token counts): an eager
# batch-1 prefill is host-bound up to about 1k tokens (Llama-2-7B on an H200, 2026-12-04: 21-23 ms of host
# time whatever the length; synchronized 22.7 ms at 128 tokens, ~5 ms of it device work, and 26.1 ms at
# 1024, of an estimated ~20 ms of device work; bench/ttft_trace.py), while a padded replay costs the device
# work of its bucket: at most 1/4 more than the prompt's above 64 tokens (a faster host than those makes an
# eager step device-bound sooner, so the padding is kept small where the device work is large). Multiples
# of 16: one Triton specialization.
PREFILL_GRAPH_TOKENS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


# FDPP_PREFILL_GRAPH_TMA=1 (an experiment, off by default): the prefill buckets from this many tokens on are
# also captured with the TMA prefill kernel (1.29-1.41x the paged one, H200 2026-12-03), replayed for a chunk
# that starts its prompt (no cached prefix); chunks with a prefix keep the paged route (split-KV).
PREFILL_TMA_GRAPH_MIN_TOKENS = 256


def prefill_tma_graphs_wanted() -> bool:
    return os.environ.get("FDPP_PREFILL_GRAPH_TMA", "0") == "1"


def prefill_graph_sizes(max_tokens: int, token_budget: int, max_model_len: int) -> list[int]:
    """The prefill graph buckets up to ``max_tokens`` (0: none), a step's token budget and the model length."""
    cap = min(max_tokens, token_budget, max_model_len)
    return [t for t in PREFILL_GRAPH_TOKENS if t <= cap]


# The split count of the decode graphs replayed for unequal rows (ModelRunner.balanced_graphs): a 16k-token
# row among 1k-token rows then walks 2k keys per program instead of 16k.
DECODE_BALANCE_GRAPH_SPLITS = 8


class StaticSteps:
    """The graph half of the model runner (see the module docstring)."""

    def _init_static_steps(self) -> None:
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_batch_sizes: list[int] = []
        self._decode_inputs: _GraphInputs | None = None
        # Mixed steps (decode rows + one prompt chunk padded to mixed_chunk_tokens): see init_mixed_inputs.
        self.mixed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Decode steps of unequal rows (one long context among short ones): the same step captured with
        # DECODE_BALANCE_GRAPH_SPLITS splits, for the buckets whose own split count is smaller.
        self.balanced_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_balanced_replays = 0
        self.num_decode_replays = 0  # decode steps that replayed a graph (balanced ones included)
        self.mixed_batch_sizes: list[int] = []
        self.mixed_chunk_tokens = 0
        self._mixed_inputs: _GraphInputs | None = None
        self.num_mixed_replays = 0  # mixed steps run through the padded static step (a replay on CUDA)
        # Prefill steps of one prompt chunk (no decode rows) padded to a token bucket: see init_prefill_inputs.
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # the same steps through the TMA prefill kernel, for chunks that start their prompt (FDPP_PREFILL_GRAPH_TMA)
        self.prefill_tma_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_tma_token_sizes: list[int] = []
        self.num_prefill_tma_replays = 0
        self.prefill_token_sizes: list[int] = []
        self._prefill_inputs: _GraphInputs | None = None
        self._prefill_meta: dict[int, AttentionMetadata] = {}
        self.num_prefill_replays = 0  # prefill steps run through the padded static step (a replay on CUDA)

    # ---- CUDA graphs ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_cuda_graphs(self, max_batch_size: int, show_progress: bool = True,
                            mixed_chunk_tokens: int | None = None, balanced_decode: bool = False,
                            prefill_tokens: list[int] | None = None) -> None:
        """Capture one decode step per batch-size bucket and, with ``mixed_chunk_tokens`` = C > 0, one
        mixed step per bucket up to MAX_MIXED_GRAPH_BATCH rows (those decode rows, then one prompt
        chunk padded to C tokens: ``mixed_step``); with ``balanced_decode``, each decode bucket whose own
        split count is below DECODE_BALANCE_GRAPH_SPLITS also with that many (``balanced_graphs``,
        replayed for rows of unequal length: ``decode_splits``); with ``prefill_tokens``, one prefill step of
        one prompt chunk padded to each of these token counts (``prefill_step``); largest first, sharing one
        memory pool. Replaces the graphs captured before. ``mixed_chunk_tokens`` / ``prefill_tokens`` None:
        the previous call's (none at first).

        Buffers are static: a step copies its ids, positions, slots, context lengths and block tables
        into them and replays the bucket's graph; rows past the batch are padding (context length 0,
        slot -1: no cache read or write). Attention is captured for the longest context
        (max_model_len), so any step up to it replays the same graph.
        """
        from tqdm.auto import tqdm

        self.graphs.clear()
        self.mixed_graphs.clear()
        self.balanced_graphs.clear()
        self.prefill_graphs.clear()
        self.prefill_tma_graphs.clear()
        sizes = graph_bucket_sizes(max_batch_size)
        self.graph_batch_sizes = []
        if mixed_chunk_tokens is None:
            mixed_chunk_tokens = self.mixed_chunk_tokens
        self.init_mixed_inputs(mixed_chunk_tokens, [b for b in sizes if b <= MAX_MIXED_GRAPH_BATCH])
        self.init_prefill_inputs(self.prefill_token_sizes if prefill_tokens is None else prefill_tokens)
        if not sizes:
            return
        dev = self.device
        self._decode_inputs = inp = _GraphInputs(sizes[-1], sizes[-1], sizes[-1], self.max_blocks_per_seq, dev)
        # (graphs dict, bucket, tokens of the step, the step): the largest first, for the pool's reuse
        steps: list[tuple[dict, int, int, Callable[[], torch.Tensor]]] = []
        kvh = int(self.kv_cache.shape[4])
        for bs in sizes:
            meta = AttentionMetadata(
                is_prefill=False,
                context_lens=inp.ints[:bs],
                block_tables=inp.tables[:bs],
                slot_mapping=inp.slots[:bs],
                max_seqlen_q=1,
                max_context_len=self.max_model_len,
            )

            def step(bs=bs, meta=meta):
                with forward_context(meta, self.backends):
                    hidden = self.model(inp.ids[:bs], inp.pos[:bs])
                    return self.model.compute_logits(hidden)

            steps.append((self.graphs, bs, bs, step))
            if balanced_decode and DECODE_BALANCE_GRAPH_SPLITS > decode_splits(bs, kvh, self.max_model_len, dev):
                long_meta = AttentionMetadata(
                    is_prefill=False, context_lens=meta.context_lens, block_tables=meta.block_tables,
                    slot_mapping=meta.slot_mapping, max_seqlen_q=1, max_context_len=self.max_model_len,
                    decode_num_splits=DECODE_BALANCE_GRAPH_SPLITS)
                steps.append((self.balanced_graphs, bs, bs, lambda bs=bs, meta=long_meta, fn=step: fn(bs, meta)))
        # Eager steps (a mixed step no graph covers: its decode part) use the balanced split count for
        # unequal rows, a kernel variant (the batched config with several splits) that no graph above
        # needs unless balanced graphs are captured: compile it here, not in the middle of serving (seen
        # on an H200: a 1.7 s stall in a 16k prompt's prefill window, bench_prefix.py itl, 2026-12-03).
        warm_split = None
        top = sizes[-1]
        if not balanced_decode and DECODE_BALANCE_GRAPH_SPLITS > decode_splits(top, kvh, self.max_model_len, dev):
            warm_meta = AttentionMetadata(
                is_prefill=False, context_lens=inp.ints[:top], block_tables=inp.tables[:top],
                slot_mapping=inp.slots[:top], max_seqlen_q=1, max_context_len=self.max_model_len,
                decode_num_splits=DECODE_BALANCE_GRAPH_SPLITS)
            warm_split = (top, lambda fn=step: fn(top, warm_meta))  # bound now: `step` is rebound below
        for bs in self.mixed_batch_sizes:
            steps.append((self.mixed_graphs, bs, bs + self.mixed_chunk_tokens,
                          lambda bs=bs: self.mixed_step(bs)))
        for t in self.prefill_token_sizes:
            steps.append((self.prefill_graphs, t, t, lambda t=t: self.prefill_step(t)))
        for t in self.prefill_tma_token_sizes:
            steps.append((self.prefill_tma_graphs, t, t, lambda t=t: self.prefill_step(t, fresh=True)))
        steps.sort(key=lambda x: -x[2])
        pool = None
        bar = tqdm(steps, desc="Capturing CUDA graphs", unit="graph", disable=not show_progress)
        for graphs, bs, _, step in bar:
            step()  # warm-up: compiles kernels outside the capture
            if warm_split is not None and bs == warm_split[0]:
                warm_split[1]()  # the eager balanced-split variant (see below), at the largest bucket
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step()
            pool = graph.pool()
            graphs[bs] = (graph, logits)
        bar.close()
        self.graph_batch_sizes = sizes
        torch.cuda.synchronize(dev)

    def _stage_decode_rows(self, seqs: list[Sequence], h_long, h_ctx, h_tables) -> int:
        """Host staging of decode rows 0..len(seqs)-1 (id, position, slot, context length, block
        table); returns the widest block table."""
        bsz = self.block_size
        width = 0
        for i, s in enumerate(seqs):
            t = s.num_tokens - 1
            h_long[0, i] = s.token_ids[-1]
            h_long[1, i] = t
            h_long[2, i] = s.block_table[t // bsz] * bsz + t % bsz
            h_ctx[i] = s.num_tokens
            nb = len(s.block_table)
            h_tables[i, :nb] = s.block_table
            width = max(width, nb)
        return width

    @staticmethod
    def _pad_rows(h_long, h_ctx, lo: int, hi: int) -> None:
        """Staged rows lo..hi-1 become padding: id and position 0, slot -1 (no cache write), context
        length 0 (no cache read); ``h_ctx`` None: token rows only."""
        h_long[:, lo:hi] = 0
        h_long[2, lo:hi] = -1
        if h_ctx is not None:
            h_ctx[lo:hi] = 0

    def _stage_chunk(self, h_long, offset: int, seq: Sequence, n: int, pad_to: int) -> int:
        """Host staging of ``seq``'s next ``n`` prompt tokens (ids, positions, cache slots) at token rows
        ``offset``..; rows up to ``pad_to`` become padding. Returns the chunk's end (its context length)."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        h_long[0, offset: offset + n] = seq.token_ids[start:end]
        h_long[1, offset: offset + n] = range(start, end)
        h_long[2, offset: offset + n] = self._slots(seq, start, end)
        self._pad_rows(h_long, None, offset + n, pad_to)
        return end

    @staticmethod
    def _replay_or_run(graphs: dict, key: int, step: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """The logits of a static step: its graph's replay where one was captured, else ``step(key)``
        eagerly over the same static inputs."""
        captured = graphs.get(key)
        if captured is None:
            return step(key)
        captured[0].replay()
        return captured[1]

    def _replay(self, batch: ScheduledBatch, device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        seqs = batch.seqs
        bs = len(seqs)
        bucket = next(b for b in self.graph_batch_sizes if b >= bs)
        inp = self._decode_inputs
        h_long, h_ctx, h_tables = inp.host()
        width = self._stage_decode_rows(seqs, h_long, h_ctx, h_tables)
        self._pad_rows(h_long, h_ctx, bs, bucket)
        inp.upload(bucket, bucket, bs, width)
        if device_tokens is not None:
            self._scatter_device_tokens(inp.ids, device_tokens)
        graph, logits = self.graphs[bucket]
        if bucket in self.balanced_graphs and self.decode_splits([s.num_tokens for s in seqs]) is not None:
            graph, logits = self.balanced_graphs[bucket]  # one long row among short ones: more splits
            self.num_balanced_replays += 1
        graph.replay()
        self.num_decode_replays += 1
        return logits[:bs]

    # ---- mixed steps (decode rows + one prompt chunk), padded to static shapes -----------------------
    def init_mixed_inputs(self, chunk_tokens: int, batch_sizes: list[int]) -> None:
        """Allocate the static inputs of mixed steps: ``b`` decode rows (b in ``batch_sizes``) then
        one prompt chunk padded to ``chunk_tokens`` tokens. ``execute`` then runs such steps through
        ``mixed_step``: a graph replay where ``capture_cuda_graphs`` captured one, else eagerly (the
        CPU tests drive it so). ``chunk_tokens`` 0 or no sizes: mixed steps run as any other step.

        Layout (B = the largest size, C = chunk_tokens): ``long`` holds B + C token rows (bucket b
        uses rows 0..b-1 for decode rows and b..b+C-1 for the chunk); ``ints`` holds the context
        lengths (B + 1: b decode rows, then the chunk's at index b), the chunk's cu_seqlens_q [0, n]
        and the B + 1 rows whose logits are computed (decode rows, then the chunk's last token);
        ``tables`` B + 1 rows like the context lengths.
        """
        if chunk_tokens < 0:
            raise ValueError(f"init_mixed_inputs: chunk_tokens must be >= 0 (0: no mixed steps), got {chunk_tokens}")
        self.mixed_graphs.clear()
        self.mixed_chunk_tokens = chunk_tokens
        self.mixed_batch_sizes = sorted(batch_sizes) if chunk_tokens else []
        self._mixed_inputs = None
        if not self.mixed_batch_sizes:
            return
        B = self.mixed_batch_sizes[-1]
        self._mixed_inputs = _GraphInputs(B + chunk_tokens, 2 * (B + 1) + 2, B + 1, self.max_blocks_per_seq,
                                          self.device)
        self._mixed_meta: dict[int, AttentionMetadata] = {}

    def _mixed_views(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context lengths [bucket + 1], cu_seqlens_q [2], logits rows [bucket + 1]) of ``ints``."""
        B = self.mixed_batch_sizes[-1]
        ints = self._mixed_inputs.ints
        return ints[: bucket + 1], ints[B + 1: B + 3], ints[B + 3: B + 4 + bucket]

    def _mixed_metadata(self, bucket: int) -> AttentionMetadata:
        """A mixed step's metadata as ``prepare`` builds it, over the static buffers, with host ints
        fixed for any step of the bucket: decode max_context_len = max_model_len (split count), the
        chunk's max_seqlen_q = C (the prefill grid; q tiles past the chunk's length exit early)."""
        meta = self._mixed_meta.get(bucket)
        if meta is not None:
            return meta
        inp, C = self._mixed_inputs, self.mixed_chunk_tokens
        ctx, cu, _ = self._mixed_views(bucket)
        tables = inp.tables[: bucket + 1]
        meta = AttentionMetadata(
            is_prefill=True, context_lens=ctx, block_tables=tables, slot_mapping=inp.slots[: bucket + C],
            max_seqlen_q=C, max_context_len=self.max_model_len,
            decode_part=AttentionMetadata(is_prefill=False, context_lens=ctx[:bucket], block_tables=tables[:bucket],
                                          max_context_len=self.max_model_len),
            prefill_part=AttentionMetadata(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=C,
                                           context_lens=ctx[bucket:], block_tables=tables[bucket:],
                                           max_context_len=self.max_model_len),
        )
        self._mixed_meta[bucket] = meta
        return meta

    def mixed_step(self, bucket: int) -> torch.Tensor:
        """The padded static mixed step of ``bucket`` decode rows (what a mixed graph captures): the
        forward over the static inputs, logits of the ``bucket + 1`` staged rows ``[bucket + 1, vocab]``."""
        inp = self._mixed_inputs
        _, _, rows = self._mixed_views(bucket)
        n = bucket + self.mixed_chunk_tokens
        with forward_context(self._mixed_metadata(bucket), self.backends):
            hidden = self.model(inp.ids[:n], inp.pos[:n])
            return self.model.compute_logits(hidden.index_select(0, rows))

    def _mixed_bucket(self, batch: ScheduledBatch, nd: int) -> int | None:
        """The mixed bucket that runs ``batch`` (its first ``nd`` rows decode), or None (eager): 1 <= nd
        <= the largest bucket decode rows, then one prompt chunk of at most C tokens, no prompt logprobs."""
        if (not self.mixed_batch_sizes or nd != len(batch) - 1 or not 1 <= nd <= self.mixed_batch_sizes[-1]
                or batch.num_new_tokens[-1] > self.mixed_chunk_tokens or batch.seqs[-1].prompt_logprobs is not None):
            return None
        return next(b for b in self.mixed_batch_sizes if b >= nd)

    def _run_mixed(self, batch: ScheduledBatch, bucket: int,
                   device_tokens: DeviceTokens | None) -> tuple[torch.Tensor, list[Sequence]]:
        """Stage ``batch`` into the mixed inputs of ``bucket`` and run it (replay, or ``mixed_step``);
        return the logits of the sampled rows (the decode rows, then the chunk's row if it completes
        its prompt) and the sequences they belong to, in order."""
        inp, C = self._mixed_inputs, self.mixed_chunk_tokens
        decode, seq, n = batch.seqs[:-1], batch.seqs[-1], batch.num_new_tokens[-1]
        nd = len(decode)
        B = self.mixed_batch_sizes[-1]
        h_long, h_ints, h_tables = inp.host()
        width = self._stage_decode_rows(decode, h_long, h_ints, h_tables)
        self._pad_rows(h_long, h_ints, nd, bucket)
        end = self._stage_chunk(h_long, bucket, seq, n, bucket + C)
        h_ints[bucket] = end
        h_tables[bucket, : len(seq.block_table)] = seq.block_table
        width = max(width, len(seq.block_table))
        h_ints[B + 1], h_ints[B + 2] = 0, n  # cu_seqlens_q of the chunk
        rows = h_ints[B + 3: B + 4 + bucket]
        rows[:nd] = range(nd)
        rows[nd] = bucket + n - 1
        rows[nd + 1:] = 0
        inp.upload(bucket + C, len(h_ints), bucket + 1, width)
        if device_tokens is not None:
            self._scatter_device_tokens(inp.ids, device_tokens)
        logits = self._replay_or_run(self.mixed_graphs, bucket, self.mixed_step)
        self.num_mixed_replays += 1
        sampled = end == seq.num_tokens
        return logits[: nd + sampled], decode + [seq] * sampled

    # ---- prefill steps (one prompt chunk, no decode rows), padded to static shapes ---------------------
    # ``ints`` layout: [0] the context length, [4:6] cu_seqlens_q [0, n], [8] the row whose logits are
    # computed (each part 16-byte aligned: Triton specializes pointer arguments on it).
    _PF_CTX, _PF_CU, _PF_ROW, _PF_INTS = 0, 4, 8, 12

    def init_prefill_inputs(self, token_sizes: list[int]) -> None:
        """Allocate the static inputs of prefill steps of one prompt chunk padded to a bucket of
        ``token_sizes`` tokens (each a positive multiple of 16). ``execute`` then runs a step of one chunk
        of at most the largest bucket (no decode rows, no prompt logprobs) through ``prefill_step``: a graph
        replay where ``capture_cuda_graphs`` captured one, else eagerly (the CPU tests drive it so). An
        empty list: prefill steps run as any other step.

        Attention runs through the paged prefill kernel (the route of the mixed graphs' chunk), with the
        split count of a max_model_len context fixed at capture: any chunk up to the bucket is exact,
        a cached prefix and an earlier chunk included (the kernel reads them from the cache)."""
        bad = [t for t in token_sizes if t <= 0 or t % 16]
        if bad:
            raise ValueError(f"init_prefill_inputs: token sizes must be positive multiples of 16, got {bad}")
        self.prefill_graphs.clear()
        self.prefill_tma_graphs.clear()
        self.prefill_token_sizes = sorted(set(token_sizes))
        self.prefill_tma_token_sizes = []
        if prefill_tma_graphs_wanted() and prefill_tma_available(self.device, self.dtype, self.config.head_dim):
            self.prefill_tma_token_sizes = [t for t in self.prefill_token_sizes if t >= PREFILL_TMA_GRAPH_MIN_TOKENS]
        self._prefill_inputs = None
        self._prefill_meta = {}
        if self.prefill_token_sizes:
            self._prefill_inputs = _GraphInputs(self.prefill_token_sizes[-1], self._PF_INTS, 1,
                                                self.max_blocks_per_seq, self.device)

    def _prefill_metadata(self, tokens: int, fresh: bool = False) -> AttentionMetadata:
        """A prefill step's metadata over the static buffers, for any chunk of at most ``tokens`` tokens:
        max_seqlen_q = the bucket (the grid; q tiles past the chunk exit early), max_context_len =
        max_model_len (the split count). ``fresh``: for chunks that start their prompt, through the TMA
        prefill kernel (one split; it would recompute a cached prefix in its slow unsplit fallback)."""
        meta = self._prefill_meta.get((tokens, fresh))
        if meta is None:
            inp = self._prefill_inputs
            meta = AttentionMetadata(
                is_prefill=True, context_lens=inp.ints[self._PF_CTX: self._PF_CTX + 1], block_tables=inp.tables[:1],
                slot_mapping=inp.slots[:tokens], cu_seqlens_q=inp.ints[self._PF_CU: self._PF_CU + 2],
                max_seqlen_q=tokens, max_context_len=self.max_model_len, fresh_prefill=fresh,
                prefill_num_splits=1 if fresh else None)
            self._prefill_meta[(tokens, fresh)] = meta
        return meta

    def prefill_step(self, tokens: int, fresh: bool = False) -> torch.Tensor:
        """The padded static prefill step of ``tokens`` tokens (what a prefill graph captures): the forward
        over the static inputs, the logits of the staged row ``[1, vocab]``. ``fresh``: see
        ``_prefill_metadata``."""
        inp = self._prefill_inputs
        with forward_context(self._prefill_metadata(tokens, fresh), self.backends):
            hidden = self.model(inp.ids[:tokens], inp.pos[:tokens])
            return self.model.compute_logits(hidden.index_select(0, inp.ints[self._PF_ROW: self._PF_ROW + 1]))

    def _prefill_bucket(self, batch: ScheduledBatch, nd: int) -> int | None:
        """The prefill bucket that runs ``batch``, or None (eager): one prompt chunk (no decode row) of at
        most the largest bucket's tokens, no prompt logprobs."""
        if (not self.prefill_token_sizes or nd or len(batch) != 1 or batch.seqs[0].prompt_logprobs is not None
                or batch.num_new_tokens[0] > self.prefill_token_sizes[-1]):
            return None
        return next(t for t in self.prefill_token_sizes if t >= batch.num_new_tokens[0])

    def _run_prefill(self, batch: ScheduledBatch, tokens: int,
                     device_tokens: DeviceTokens | None) -> tuple[torch.Tensor, list[Sequence]]:
        """Stage ``batch``'s chunk into the prefill inputs, run the bucket of ``tokens`` (replay, or
        ``prefill_step``); return the logits of the sampled row (none unless the chunk completes its
        prompt) and its sequence."""
        inp = self._prefill_inputs
        seq, n = batch.seqs[0], batch.num_new_tokens[0]
        h_long, h_ints, h_tables = inp.host()
        end = self._stage_chunk(h_long, 0, seq, n, tokens)
        h_ints[:] = 0
        h_ints[self._PF_CTX] = end
        h_ints[self._PF_CU + 1] = n
        h_ints[self._PF_ROW] = n - 1
        h_tables[0, : len(seq.block_table)] = seq.block_table
        inp.upload(tokens, self._PF_INTS, 1, len(seq.block_table))
        if device_tokens is not None:
            self._scatter_device_tokens(inp.ids, device_tokens)
        if seq.num_computed_tokens == 0 and tokens in self.prefill_tma_token_sizes:
            logits = self._replay_or_run(self.prefill_tma_graphs, tokens, lambda t: self.prefill_step(t, fresh=True))
            self.num_prefill_tma_replays += 1
        else:
            logits = self._replay_or_run(self.prefill_graphs, tokens, self.prefill_step)
        self.num_prefill_replays += 1
        sampled = end == seq.num_tokens
        return logits[:int(sampled)], [seq] * sampled
