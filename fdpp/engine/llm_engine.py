"""The engine: requests in, one scheduled step at a time, outputs out (vLLM's add_request / step)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from fdpp.config import EngineConfig, ModelConfig, resolve_device
from fdpp.engine.block_manager import BlockManager
from fdpp.engine.cuda_graph import prefill_graph_sizes
from fdpp.engine.model_runner import (
    DeviceTokens,
    PendingSample,
    kv_bytes_per_token,
    num_blocks_for_budget,
    profile_activation_bytes,
)
from fdpp.engine.output_processor import OutputProcessor, RequestState
from fdpp.engine.scheduler import ScheduledBatch, Scheduler
from fdpp.engine.sequence import Sequence
from fdpp.errors import CacheTooSmallError, FdppError, InvalidRequestError
from fdpp.outputs import RequestMetrics, RequestOutput
from fdpp.sampling_params import SamplingParams
from fdpp.utils import phase

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET = 1 << 30  # 1 GiB of KV cache by default on the CPU
# Default step token budget (EngineConfig.max_num_batched_tokens). On the CPU a 512-token step takes
# ~1 s with SmolLM2-135M, so running streams, /metrics and shutdown wait at most that long.
_DEFAULT_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}
# Default cap of one prompt chunk in a step that also decodes (EngineConfig.long_prefill_token_threshold).
# On an H200 a mixed step with 256 prompt tokens over a 16k context costs about 2-3 decode steps of a
# 7B model; 2048 would stall the streams for ~15 decode steps each chunk (bench/bench_prefix.py, itl).
# Several prompts advance side by side (max_num_partial_prefills, default budget // cap): with one at a
# time, 64 waiting 1k prompts took 224 mixed steps of ~25 ms and Llama-2-7B B64 x 1k decoded at 587
# tok/s by the wall clock, against 4260 with no cap (H200, bench/step_trace.py, 2026-12-03).
_DEFAULT_LONG_PREFILL = {"cpu": 0, "cuda": 256}


@dataclass
class _InFlight:
    """A launched step whose tokens the host has not applied yet (async scheduling)."""

    batch: ScheduledBatch
    seqs: list[Sequence]  # the sampled sequences, in the rows of ``pending``
    pending: PendingSample | None  # None: nothing was sampled (prompt chunks only)
    is_resolved: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        config = replace(config or EngineConfig(), **kwargs)
        self.config = config
        torch.manual_seed(config.seed)
        from fdpp.engine.executor import create_executor

        # where the model runs: in this process (TP=1) or on tensor_parallel_size ranks (rank 0 here)
        self.executor = create_executor(config, resolve_device(config.device))
        self.device = self.executor.device
        self.backends = self.executor.backends  # the op implementations this engine's forward passes use
        try:
            self._init(config)
        except BaseException:
            self.executor.shutdown()
            raise

    def _init(self, config: EngineConfig) -> None:
        loaded, self.tokenizer = self.executor.load_model_and_tokenizer()
        self.model_config: ModelConfig = loaded.model_config
        self.model = loaded.model
        self.dtype = loaded.dtype
        self.model_key = loaded.model_key
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = _eos_ids(mc, self.tokenizer)
        block_size = config.cache.block_size
        self.max_num_batched_tokens = config.max_num_batched_tokens or _DEFAULT_BATCHED_TOKENS.get(
            self.device.type, 2048)
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        num_blocks = self.executor.num_blocks(self, block_size)
        self.block_manager = BlockManager(num_blocks, block_size, enable_caching=config.enable_prefix_caching)
        threshold = config.long_prefill_token_threshold
        if threshold is None:
            threshold = _DEFAULT_LONG_PREFILL.get(self.device.type, 0)
        if threshold < 0:
            raise InvalidRequestError(f"long_prefill_token_threshold must be >= 0 (0: no cap), got {threshold}")
        partial = config.max_num_partial_prefills
        if partial is None:
            partial = max(1, self.max_num_batched_tokens // threshold) if threshold else 1
        if partial < 1:
            raise InvalidRequestError(f"max_num_partial_prefills must be >= 1, got {partial}")
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   long_prefill_token_threshold=threshold, max_num_partial_prefills=partial)
        tp = getattr(self.executor, "tensor_parallel_size", 1)
        # NOTE: with tensor parallelism the other ranks take their input ids from rank 0's broadcast
        # (not from rank 0's device tensors), and the fused norm moves residual adds into the o/down
        # epilogues, which a row-parallel all-reduce would add once per rank: both stay TP=1 features.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda") and tp == 1
        self._in_flight: _InFlight | None = None  # async scheduling: the step whose tokens are unread
        self.fuse_norm = (tp == 1 and _resolve_fuse_norm(config.fuse_norm, self.device)
                          and hasattr(self.model, "set_fuse_norm"))
        if self.fuse_norm:
            self.model.set_fuse_norm(True)
        self.fuse_rope = (tp == 1 and _resolve_fuse_rope(config.fuse_rope) and hasattr(self.model, "set_fuse_rope"))
        if self.fuse_rope:
            self.model.set_fuse_rope(True)
        self.runner = self.executor.make_runner(loaded, block_size, num_blocks, self.max_model_len,
                                                self.eos_token_ids)
        from fdpp.structured.backend import StructuredOutputBackend

        self.structured = StructuredOutputBackend(
            self.tokenizer, mc.vocab_size, self.eos_token_ids,
            compile_timeout_s=config.structured_outputs_compile_timeout,
            max_spec_bytes=config.structured_outputs_max_bytes,
        )
        self.runner.structured = self.structured
        from fdpp.engine.loading import apply_calibration

        self.calibration = apply_calibration(self, config.calibration)
        if self.calibration is not None:
            self.executor.set_calibration(self.calibration)
        if config.cuda_graph_prefill_max_tokens < 0:
            raise InvalidRequestError("cuda_graph_prefill_max_tokens must be >= 0 (0: no prefill graphs), "
                                      f"got {config.cuda_graph_prefill_max_tokens}")
        if self.device.type == "cuda" and not config.enforce_eager:
            self.capture_cuda_graphs()
        # tokens -> text, stop checks, RequestOutputs (ending a sequence stays here: _finish)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self._next_id = 0

    # ---- set-up ----------------------------------------------------------------------------------
    def capture_cuda_graphs(self, max_batch_size: int | None = None) -> None:
        """(Re)capture the CUDA graphs the config asks for: decode steps up to ``max_batch_size`` rows (None:
        max_num_seqs), mixed steps (decode rows + one prompt chunk of at most the long-prefill cap), prefill
        steps of one chunk up to cuda_graph_prefill_max_tokens, balanced decode. Start-up does it unless
        enforce_eager; benchmarks that change the forward (fused norms, PDL) call it again."""
        c = self.config
        self.runner.capture_cuda_graphs(
            max_batch_size or c.max_num_seqs, show_progress=c.show_progress,
            mixed_chunk_tokens=self.scheduler.long_prefill_token_threshold if c.cuda_graph_mixed else 0,
            balanced_decode=c.cuda_graph_balanced_decode,
            prefill_tokens=prefill_graph_sizes(c.cuda_graph_prefill_max_tokens, self.max_num_batched_tokens,
                                               self.max_model_len))

    def _num_blocks(self, block_size: int) -> int:
        cc = self.config.cache
        if cc.num_blocks is not None:
            if cc.num_blocks < 1:
                raise CacheTooSmallError(f"num_blocks must be >= 1, got {cc.num_blocks}")
            return cc.num_blocks
        budget = cc.memory_budget_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                used = total - free
                # Activations of the largest step, measured by a profiling pass.
                with phase("Measuring activation memory", self.config.show_progress):
                    peak = profile_activation_bytes(self.model, self.model_config, self.dtype, self.device,
                                                    self.config.cache.block_size, self.max_num_batched_tokens,
                                                    self.max_model_len, backends=self.backends)
                budget = int(total * cc.gpu_memory_utilization - used - peak)
            else:
                budget = _CPU_KV_BUDGET
        return num_blocks_for_budget(self.model_config, self.dtype, block_size, budget, self.max_model_len)

    # ---- requests --------------------------------------------------------------------------------
    def _new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer (random weights): pass token ids")
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        else:
            ids = [int(t) for t in prompt]
            text = None
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})"
            )
        return text, ids

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> str:
        params = params or SamplingParams()
        params.validate()
        request_id = request_id if request_id is not None else self._new_request_id()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens "
                "(the prompt plus at least one generated token must fit); shorten the prompt"
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + 1 > capacity:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the KV cache holds only {capacity}; "
                "give the cache more memory or shorten the prompt"
            )
        if params.logprobs is not None and params.logprobs > self.model_config.vocab_size:
            raise InvalidRequestError(
                f"logprobs={params.logprobs} exceeds the vocabulary size ({self.model_config.vocab_size})",
                param="logprobs",
            )
        now = arrival_time or time.time()
        seqs = []
        for i in range(params.n):
            p = params if params.n == 1 else replace(params, n=1, seed=_nth_seed(params.seed, i))
            seqs.append(Sequence(request_id, ids, p, now))
        self._attach_constraints(params, seqs)
        # everything that can fail comes before the request is queued: a raise leaves the engine as it was
        req = self.output_processor.new_request(request_id, text, ids, params, seqs,
                                                RequestMetrics(arrival_time=now))
        self.scheduler.add(seqs[0], forks=seqs[1:])  # n > 1: the prompt is computed once, then shared
        self.requests[request_id] = req
        return request_id

    def _attach_constraints(self, params: SamplingParams, seqs: list[Sequence]) -> None:
        """Grammar matchers (compiling the constraint, cached), prompt-logprobs slots, and the
        vocabulary check of logit_bias. Raises InvalidRequestError before anything is queued."""
        vocab = self.model_config.vocab_size
        for tok in params.logit_bias or {}:
            if tok >= vocab:
                raise InvalidRequestError(
                    f"logit_bias: token id {tok} is outside the vocabulary (0..{vocab - 1})", param="logit_bias")
        if params.structured_outputs is not None:
            compiled = self.structured.compile(params.structured_outputs)
            for seq in seqs:
                seq.grammar = self.structured.new_matcher(compiled)
        if params.prompt_logprobs is not None:
            seqs[0].prompt_logprobs = [None]  # the completions of a request share the prompt

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks. Returns False if it was unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            seq.drop_placeholder()  # its blocks are offered to the prefix cache: real tokens only
        for seq in self.scheduler.abort(request_id):
            self.runner.release(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return the outputs of the requests it advanced.

        A failure that can be traced to one request (its sampling parameters cannot become tensors,
        detokenizing or a stop check raised) ends that request alone with finish_reason "error" (the
        message is on ``RequestOutput.error``) and frees its blocks; the other requests go on. Only a
        failure that no single request explains (every sequence of the batch fails even when run
        alone) is raised, and the caller aborts the batch.
        """
        if self.async_scheduling or self._in_flight is not None:
            return self._step_async()
        batch = self.scheduler.schedule()
        if batch is None:
            return self._nothing_scheduled()
        self._note_scheduled(batch)
        touched: dict[str, RequestState] = {}
        failed = self._run_sync(batch, touched)
        return self._outputs(touched, failed)

    def _nothing_scheduled(self) -> list[RequestOutput]:
        """Nothing could be scheduled: a waiting prompt that can never fit is ended, else no output."""
        if self.scheduler.waiting:
            return self._truncate_oversized(self.scheduler.waiting[0])
        return []

    def _note_scheduled(self, batch: ScheduledBatch) -> None:
        now = time.time()
        for seq in batch.seqs:
            m = self.requests[seq.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now

    def _run_sync(self, batch: ScheduledBatch, touched: dict[str, RequestState]) -> list[tuple[Sequence, BaseException]]:
        """Run ``batch``, wait for its tokens and apply them; return the sequences that failed."""
        results, failed = self._execute(batch)
        for sub, _ in results:
            for seq, n in zip(sub.seqs, sub.num_new_tokens):
                seq.num_computed_tokens += n
        failed += self._append_samples(results, touched)
        return failed

    def _outputs(self, touched: dict[str, RequestState], failed: list[tuple[Sequence, BaseException]]) -> list[RequestOutput]:
        for seq, error in failed:
            touched[seq.request_id] = self._fail(seq, error)
        outputs = self.output_processor.step_outputs(touched.values())
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    # ---- async scheduling (overlap) ---------------------------------------------------------------
    # Step t+1 is scheduled and launched while step t runs: each sequence sampled in step t gets a
    # placeholder token (it counts for scheduling and blocks), the placeholder rows of step t+1 take
    # their input ids from step t's sampled ids on the device, and only then does the host wait for
    # step t's tokens (pinned copies, an event) and apply them (stops, detokenizing, outputs). A
    # sequence that step t ends has computed one slot too many in step t+1: its blocks are freed when
    # it finishes and the token step t+1 samples for it is dropped, so nothing past a stop is returned.
    # Grammar rows need step t's token on the host before step t+1's bitmask: step t+1's forward is
    # launched first, then (``before_sample``) step t's tokens are read and applied (each grammar
    # advances by its token, a rejected token ends its request at once), and only then are step
    # t+1's bitmask filled and its sampler run; rows that step t ended are left unconstrained and
    # their samples dropped. NOTE: penalty rows need the previous token on the host for their counts,
    # so a step that samples one is not overlapped (it is waited for at once); a step that would
    # have to preempt is not overlapped either (the sync path preempts).
    def _step_async(self) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        failed: list[tuple[Sequence, BaseException]] = []
        prev, self._in_flight = self._in_flight, None
        if prev is not None and not self.async_scheduling:  # switched off with a step in flight: drain it
            self._resolve(prev, touched, failed)
            return self._outputs(touched, failed)
        if prev is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return self._nothing_scheduled()
            self._note_scheduled(batch)
            prev = self._launch(batch, None, touched, failed)
            if prev is not None and not self._can_overlap(prev):
                self._resolve(prev, touched, failed)
                prev = None
            if prev is None:
                return self._outputs(touched, failed)
        skip = self._add_placeholders(prev)
        if skip is None:  # the next step cannot be planned before this one's tokens are known
            self._resolve(prev, touched, failed)
            return self._outputs(touched, failed)
        batch = self.scheduler.schedule(skip)
        launched = None
        if batch is not None:
            self._note_scheduled(batch)
            launched = self._launch(batch, prev, touched, failed)
        self._resolve(prev, touched, failed)
        if launched is not None and launched.pending is not None:  # None: prompt chunks only
            if not any(self._is_live(s) for s in launched.seqs):
                launched.pending.wait()  # everything it sampled was ended by the step before
            elif self._can_overlap(launched):
                self._in_flight = launched
            else:
                self._resolve(launched, touched, failed)
        return self._outputs(touched, failed)

    def _launch(self, batch: ScheduledBatch, prev: _InFlight | None, touched: dict[str, RequestState],
                failed: list[tuple[Sequence, BaseException]]) -> _InFlight | None:
        """Launch ``batch`` without waiting for its tokens. With grammar rows, ``prev`` is resolved
        between the forward and the sampler (the bitmask needs its tokens). If it raises, ``prev``
        is resolved first (placeholders become real tokens) and the batch is run synchronously,
        with the usual per-request failure attribution; None is returned then."""
        device_tokens = None
        if prev is not None and prev.pending is not None:
            src = {s.seq_id: row for row, s in enumerate(prev.seqs)}
            rows, src_rows = [], []
            for row, seq in enumerate(batch.seqs):
                if seq.has_placeholder:
                    rows.append(row)
                    src_rows.append(src[seq.seq_id])
            if rows:
                device_tokens = DeviceTokens(prev.pending.device_token_ids, rows, src_rows)
        before_sample = None
        resolve_failed = False
        if prev is not None and prev.pending is not None and any(s.grammar is not None for s in batch.seqs):
            def before_sample() -> None:  # the forward is launched: apply prev's tokens, then mask
                nonlocal resolve_failed
                n = len(failed)
                try:
                    self._resolve(prev, touched, failed)
                except BaseException:
                    resolve_failed = True  # not this batch's failure: raised as it would be unoverlapped
                    raise
                for seq, error in failed[n:]:  # a rejected token: that request ends before the mask
                    touched[seq.request_id] = self._fail(seq, error)
        try:
            seqs, out = self.runner.execute(batch, device_tokens, before_sample=before_sample)
        except Exception:  # noqa: BLE001 - rerun synchronously, which attributes the failure
            if resolve_failed:
                raise
            if prev is not None:
                self._resolve(prev, touched, failed)
            live = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_finished]
            if live:
                retry = ScheduledBatch([s for s, _ in live], [n for _, n in live], batch.is_prefill,
                                       batch.copies, {k: v for k, v in batch.forks.items()})
                failed += self._run_sync(retry, touched)
            return None
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        pending = self.runner.copy_sample_to_host(out) if out is not None else None
        return _InFlight(batch, seqs, pending)

    def _resolve(self, launched: _InFlight, touched: dict[str, RequestState],
                 failed: list[tuple[Sequence, BaseException]]) -> None:
        """Wait for a launched step's tokens and apply them (each at most once)."""
        if launched.is_resolved or launched.pending is None:
            launched.is_resolved = True
            return
        launched.is_resolved = True
        out = launched.pending.wait()
        failed += self._append_samples([(launched.batch, (launched.seqs, out))], touched)

    def _is_live(self, seq: Sequence) -> bool:
        req = self.requests.get(seq.request_id)
        return req is not None and not seq.is_finished and seq in req.seqs

    @staticmethod
    def _can_overlap(launched: _InFlight) -> bool:
        """Whether the step after ``launched`` may be planned before its tokens are read: it sampled
        something and no row has penalties (their counts need the token on the host before the next
        sampler). Grammar rows overlap: the next step reads the tokens before its bitmask."""
        return launched.pending is not None and all(not s.params.has_penalties for s in launched.seqs)

    def _add_placeholders(self, prev: _InFlight) -> set[int] | None:
        """Give each live sequence ``prev`` sampled a placeholder for its token in flight; return
        the seq_ids the next step must skip (their token in flight surely ends them: max_tokens or
        the context). None (and no placeholder added) if the next step could need a preemption."""
        skip: set[int] = set()
        grow: list[Sequence] = []
        for seq in prev.seqs:
            if not self._is_live(seq):
                continue
            p = seq.params
            if ((p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens)
                    or seq.num_tokens + 1 >= self.max_model_len):
                skip.add(seq.seq_id)
            else:
                grow.append(seq)
        bm = self.block_manager
        growing = {s.seq_id for s in grow}
        need = sum(bm.blocks_needed(s, s.num_tokens + (s.seq_id in growing))
                   for s in self.scheduler.running if s.seq_id not in skip)
        if need > bm.num_free_blocks:
            return None
        for seq in grow:
            seq.append_placeholder()
        return skip

    def _execute(self, batch: ScheduledBatch) -> tuple[list, list[tuple[Sequence, BaseException]]]:
        """Run ``batch``; return ``[(sub_batch, (sampled_seqs, sampler_output))]`` for what ran and
        ``[(seq, error)]`` for the sequences that failed.

        If the batch raises, each sequence is run alone (writing the same KV slots again, which is
        harmless): the ones that fail alone are to blame and end alone. If every sequence of a larger
        batch fails alone too, the failure is not attributable to a request and propagates (the
        caller aborts the batch). A batch of one sequence that fails is that sequence's failure."""
        try:
            return [(batch, self.runner.execute(batch))], []
        except Exception as batch_error:
            if len(batch) == 1:
                self._log_failure(batch.seqs[0], batch_error)
                return [], [(batch.seqs[0], batch_error)]
            results, failed = [], []
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                forks = {seq.seq_id: batch.forks[seq.seq_id]} if seq.seq_id in batch.forks else {}
                is_prefill = n != 1 or seq.num_computed_tokens != seq.num_tokens - 1
                solo = ScheduledBatch([seq], [n], is_prefill, forks=forks)  # copies were made already
                try:
                    results.append((solo, self.runner.execute(solo)))
                except Exception as e:  # noqa: BLE001 - attributed to this sequence
                    failed.append((seq, e))
            if not results:
                raise batch_error
            for seq, e in failed:
                self._log_failure(seq, e)
            return results, failed

    @staticmethod
    def _log_failure(seq: Sequence, error: BaseException) -> None:
        logger.warning("request %s failed and is ended alone (the others go on): %s: %s",
                       seq.request_id, type(error).__name__, error)

    def _append_samples(self, results: list, touched: dict[str, RequestState]) -> list[tuple[Sequence, BaseException]]:
        """Hand each sampled token to the output processor (logprobs, text, stop checks), end the
        sequences it says are done, and note their requests in ``touched``; return the sequences
        whose processing raised (each is ended alone by the caller)."""
        failed = []
        now = time.time()
        proc = self.output_processor
        for _, (sampled_seqs, out) in results:
            if out is None:
                continue
            for seq, sample in zip(sampled_seqs, proc.unpack(out)):
                req = self.requests.get(seq.request_id)
                if req is None or seq.is_finished:
                    continue  # aborted, or (async scheduling) ended by the step before: dropped
                touched[req.request_id] = req
                try:
                    done = proc.append_token(req, seq, sample, now)
                    if done is not None:
                        self._finish(seq, *done)
                except Exception as e:  # noqa: BLE001 - this request's own post-processing failed
                    self._log_failure(seq, e)
                    failed.append((seq, e))
        return failed

    def _fail(self, seq: Sequence, error: BaseException) -> RequestState:
        """End ``seq`` with finish_reason "error" (blocks freed); the request records the message."""
        req = self.requests[seq.request_id]
        if req.error is None:
            req.error = f"{type(error).__name__}: {error}"
        if not seq.is_finished:
            if seq in self.scheduler.waiting:  # a chunked prefill in progress
                self.scheduler.waiting.remove(seq)
            self._finish(seq, "error", None)
        return req

    def _truncate_oversized(self, seq: Sequence) -> list[RequestOutput]:
        """A sequence that grew past the whole KV cache cannot be scheduled again: end it as "length"."""
        bm = self.block_manager
        if bm.blocks_for(seq.num_tokens) <= bm.num_blocks:
            raise FdppError(f"request {seq.request_id!r} cannot be scheduled although it fits the cache")
        self.scheduler.waiting.remove(seq)
        req = self.requests[seq.request_id]
        self.output_processor.flush_text(req, seq)
        self._finish(seq, "length", None)
        out = self.output_processor.make_output(req)
        if out.finished:
            del self.requests[req.request_id]
        return [out]

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)
        self.runner.release(seq)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] at every position of one prompt, by one prefill through the
        paged cache (blocks are taken for the call and given back). For checks and calibration."""
        n = len(token_ids)
        if not 0 < n <= self.max_model_len:
            raise InvalidRequestError(f"prompt_logits: {n} tokens; give 1..{self.max_model_len}")
        seq = Sequence("prompt-logits", list(token_ids), SamplingParams(max_tokens=1), time.time())
        if not self.block_manager.can_allocate(self.block_manager.blocks_needed(seq, n)):
            raise CacheTooSmallError(f"prompt_logits: {n} tokens do not fit in the free KV blocks")
        self.block_manager.allocate(seq, n)
        try:
            return self.runner.forward_logits(ScheduledBatch([seq], [n], True))
        finally:
            self.block_manager.free(seq)

    def shutdown(self) -> None:
        """Abort every request and free the engine's device memory; the engine is unusable after."""
        for rid in list(self.requests):
            self.abort_request(rid)
        if self._in_flight is not None and self._in_flight.pending is not None:
            self._in_flight.pending.wait()
        self._in_flight = None
        self.runner.shutdown()
        self.executor.shutdown()

    # ---- introspection ---------------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.block_manager.check_integrity()

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "kv_usage": bm.num_used_blocks / bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_bytes_per_token": kv_bytes_per_token(self.runner.config, self.dtype),  # one rank's (its KV heads)
            # prefix cache, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits)
            "prefix_caching": bm.enable_caching,
            "prefix_cache_queries": bm.num_queried_tokens,
            "prefix_cache_hits": bm.num_hit_tokens,
            "prefix_cache_hit_rate": bm.num_hit_tokens / bm.num_queried_tokens if bm.num_queried_tokens else 0.0,
            "num_cached_blocks": bm.num_cached_blocks,
            "num_prefill_tokens": self.scheduler.num_prefill_tokens,  # prompt tokens computed (not reused)
        }

    def reset_prefix_cache(self) -> int:
        """Drop every cached block that no running request holds (e.g. a cold-cache benchmark).
        Returns how many blocks were dropped."""
        return self.block_manager.reset_cache()


def _resolve_fuse_norm(fuse_norm: bool | None, device: torch.device) -> bool:
    """EngineConfig.fuse_norm: None is on for CUDA (Triton kernels) unless FDPP_FUSED_NORM=0; on the
    CPU the reference path gains nothing from it."""
    if fuse_norm is not None:
        return fuse_norm
    return device.type == "cuda" and os.environ.get("FDPP_FUSED_NORM", "1") != "0"


def _resolve_fuse_rope(fuse_rope: bool | None) -> bool:
    """EngineConfig.fuse_rope: None is off unless FDPP_FUSED_ROPE=1 (the fused epilogue has not been timed on
    a GPU yet); where the qkv projection is not a GEMV the layer falls back by itself."""
    if fuse_rope is not None:
        return fuse_rope
    return os.environ.get("FDPP_FUSED_ROPE", "0") == "1"


def _nth_seed(seed: int | None, i: int) -> int | None:
    """The seed of the i-th completion of a request (n > 1): seed + i, wrapped into int64."""
    if seed is None:
        return None
    return (seed + i + 2**63) % 2**64 - 2**63


def _eos_ids(mc: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    ids = set(mc.eos_token_id)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))

