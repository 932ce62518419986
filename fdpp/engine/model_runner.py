"""Runs the model for a scheduled batch: builds the batch tensors and attention metadata, owns the
KV cache, samples. The only engine part that touches tensors."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from fdpp.config import ModelConfig
from fdpp.engine.cuda_graph import StaticSteps, table_width
from fdpp.engine.scheduler import ScheduledBatch
from fdpp.engine.sequence import Sequence
from fdpp.errors import CacheTooSmallError
from fdpp.layers.context import forward_context
from fdpp.layers.sampler import SamplerOutput, SamplingBatch, sample
from fdpp.ops.attention import AttentionMetadata, balanced_decode_splits
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


class ModelRunner(StaticSteps):
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
        self._init_static_steps()
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
        width = table_width(max(len(s.block_table) for s in seqs))
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._to_device(rows, torch.int32)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """The cache slots of ``seq``'s tokens start..end-1 (block table entry * block size + offset)."""
        bs = self.block_size
        if end - start <= 64:
            return [seq.block_table[t // bs] * bs + t % bs for t in range(start, end)]
        # NOTE: a prompt chunk: numpy is ~3x faster than the comprehension at 1k tokens (host time before a
        # prefill graph's replay is the TTFT's)
        t = np.arange(start, end)
        return (np.asarray(seq.block_table, dtype=np.int64)[t // bs] * bs + t % bs).tolist()

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
