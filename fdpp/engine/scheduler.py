"""Continuous batching: which sequences run in the next step, and with how many tokens.

Plain Python over block counts; it never touches tensors. Each step packs, up to a token budget
(``max_num_batched_tokens``): first one decode token for every running sequence, then chunks of the
waiting prompts with what is left. A long prompt is thus computed a chunk per step while the running
streams keep producing a token every step (mixed prefill + decode steps); in a step that decodes, each
prompt's chunk is capped at ``long_prefill_token_threshold`` tokens so one long prompt cannot stretch the
streams' step, while up to ``max_num_partial_prefills`` prompts advance side by side so that many waiting
prompts still fill the budget (vLLM's names). Prompts in progress hold blocks and stay at the front of
the queue, in admission order. A waiting prompt first takes its longest cached prefix from the block
manager and computes only the rest.

When the KV cache cannot grow, the most recently admitted sequence is preempted: its blocks are
freed (their computed full blocks stay in the prefix cache) and it goes back to the front of the
queue, to be recomputed (prompt plus what it has generated), so nothing is lost.

n > 1: only the first sample of a request is prefilled; the others wait on it (``pending_forks``)
and, in the step that completes its prompt, share its blocks and sample from its logits.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice

from fdpp.engine.block_manager import BlockManager
from fdpp.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step. Decode rows (one token each) come first, then prefill chunks.

    is_prefill: some row computes prompt (or recomputed) tokens; a mixed step also has decode rows.
    copies: ``(src, dst)`` KV blocks to copy before the forward pass (copy-on-write of shared blocks).
    forks: seq_id of a sequence whose prompt completes in this step -> the samples that share its
        blocks and are sampled from the same logits row (n > 1).
    """

    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes in this step
    is_prefill: bool
    copies: list[tuple[int, int]] = field(default_factory=list)
    forks: dict[int, list[Sequence]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0, max_num_partial_prefills: int = 1) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_num_partial_prefills < 1:
            raise ValueError(f"max_num_partial_prefills must be >= 1, got {max_num_partial_prefills}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # > 0: in a step with decode rows, one prompt's chunk is at most this many tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        # prompts computed in chunks at the same time (each holds its blocks between steps)
        self.max_num_partial_prefills = max_num_partial_prefills
        # Prefill phase. The prompts in progress (holding blocks) are a prefix of it.
        self.waiting: deque[Sequence] = deque()
        # Prompt fully computed; decoding.
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        # Tokens computed by prefill rows (prompts and recomputation after preemption): with the
        # prefix cache and shared n > 1 prompts, this is what was not reused.
        self.num_prefill_tokens = 0
        self._last: ScheduledBatch | None = None

    def add(self, seq: Sequence, forks: list[Sequence] | tuple[Sequence, ...] = ()) -> None:
        """Queue ``seq``; ``forks`` are the request's other samples (same prompt, n > 1), which
        share ``seq``'s prompt blocks once it is computed instead of computing it again."""
        seq.pending_forks = list(forks)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of ``request_id``; their blocks are freed. Returns them."""
        removed = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in list(removed):
            removed.extend(seq.pending_forks)
            seq.pending_forks = []
        for seq in removed:
            self.bm.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = deque(s for s in self.running if s.request_id != request_id)
        return removed

    def finish(self, seq: Sequence) -> None:
        """Called by the engine once ``seq`` has produced its last token (or failed)."""
        seq.status = SequenceStatus.FINISHED
        self.bm.free(seq)
        try:
            self.running.remove(seq)
        except ValueError:
            pass
        if seq.pending_forks:
            # It ended before its prompt was computed: the next sample takes its place in the queue.
            heir, *rest = seq.pending_forks
            seq.pending_forks = []
            heir.pending_forks = rest
            self._requeue(heir)

    def schedule(self, skip: frozenset[int] | set[int] = frozenset()) -> ScheduledBatch | None:
        """The next step. ``skip``: seq_ids of running sequences not to decode in it (async
        scheduling: their token in flight is their last one, so they have nothing to compute)."""
        self._commit_last()
        seqs: list[Sequence] = []
        counts: list[int] = []
        copies: list[tuple[int, int]] = []
        preempted = self._schedule_decode(seqs, counts, copies, skip)
        num_decode = len(seqs)
        forks: dict[int, list[Sequence]] = {}
        # NOTE: after a preemption, admit no new prompt this step: the blocks just freed would be
        # taken again at once and the same sequences preempted at the next step. Prompts in progress
        # go on (they may be all that is left to run: the preempted sequence waits behind them).
        budget = self.max_num_batched_tokens - len(seqs)
        cap = self.long_prefill_token_threshold if num_decode and self.long_prefill_token_threshold else None
        self._schedule_prefill(budget, seqs, counts, copies, forks, cap, admit=not preempted)
        if not seqs:
            return None
        batch = ScheduledBatch(seqs, counts, len(seqs) > num_decode, copies, forks)
        self._last = batch
        return batch

    def _commit_last(self) -> None:
        """After a step: offer the blocks it computed to the prefix cache, and requeue samples forked
        in a step that failed (they got no token: their prompt was never computed)."""
        last, self._last = self._last, None
        if last is None:
            return
        for seq in last.seqs:
            self.bm.cache_blocks(seq)
        for children in last.forks.values():
            for child in children:
                if child.status == SequenceStatus.RUNNING and child.num_computed_tokens >= child.num_tokens:
                    self.bm.free(child)
                    child.num_computed_tokens = 0
                    child.status = SequenceStatus.WAITING
                    self.running.remove(child)
                    self._requeue(child)

    def _schedule_decode(self, seqs: list[Sequence], counts: list[int], copies: list[tuple[int, int]],
                         skip: frozenset[int] | set[int] = frozenset()) -> bool:
        """One token for each running sequence, preempting the latest admitted ones when the cache is
        full. Returns whether anything was preempted."""
        preempted = False
        queue = deque(self.running)
        bm = self.bm
        while queue:
            seq = queue.popleft()
            if seq.seq_id in skip:
                continue
            need = bm.blocks_needed(seq, seq.num_tokens)  # 0, or 1 (a new block or a copy-on-write)
            if need:
                while not bm.can_allocate(need):
                    preempted = True
                    if not queue:
                        self._preempt(seq)
                        break
                    self._preempt(queue.pop())  # the latest admitted goes first
                else:
                    copies.extend(bm.allocate(seq, seq.num_tokens))
                if seq.status != SequenceStatus.RUNNING:
                    continue
            seqs.append(seq)
            counts.append(1)
            if len(seqs) >= self.max_num_seqs:
                break
        return preempted

    def _schedule_prefill(self, budget: int, seqs: list[Sequence], counts: list[int],
                          copies: list[tuple[int, int]], forks: dict[int, list[Sequence]],
                          chunk_cap: int | None = None, admit: bool = True) -> None:
        """Prompt chunks with ``budget`` tokens: the prompts in progress first, then (``admit``) new ones."""
        bm = self.bm
        i = 0  # waiting[:i]: prompts left in progress by this step (they keep their blocks)
        while i < len(self.waiting) and budget > 0:
            seq = self.waiting[i]
            fresh = not seq.block_table
            if fresh and not admit:
                break
            # n > 1 samples are admitted together (an empty batch takes any group, so n > max_num_seqs
            # still runs: the decode rows beyond max_num_seqs wait for the first ones to finish)
            if (self.running or i) and len(self.running) + i + 1 + len(seq.pending_forks) > self.max_num_seqs:
                break
            hits = bm.lookup(seq) if fresh else []
            start = len(hits) * bm.block_size if fresh else seq.num_computed_tokens
            chunk = min(seq.num_tokens - start, budget, chunk_cap or budget)
            end = start + chunk
            partial = end < seq.num_tokens
            if fresh and partial and i >= self.max_num_partial_prefills:
                break
            need = bm.blocks_to_admit(hits, end) if fresh else bm.blocks_needed(seq, end)
            if fresh and i:
                # NOTE: beside prompts in progress, a new one is admitted only if the free blocks could
                # also complete all of them and it: partly computed prompts each holding blocks that the
                # others need would wait on each other for ever.
                reserve = sum(bm.blocks_needed(p, p.num_tokens) for p in islice(self.waiting, i))
                if not bm.can_allocate(bm.blocks_to_admit(hits, seq.num_tokens) + reserve):
                    break
            elif not bm.can_allocate(need):
                break
            if fresh:
                bm.admit(seq, hits)
            copies.extend(bm.allocate(seq, end))
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk
            self.num_prefill_tokens += chunk
            if partial:
                i += 1  # a chunk of a long prompt: it stays in the queue, in front of the fresh ones
                continue
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.pending_forks:
                forks[seq.seq_id] = self._fork(seq)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Start the parent's pending samples on its blocks; they are sampled from its logits row in
        the step that completes its prompt, so they count that prompt as computed."""
        children, parent.pending_forks = parent.pending_forks, []
        for child in children:
            self.bm.fork(parent, child)
            child.num_computed_tokens = parent.num_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        return children

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Put ``seq`` at the front of the queue, behind the chunked prefills in progress (they hold blocks)."""
        i = 0
        while i < len(self.waiting) and self.waiting[i].block_table:
            i += 1
        self.waiting.insert(i, seq)
