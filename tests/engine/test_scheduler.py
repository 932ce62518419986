"""Scheduler behaviour on block counts alone (no model)."""
from fdpp.engine.block_manager import BlockManager
from fdpp.engine.scheduler import Scheduler
from fdpp.engine.sequence import Sequence, SequenceStatus
from fdpp.sampling_params import SamplingParams


def _seq(rid, n):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=100), 0.0)


def _step(sched, batch):
    """Pretend the model ran: advance computed counts and append a token to sampled sequences."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7)


def test_prefill_then_decode_and_join_between_steps():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = _seq("a", 5)
    s.add(a)
    b1 = s.schedule()
    assert b1.is_prefill and b1.seqs == [a] and b1.num_new_tokens == [5]
    _step(s, b1)
    b2 = s.schedule()
    assert not b2.is_prefill and b2.seqs == [a]
    _step(s, b2)
    b = _seq("b", 3)
    s.add(b)  # joins between steps
    b3 = s.schedule()
    # a mixed step: a's decode token first, then b's prompt
    assert b3.is_prefill and b3.seqs == [a, b] and b3.num_new_tokens == [1, 3]
    _step(s, b3)
    b4 = s.schedule()
    assert not b4.is_prefill and set(x.request_id for x in b4.seqs) == {"a", "b"}
    bm.check_integrity()


def test_chunked_prefill_respects_token_budget():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a = _seq("a", 20)
    s.add(a)
    chunks = []
    while a.num_computed_tokens < 20:
        batch = s.schedule()
        assert batch.is_prefill
        chunks.append(batch.num_new_tokens[0])
        _step(s, batch)
    assert chunks == [8, 8, 4]
    assert a.status == SequenceStatus.RUNNING


def test_preemption_frees_blocks_and_requeues_without_loss():
    bm = BlockManager(6, 4)  # 24 token slots
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq("a", 8), _seq("b", 8)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert batch.is_prefill and len(batch.seqs) == 2  # 4 blocks used
    _step(s, batch)
    # decode until the cache runs out and b is preempted
    preempted = False
    for _ in range(20):
        batch = s.schedule()
        if s.num_preemptions:
            preempted = True
        _step(s, batch)
        bm.check_integrity()
        if preempted:
            break
    assert preempted
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_output_tokens >= 1  # what it generated is kept and will be recomputed
    assert s.waiting[0] is b


def test_abort_frees_blocks():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = _seq("a", 10)
    s.add(a)
    _step(s, s.schedule())
    removed = s.abort("a")
    assert removed == [a] and a.finish_reason == "abort"
    assert bm.num_free_blocks == 16 and not s.has_unfinished()
    bm.check_integrity()


def test_long_prefill_threshold_caps_a_prompt_chunk_only_while_streams_decode():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, long_prefill_token_threshold=6)
    a = _seq("a", 20)
    s.add(a)
    first = s.schedule()
    assert first.num_new_tokens == [20]  # nothing decodes yet: the whole budget
    _step(s, first)
    b = Sequence("b", list(range(100, 115)), SamplingParams(max_tokens=100), 0.0)  # no prefix shared with a
    c = Sequence("c", list(range(200, 203)), SamplingParams(max_tokens=100), 0.0)
    s.add(b)
    s.add(c)
    chunks = []
    while b.num_computed_tokens < 15:  # b's prompt
        batch = s.schedule()
        assert batch.seqs[0] is a and batch.num_new_tokens[0] == 1  # a decodes every step
        chunks.append(batch.num_new_tokens[1])
        _step(s, batch)
    assert chunks == [6, 6, 3]  # capped at 6 per step beside a's decode token
    bm.check_integrity()
