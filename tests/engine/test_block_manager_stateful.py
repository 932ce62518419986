"""A stateful hypothesis test of the block manager: random allocate / decode / fork / free / evict
sequences, with a model of the device's KV contents that checks every computed token reads back."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fdpp.engine.block_manager import BlockManager
from fdpp.engine.sequence import Sequence
from fdpp.sampling_params import SamplingParams

BLOCK = 4
# a small alphabet and a few shared stems, so prompts share prefixes and the cache gets hits
TOKENS = st.integers(0, 2)
STEMS = [[1, 2, 0, 1, 2, 2, 0, 1, 1], [2, 2, 2, 2, 0, 0, 0, 0, 1, 2, 1]]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=10, block_size=BLOCK, enable_caching=True)
        self.seqs: list[Sequence] = []
        # the "device": slot -> the token prefix whose K/V the slot holds (K/V at a position depends on
        # every token up to it, so a slot is right exactly when it holds that whole prefix)
        self.kv: dict[int, tuple[int, ...]] = {}

    # ---- the device side, as the model runner does it ----------------------------------------------
    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // BLOCK] * BLOCK + pos % BLOCK

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            for off in range(BLOCK):
                if src * BLOCK + off in self.kv:
                    self.kv[dst * BLOCK + off] = self.kv[src * BLOCK + off]
                else:
                    self.kv.pop(dst * BLOCK + off, None)

    def _compute(self, seq: Sequence, end: int) -> None:
        """Write the K/V of tokens [num_computed, end), as a step would, then mark them computed."""
        for pos in range(seq.num_computed_tokens, end):
            self.kv[self._slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens = end
        self.bm.cache_blocks(seq)

    def _check_reads(self, seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            assert self.kv.get(self._slot(seq, pos)) == tuple(seq.token_ids[: pos + 1]), (
                f"seq {seq.seq_id} reads wrong K/V at position {pos}"
            )

    # ---- rules ---------------------------------------------------------------------------------------
    @rule(stem=st.sampled_from([None, 0, 1]), stem_len=st.integers(0, 11), tail=st.lists(TOKENS, max_size=8),
          last=TOKENS)
    def new_sequence(self, stem, stem_len, tail, last):
        prompt = (STEMS[stem][:stem_len] if stem is not None else []) + tail + [last]
        seq = Sequence("r", prompt, SamplingParams(), 0.0)
        hits = self.bm.lookup(seq)
        assert len(hits) * BLOCK <= seq.num_tokens - 1  # always at least one token left to compute
        if not self.bm.can_allocate(self.bm.blocks_to_admit(hits, seq.num_tokens)):
            return
        self.bm.admit(seq, hits)
        self._check_reads(seq)  # the cached prefix really holds these tokens' K/V
        self._copy(self.bm.allocate(seq, seq.num_tokens))
        self._compute(seq, seq.num_tokens)
        seq.append_token(last)  # the sampled token, not computed yet
        self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100), tok=TOKENS)
    def decode(self, i, tok):
        seq = self.seqs[i % len(self.seqs)]
        if not self.bm.can_allocate(self.bm.blocks_needed(seq, seq.num_tokens)):
            return
        self._copy(self.bm.allocate(seq, seq.num_tokens))
        self._compute(seq, seq.num_tokens)
        seq.append_token(tok)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100), tok=TOKENS)
    def fork(self, i, tok):
        parent = self.seqs[i % len(self.seqs)]
        # a sample of the same prompt: the same computed tokens, its own (uncomputed) last token
        child = Sequence("r", parent.token_ids[:-1] + [tok], SamplingParams(), 0.0)
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        seq = self.seqs.pop(i % len(self.seqs))
        self.bm.free(seq)
        assert seq.block_table == []

    @rule()
    def reset_cache(self):
        self.bm.reset_cache()
        assert not self.bm.evictable

    @invariant()
    def consistent(self):
        self.bm.check_integrity()
        for seq in self.seqs:
            self._check_reads(seq)


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
