"""A sequence: one completion being generated (a request with n > 1 has several)."""
from __future__ import annotations

import enum
import itertools
from typing import Any

from fdpp.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_counter = itertools.count()

# A token sampled on the device whose value the host has not read yet (async scheduling): it
# counts as a token for scheduling and block accounting, and is replaced by the real id one step late.
PLACEHOLDER_TOKEN = -1


class Sequence:
    """Token ids and KV-cache bookkeeping of one sequence.

    Invariants: ``num_computed_tokens <= num_tokens``; the first ``num_computed_tokens`` tokens have
    their K/V in the blocks of ``block_table``; a WAITING sequence has no blocks.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float):
        self.seq_id = next(_counter)
        self.request_id = request_id
        self.params = params
        self.arrival_time = arrival
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # generated-token counts for presence/frequency penalties
        self.output_counts: dict[int, int] = {}
        # Prefix caching (BlockManager): the chained hash of each full block of token_ids, computed
        # as blocks fill; ``cache_extra_key`` is mixed into the chain's seed, for anything besides
        # the tokens that changes the KV (a LoRA adapter, a per-tenant cache salt).
        self.block_hashes: list[bytes] = []
        self.cache_extra_key: tuple = ()
        # Prompt tokens found in the prefix cache at the first admission (RequestOutput.num_cached_tokens).
        self.num_cached_tokens: int | None = None
        # n > 1: the request's other samples. They wait here, without blocks, until this sequence's
        # prompt is computed; then they share its blocks (Scheduler.fork_pending).
        self.pending_forks: list[Sequence] = []
        # structured output: the grammar matcher (fdpp.structured), advanced by every sampled token
        self.grammar: Any = None
        # [None, {prompt token 1 id: logprob, top k...}, ...] while prompt logprobs are asked for
        self.prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        """Add a sampled token; it replaces the placeholder of the last token if there is one."""
        if self.token_ids[-1] == PLACEHOLDER_TOKEN:
            self.token_ids[-1] = token_id
        else:
            self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

    def append_placeholder(self) -> None:
        """Reserve the next token, sampled on the device but not read yet (async scheduling)."""
        if self.token_ids[-1] == PLACEHOLDER_TOKEN:
            raise RuntimeError(f"{self!r} already has a token the host has not read")
        self.token_ids.append(PLACEHOLDER_TOKEN)

    def drop_placeholder(self) -> None:
        """Forget an unread token (an aborted sequence), so no block is hashed with it."""
        if self.token_ids[-1] == PLACEHOLDER_TOKEN:
            self.token_ids.pop()
            self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)

    @property
    def has_placeholder(self) -> bool:
        return self.token_ids[-1] == PLACEHOLDER_TOKEN

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
