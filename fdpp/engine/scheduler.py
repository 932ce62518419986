"""Continuous batching: which sequences run in the next step, and with how many tokens.

Plain Python over block counts; it never touches tensors. A step is either a prefill step (new
prompts, possibly a chunk of a long prompt) or a decode step (one token for each running sequence).
Prefill goes first, so new requests join the batch between decode steps. When the KV cache cannot
grow, the most recently admitted sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed (prompt plus what it has generated), so nothing is lost.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fdpp.engine.block_manager import BlockManager
from fdpp.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes in this step
    is_prefill: bool

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Prefill phase; only the head may hold blocks (a chunked prefill in progress).
        self.waiting: deque[Sequence] = deque()
        # Prompt fully computed; decoding.
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of ``request_id``; their blocks are freed. Returns them."""
        removed = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in removed:
            self.bm.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = deque(s for s in self.running if s.request_id != request_id)
        return removed

    def finish(self, seq: Sequence) -> None:
        """Called by the engine once ``seq`` has produced its last token."""
        seq.status = SequenceStatus.FINISHED
        self.bm.free(seq)
        try:
            self.running.remove(seq)
        except ValueError:
            pass

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            chunk = min(seq.num_uncomputed_tokens, budget)
            need = self.bm.blocks_needed(seq, seq.num_computed_tokens + chunk)
            if not self.bm.can_allocate(need):
                break
            self.bm.allocate(seq, seq.num_computed_tokens + chunk)
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk
            if chunk < seq.num_uncomputed_tokens:
                break  # a chunk of a long prompt: it stays at the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return ScheduledBatch(seqs, counts, True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        queue = deque(self.running)
        bm = self.bm
        while queue:
            seq = queue.popleft()
            need = bm.blocks_needed(seq, seq.num_tokens)  # 0 or 1: one new token per step
            if need:
                while not bm.can_allocate(need):
                    if not queue:
                        self._preempt(seq)
                        break
                    self._preempt(queue.pop())  # the latest admitted goes first
                else:
                    bm.allocate(seq, seq.num_tokens)
                if seq.status != SequenceStatus.RUNNING:
                    continue
            seqs.append(seq)
            if len(seqs) >= self.max_num_seqs:
                break
        return ScheduledBatch(seqs, [1] * len(seqs), False) if seqs else None

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        # Keep a chunked prefill in progress at the head: it holds blocks.
        head = self.waiting[0] if self.waiting else None
        if head is not None and head.block_table:
            self.waiting.insert(1, seq)
        else:
            self.waiting.appendleft(seq)
