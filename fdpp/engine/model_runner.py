"""Runs the model for a scheduled batch: builds the batch tensors and attention metadata, owns the
KV cache, samples. The only engine part that touches tensors."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from fdpp.config import ModelConfig
from fdpp.engine.scheduler import ScheduledBatch
from fdpp.engine.sequence import Sequence
from fdpp.errors import CacheTooSmallError
from fdpp.layers.context import forward_context
from fdpp.layers.sampler import SamplerOutput, SamplingBatch, sample
from fdpp.ops.attention import AttentionMetadata, balanced_decode_splits, decode_splits
from fdpp.ops.backend import Backends
from fdpp.structured.backend import StructuredOutputBackend

logger = logging.getLogger(__name__)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem


@dataclass
class DeviceTokens:
    """Input ids that are still on the device (async scheduling): row ``rows[i]`` of the next step
    takes ``token_ids[src_rows[i]]``, a token sampled by the step before that the host has not read."""

    token_ids: torch.Tensor  # [num_sampled] int64, on the runner's device
    rows: list[int]  # rows of the step being launched (decode rows: one token each)
    src_rows: list[int]  # rows of ``token_ids``

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.src_rows):
            raise ValueError(f"DeviceTokens: {len(self.rows)} rows but {len(self.src_rows)} source rows")


class PendingSample:
    """A step's sampler output on its way to the host: pinned copies made without blocking and an
    event recorded after them. ``wait()`` blocks until they landed and returns them."""

    def __init__(self, out: SamplerOutput, device: torch.device) -> None:
        self.device_token_ids = out.token_ids  # stays on the device: the next step's input ids
        if device.type != "cuda":
            self._host, self._event = out, None
            return
        host = {}
        for f in fields(out):
            t = getattr(out, f.name)
            if t is not None:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t = h
            host[f.name] = t
        self._host = SamplerOutput(**host)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


def _table_width(num_blocks: int) -> int:
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
        max_blocks = _table_width(max_blocks)
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
# work of its bucket, at most 1/3 more than the prompt's from 512 tokens on. Multiples of 16: one Triton
# specialization.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)


def prefill_graph_sizes(max_tokens: int, token_budget: int, max_model_len: int) -> list[int]:
    """The prefill graph buckets up to ``max_tokens`` (0: none), a step's token budget and the model length."""
    cap = min(max_tokens, token_budget, max_model_len)
    return [t for t in PREFILL_GRAPH_TOKENS if t <= cap]


# The split count of the decode graphs replayed for unequal rows (ModelRunner.balanced_graphs): a 16k-token
# row among 1k-token rows then walks 2k keys per program instead of 16k.
DECODE_BALANCE_GRAPH_SPLITS = 8


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        backends: Backends | None = None,
    ) -> None:
        """``backends``: the op implementations of this rank (its worker resolves them from the config);
        None: the device's default (``Backends.default``)."""
        self.model = model
        # entered with the forward context around every forward pass (LM head and graph capture included)
        self.backends = backends if backends is not None else Backends.default(device)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.vocab_size = config.vocab_size
        self.eos_token_ids = eos_token_ids
        self._generators: dict[int, torch.Generator] = {}
        self._pin = device.type == "cuda"
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
        self.prefill_token_sizes: list[int] = []
        self._prefill_inputs: _GraphInputs | None = None
        self._prefill_meta: dict[int, AttentionMetadata] = {}
        self.num_prefill_replays = 0  # prefill steps run through the padded static step (a replay on CUDA)
        # Set by the engine: fills the grammar bitmask of constrained rows (fdpp.structured).
        self.structured: StructuredOutputBackend | None = None
        self._bitmask_host: torch.Tensor | None = None
        self._allocate_kv_cache()

    # ---- KV cache -------------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> None:
        c = self.config
        layers = self.model.attention_layers()
        # [layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_cache = torch.empty(
            len(layers), 2, self.num_blocks, self.block_size, c.num_key_value_heads, c.head_dim,
            dtype=self.dtype, device=self.device,
        )
        for i, attn in enumerate(layers):
            attn.k_cache = self.kv_cache[i, 0]
            attn.v_cache = self.kv_cache[i, 1]

    # ---- batch tensors --------------------------------------------------------------------------
    def _block_table_tensor(self, seqs: list[Sequence]) -> torch.Tensor:
        # NOTE: the width is a multiple of 16 so that the kernels see one stride class and 16-byte
        # aligned row slices (a mixed step's prefill rows): Triton specializes on both, and each new
        # class is a ~1 s JIT compile in the middle of serving.
        width = _table_width(max(len(s.block_table) for s in seqs))
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._to_device(rows, torch.int32)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[t // bs] * bs + t % bs for t in range(start, end)]

    @staticmethod
    def num_decode_rows(batch: ScheduledBatch) -> int:
        """Leading rows that compute one token on top of all the others' K/V (decode rows; a final
        one-token prompt chunk is one too): they run through the decode attention kernel."""
        nd = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if n != 1 or seq.num_computed_tokens != seq.num_tokens - 1:
                break
            nd += 1
        return nd

    def prepare(self, batch: ScheduledBatch):
        """Token ids, positions, attention metadata, and the rows whose logits are sampled.

        A mixed step (decode rows first, then prefill chunks) gets metadata for each part, so that
        attention runs the decode rows through the split-KV decode kernel and only the chunks
        through the prefill kernel (both read earlier tokens from the paged cache).
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []  # index into the packed tokens
        sample_seqs: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            cu.append(cu[-1] + n)
            context_lens.append(end)
            if end == seq.num_tokens:  # prompt complete (or decode): sample the next token
                sample_rows.append(cu[-1] - 1)
                sample_seqs.append(seq)
                for child in batch.forks.get(seq.seq_id, ()):  # n > 1: the same logits row
                    sample_rows.append(cu[-1] - 1)
                    sample_seqs.append(child)
        nd = self.num_decode_rows(batch)
        block_tables = self._block_table_tensor(batch.seqs)
        ctx = self._to_device(context_lens, torch.int32)
        meta = AttentionMetadata(
            is_prefill=nd < len(batch),
            cu_seqlens_q=self._to_device(cu, torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            context_lens=ctx,
            block_tables=block_tables,
            slot_mapping=self._to_device(slots, torch.int64),
            max_context_len=max(context_lens),
            # every sequence starts at token 0 (no cached prefix, no earlier chunk): a fresh prefill
            fresh_prefill=nd == 0 and all(c == n for c, n in zip(context_lens, batch.num_new_tokens)),
            decode_num_splits=self.decode_splits(context_lens) if nd == len(batch) else None,
        )
        if 0 < nd < len(batch):
            meta.decode_part = AttentionMetadata(
                is_prefill=False, context_lens=ctx[:nd], block_tables=block_tables[:nd],
                max_context_len=max(context_lens[:nd]), decode_num_splits=self.decode_splits(context_lens[:nd]),
            )
            meta.prefill_part = AttentionMetadata(
                is_prefill=True,
                cu_seqlens_q=self._to_device([c - nd for c in cu[nd:]], torch.int32),
                max_seqlen_q=max(batch.num_new_tokens[nd:]),
                # a tensor of its own: ctx[nd:] would start unaligned for nd % 4 != 0 (Triton specializes on it)
                context_lens=self._to_device(context_lens[nd:], torch.int32),
                block_tables=block_tables[nd:],
                max_context_len=max(context_lens[nd:]),
            )
        ids = self._to_device(input_ids, torch.int64)
        pos = self._to_device(positions, torch.int64)
        return ids, pos, meta, sample_rows, sample_seqs

    def decode_splits(self, context_lens: list[int]) -> int | None:
        """The decode split count for rows of these context lengths when one is long enough to be the
        step's tail (`fdpp.ops.attention.balanced_decode_splits`); else None (the batch's own)."""
        if self.kv_cache is None:
            return None
        return balanced_decode_splits(context_lens, int(self.kv_cache.shape[4]), self.device)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """Host list -> device tensor through pinned memory, without a device sync."""
        t = torch.tensor(values, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True) if self._pin else t.to(self.device)

    def _host_to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device through pinned memory, without a device sync (the caching host allocator
        keeps the pinned copy alive until the transfer is done)."""
        return t.pin_memory().to(self.device, non_blocking=True) if self._pin else t.to(self.device)

    def sampling_batch(self, seqs: list[Sequence], bitmask: torch.Tensor | None = None) -> SamplingBatch:
        b = self._sampling_params_batch(seqs)
        b.token_bitmask = bitmask
        if any(s.params.logit_bias for s in seqs):
            rows, ids, bias = [], [], []
            for row, s in enumerate(seqs):
                for tok, value in (s.params.logit_bias or {}).items():
                    rows.append(row)
                    ids.append(tok)
                    bias.append(value)
            b.logit_bias = (self._to_device(rows, torch.int64), self._to_device(ids, torch.int64),
                            self._to_device(bias, torch.float32))
        return b

    def grammar_bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The token bitmask of a batch's rows on the device, or None if no row is constrained.

        Called after the forward pass has been launched: on a GPU the host fills the mask while the
        device runs the model (the forward does not need it; only the sampler does)."""
        if self.structured is None or all(s.grammar is None for s in seqs):
            return None
        # A row whose sequence has ended (async scheduling: its grammar terminated, or it stopped,
        # or failed, with the token of the step before) holds a placeholder whose sample is dropped:
        # it is left unconstrained, so no finished or terminated matcher is asked for a mask.
        matchers = [None if s.grammar is None or s.is_finished or s.grammar.is_terminated() else s.grammar
                    for s in seqs]
        if all(m is None for m in matchers):
            return None
        width = self.structured.bitmask_width
        if self._bitmask_host is None or self._bitmask_host.shape[0] < len(seqs):
            rows = max(len(seqs), 64)
            self._bitmask_host = torch.empty(rows, width, dtype=torch.int32, pin_memory=self._pin)
        host = self._bitmask_host[: len(seqs)]
        # NOTE: the pinned buffer is reusable: with grammar rows the engine reads the previous
        # step's tokens (``before_sample``) before this fill, and that step's copy of the buffer ran
        # before its sampler, so it has finished.
        self.structured.fill_bitmask(matchers, host)
        return host.to(self.device, non_blocking=True) if self._pin else host.clone()

    def _sampling_params_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        V = self.vocab_size
        if all(p.is_greedy and p.logprobs is None and not p.has_penalties and
               (p.min_tokens == 0 or p.ignore_eos) for p in params):
            return SamplingBatch.greedy()
        # NOTE: every host -> device copy here goes through pinned memory without a sync: a plain
        # torch.tensor(..., device=cuda) waits for the stream, i.e. for the step in flight (measured on an
        # H200, B64 sampled decode: 16.4 ms a step with async scheduling, the same as without it).
        temps = self._to_device([p.temperature for p in params], torch.float32)
        # NOTE: clamped to the vocabulary on the host, so any top_k the params allow fits int64
        top_k = self._to_device([p.top_k if 0 < p.top_k < V else V for p in params], torch.int64)
        enabled_k = [p.top_k for p in params if 0 < p.top_k < V and not p.is_greedy]
        b = SamplingBatch(
            temperatures=temps,
            top_k=top_k,
            top_p=self._to_device([p.top_p for p in params], torch.float32),
            min_p=self._to_device([p.min_p for p in params], torch.float32),
            all_greedy=all(p.is_greedy for p in params),
            max_top_k=max(enabled_k, default=0),
            use_top_p=any(p.top_p < 1.0 and not p.is_greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.is_greedy for p in params),
            num_logprobs=min(max((p.logprobs for p in params if p.logprobs is not None), default=-1), V),
        )
        if any(p.has_penalties for p in params):
            b.repetition_penalty = self._to_device([p.repetition_penalty for p in params], torch.float32)
            b.presence_penalty = self._to_device([p.presence_penalty for p in params], torch.float32)
            b.frequency_penalty = self._to_device([p.frequency_penalty for p in params], torch.float32)
            counts = torch.zeros(len(seqs), V, dtype=torch.float32)
            seen = torch.zeros(len(seqs), V, dtype=torch.bool)
            for row, s in enumerate(seqs):
                if s.output_counts:
                    ids = torch.tensor(list(s.output_counts.keys()))
                    counts[row, ids] = torch.tensor(list(s.output_counts.values()), dtype=torch.float32)
                seen[row, torch.tensor(s.token_ids)] = True
            b.output_counts = self._host_to_device(counts)
            b.seen_mask = self._host_to_device(seen)
        # NOTE: a grammar decides alone when a constrained sequence may stop (min_tokens is ignored).
        banned_rows = [
            row for row, s in enumerate(seqs)
            if s.num_output_tokens < s.params.min_tokens and not s.params.ignore_eos and s.grammar is None
        ]
        if banned_rows:
            banned = torch.zeros(len(seqs), V, dtype=torch.bool)
            for row in banned_rows:
                stop_ids = list(self.eos_token_ids) + list(seqs[row].params.stop_token_ids or [])
                banned[row, [i for i in stop_ids if 0 <= i < V]] = True
            b.banned = self._host_to_device(banned)
        if any(p.seed is not None for p in params):
            b.generators = [self._generator(s) for s in seqs]
        return b

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.is_finished:  # finished: a dropped row (async), no RNG kept
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._generators[seq.seq_id] = gen
        return gen

    def shutdown(self) -> None:
        """Free the GPU memory this runner holds: graphs, the KV cache and the model's weights."""
        self.graphs.clear()
        self.mixed_graphs.clear()
        self.balanced_graphs.clear()
        self._decode_inputs = self._mixed_inputs = None
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = torch.empty(0)
        self.kv_cache = None
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (its RNG) once the sequence has finished."""
        self._generators.pop(seq.seq_id, None)

    # ---- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks ``src -> dst`` in every layer (copy-on-write of shared blocks)."""
        src = self._to_device([c[0] for c in copies], torch.int64)
        dst = self._to_device([c[1] for c in copies], torch.int64)
        self.kv_cache.index_copy_(2, dst, self.kv_cache.index_select(2, src))

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, device_tokens: DeviceTokens | None = None,
        before_sample: Callable[[], None] | None = None,
    ) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run ``batch``; return the sequences sampled (row order) and their samples on the device.

        ``device_tokens``: decode rows whose input id is a placeholder take it from the device
        (async scheduling); every other row's id comes from ``seq.token_ids``.
        ``before_sample``: called once the forward pass has been launched and before the grammar
        bitmask and the sampling tensors are built (async scheduling with grammar rows: the engine
        applies the previous step's tokens there, advancing the grammars, while the device runs the
        forward). Not called when nothing is sampled."""
        if batch.copies:
            self.copy_blocks(batch.copies)
        static = None
        nd = self.num_decode_rows(batch)
        if self.graphs and nd == len(batch) <= self.graph_batch_sizes[-1]:
            static = self._replay(batch, device_tokens), batch.seqs
        elif (bucket := self._mixed_bucket(batch, nd)) is not None:
            static = self._run_mixed(batch, bucket, device_tokens)
        elif (tokens := self._prefill_bucket(batch, nd)) is not None:
            static = self._run_prefill(batch, tokens, device_tokens)
        if static is not None:
            logits, seqs = static
            if not seqs:  # a prompt chunk that does not complete its prompt: nothing to sample
                return seqs, None
            if batch.forks:  # a prompt completing in this step of an n > 1 request: its samples too
                rows, seqs = self._with_forks(batch, seqs)
                logits = logits[self._to_device(rows, torch.int64)]
            return self._sample(seqs, logits, before_sample)
        ids, pos, meta, rows, sample_seqs = self.prepare(batch)
        if device_tokens is not None:
            self._scatter_device_tokens(ids, device_tokens)
        with forward_context(meta, self.backends):
            hidden = self.model(ids, pos)
            if batch.is_prefill and any(s.prompt_logprobs is not None for s in batch.seqs):
                self._prompt_logprobs(batch, hidden)
            if not sample_seqs:
                return sample_seqs, None
            logits = self.model.compute_logits(hidden[self._to_device(rows, torch.int64)])
        return self._sample(sample_seqs, logits, before_sample)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                before_sample: Callable[[], None] | None) -> tuple[list[Sequence], SamplerOutput]:
        """Sample ``seqs``'s rows of the launched forward's ``logits``; ``before_sample`` first (see
        ``execute``). The grammar bitmask is filled on the host while the device runs the forward."""
        if before_sample is not None:
            before_sample()
        return seqs, sample(logits, self.sampling_batch(seqs, self.grammar_bitmask(seqs)))

    def _scatter_device_tokens(self, ids: torch.Tensor, src: DeviceTokens) -> None:
        """``ids[src.rows] = src.token_ids[src.src_rows]`` on the device, without a host sync (a
        slice copy in the common case of the same sequences in the same order)."""
        k = len(src.rows)
        if not k:
            return
        if src.rows == list(range(k)) and src.src_rows == list(range(k)):
            ids[:k].copy_(src.token_ids[:k], non_blocking=True)
            return
        rows = self._to_device(src.rows, torch.int64)
        src_rows = self._to_device(src.src_rows, torch.int64)
        ids.index_copy_(0, rows, src.token_ids.index_select(0, src_rows))

    def copy_sample_to_host(self, out: SamplerOutput) -> PendingSample:
        """Start copying ``out`` to the host without waiting; ``PendingSample.wait()`` reads it."""
        return PendingSample(out, self.device)

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Append to ``seq.prompt_logprobs`` the log-probabilities of the prompt tokens this prefill
        chunk predicts: position p's logits score prompt token p + 1 (the first prompt token has no
        entry but None). Each entry is {token id: logprob} for the prompt token and the top k."""
        start_row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            first_pos = seq.num_computed_tokens  # positions first_pos .. first_pos + n - 1
            if seq.prompt_logprobs is not None:
                # the next target is prompt position len(prompt_logprobs); it is scored at one before
                lo = max(first_pos, len(seq.prompt_logprobs) - 1)
                hi = min(first_pos + n, seq.num_prompt_tokens - 1)
                k = seq.params.prompt_logprobs or 0
                for chunk in range(lo, hi, _PROMPT_LOGPROBS_CHUNK):
                    end = min(chunk + _PROMPT_LOGPROBS_CHUNK, hi)
                    h = hidden[start_row + chunk - first_pos: start_row + end - first_pos]
                    logprobs = torch.log_softmax(self.model.compute_logits(h).float(), dim=-1)
                    targets = torch.tensor(seq.token_ids[chunk + 1: end + 1], device=logprobs.device)
                    lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
                    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
                    for i, tok in enumerate(seq.token_ids[chunk + 1: end + 1]):
                        entry = {tok: lp[i]}
                        if top_ids is not None:
                            for t, v in zip(top_ids[i].tolist(), top_lp[i].tolist()):
                                entry.setdefault(t, v)
                        seq.prompt_logprobs.append(entry)
            start_row += n

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of every scheduled token (tests and calibration)."""
        ids, pos, meta, _, _ = self.prepare(batch)
        with forward_context(meta, self.backends):
            hidden = self.model(ids, pos)
            return self.model.compute_logits(hidden)


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
        self.prefill_token_sizes = sorted(set(token_sizes))
        self._prefill_inputs = None
        self._prefill_meta = {}
        if self.prefill_token_sizes:
            self._prefill_inputs = _GraphInputs(self.prefill_token_sizes[-1], self._PF_INTS, 1,
                                                self.max_blocks_per_seq, self.device)

    def _prefill_metadata(self, tokens: int) -> AttentionMetadata:
        """A prefill step's metadata over the static buffers, for any chunk of at most ``tokens`` tokens:
        max_seqlen_q = the bucket (the grid; q tiles past the chunk exit early), max_context_len =
        max_model_len (the split count)."""
        meta = self._prefill_meta.get(tokens)
        if meta is None:
            inp = self._prefill_inputs
            meta = AttentionMetadata(
                is_prefill=True, context_lens=inp.ints[self._PF_CTX: self._PF_CTX + 1], block_tables=inp.tables[:1],
                slot_mapping=inp.slots[:tokens], cu_seqlens_q=inp.ints[self._PF_CU: self._PF_CU + 2],
                max_seqlen_q=tokens, max_context_len=self.max_model_len)
            self._prefill_meta[tokens] = meta
        return meta

    def prefill_step(self, tokens: int) -> torch.Tensor:
        """The padded static prefill step of ``tokens`` tokens (what a prefill graph captures): the forward
        over the static inputs, the logits of the staged row ``[1, vocab]``."""
        inp = self._prefill_inputs
        with forward_context(self._prefill_metadata(tokens), self.backends):
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
        logits = self._replay_or_run(self.prefill_graphs, tokens, self.prefill_step)
        self.num_prefill_replays += 1
        sampled = end == seq.num_tokens
        return logits[:int(sampled)], [seq] * sampled

    @staticmethod
    def _with_forks(batch: ScheduledBatch, seqs: list[Sequence]) -> tuple[list[int], list[Sequence]]:
        """Rows of ``seqs``'s logits (one each) repeated for the samples forked from them (n > 1: a
        prompt completing in this step), and the sequences of those rows."""
        rows, out = [], []
        for row, seq in enumerate(seqs):
            for s in (seq, *batch.forks.get(seq.seq_id, ())):
                rows.append(row)
                out.append(s)
        return rows, out


_PROMPT_LOGPROBS_CHUNK = 512  # prompt positions scored at once: bounds the [rows, vocab] logits


def num_blocks_for_budget(
    config: ModelConfig, dtype: torch.dtype, block_size: int, budget_bytes: int, max_model_len: int
) -> int:
    per_block = kv_bytes_per_token(config, dtype) * block_size
    num_blocks = int(budget_bytes // per_block)
    need = -(-max_model_len // block_size)
    if num_blocks < 1:
        raise CacheTooSmallError(
            f"the KV cache budget ({budget_bytes / 2**20:.1f} MiB) holds no block of {block_size} tokens "
            f"({per_block / 2**20:.2f} MiB each); raise the memory budget or gpu_memory_utilization"
        )
    if num_blocks < need:
        logger.warning(
            "the KV cache holds %d tokens, less than max_model_len=%d: long requests will be refused",
            num_blocks * block_size, max_model_len,
        )
    return num_blocks


def profile_activation_bytes(model: nn.Module, model_config: ModelConfig, dtype: torch.dtype,
                             device: torch.device, block_size: int, max_num_batched_tokens: int,
                             max_model_len: int, backends: Backends | None = None) -> int:
    """Run the largest prefill once with a throw-away cache (through ``backends``: the engine's); return its
    peak activation memory (CUDA)."""
    import time

    from fdpp.sampling_params import SamplingParams

    n = min(max_num_batched_tokens, max_model_len)
    blocks = -(-n // block_size)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner = ModelRunner(model, model_config, dtype, device, block_size, blocks, n, backends=backends)
    seq = Sequence("profile", [0] * n, SamplingParams(max_tokens=1), time.time())
    seq.block_table = list(range(blocks))
    runner.execute(ScheduledBatch([seq], [n], True))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner
    torch.cuda.empty_cache()
    return int(peak)
