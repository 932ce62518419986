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
        chunks.append(batch.num_new_tokens[batch.seqs.index(b)])
        _step(s, batch)
    assert chunks == [6, 6, 3]  # capped at 6 per step beside a's decode token
    bm.check_integrity()


def _decoding(s, rid):
    a = _seq(rid, 4)
    s.add(a)
    _step(s, s.schedule())
    return a


def test_capped_prompts_advance_side_by_side_up_to_max_num_partial_prefills():
    bm = BlockManager(256, 4)
    s = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=40, long_prefill_token_threshold=8,
                  max_num_partial_prefills=3)
    a = _decoding(s, "a")
    ps = [Sequence(f"p{i}", list(range(100 * i, 100 * i + 20)), SamplingParams(max_tokens=4), 0.0) for i in range(1, 6)]
    for p in ps:
        s.add(p)
    batch = s.schedule()
    # a decodes; three prompts (the partial-prefill limit) take a capped chunk each; the rest wait
    assert batch.seqs == [a, *ps[:3]] and batch.num_new_tokens == [1, 8, 8, 8]
    _step(s, batch)
    batch = s.schedule()
    assert batch.seqs == [a, *ps[:3]] and batch.num_new_tokens == [1, 8, 8, 8]
    _step(s, batch)
    # the three complete (4 tokens each); a fourth prompt starts with what is left of the budget, capped
    batch = s.schedule()
    assert batch.seqs == [a, *ps] and batch.num_new_tokens == [1, 4, 4, 4, 8, 8]
    _step(s, batch)
    assert [p.num_computed_tokens for p in ps] == [20, 20, 20, 8, 8]
    bm.check_integrity()


def test_one_partial_prefill_computes_one_capped_chunk_per_step():
    bm = BlockManager(256, 4)
    s = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=40, long_prefill_token_threshold=8)
    a = _decoding(s, "a")
    b, c = _seq("b", 20), Sequence("c", list(range(300, 320)), SamplingParams(max_tokens=4), 0.0)
    s.add(b)
    s.add(c)
    batch = s.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 8]  # c waits behind b's chunks
    _step(s, batch)
    assert c.num_computed_tokens == 0 and not c.block_table


def test_no_prompt_joins_partial_prefills_it_could_starve():
    # 13 blocks of 4 tokens: a decodes (2 blocks); b (24 tokens: 6 blocks) starts in chunks of 8, leaving 9
    # free. c (also 6 blocks) would fit them for its first chunk, but then b and c could not both complete.
    bm = BlockManager(13, 4, enable_caching=False)
    s = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=40, long_prefill_token_threshold=8,
                  max_num_partial_prefills=4)
    a = _decoding(s, "a")
    b = _seq("b", 24)
    c = Sequence("c", list(range(300, 324)), SamplingParams(max_tokens=4), 0.0)
    s.add(b)
    s.add(c)
    batch = s.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 8]
    _step(s, batch)
    bm.check_integrity()


def test_random_prompts_with_partial_prefills_all_complete_in_a_small_cache():
    import random

    rng = random.Random(3)
    for trial in range(300):
        bm = BlockManager(rng.randrange(12, 40), 4)
        s = Scheduler(bm, max_num_seqs=rng.randrange(2, 9), max_num_batched_tokens=rng.randrange(8, 48),
                      long_prefill_token_threshold=rng.randrange(0, 10), max_num_partial_prefills=rng.randrange(1, 5))
        seqs = []
        for i in range(rng.randrange(2, 12)):
            shared = rng.random() < 0.3
            toks = [1, 2, 3, 4, 5, 6, 7, 8] if shared else []
            toks += [1000 * (i + 1) + j for j in range(rng.randrange(1, 30))]
            seq = Sequence(f"r{trial}-{i}", toks, SamplingParams(max_tokens=rng.randrange(1, 6)), 0.0)
            seqs.append(seq)
            s.add(seq)
        for _ in range(2000):
            if not s.has_unfinished():
                break
            batch = s.schedule()
            assert batch is not None, (f"nothing schedulable although requests wait: free {bm.num_free_blocks}, "
                                       f"waiting {list(s.waiting)}, running {list(s.running)}")
            _step(s, batch)
            for seq in list(s.running):
                if seq.num_output_tokens >= seq.params.max_tokens:
                    s.finish(seq)
            bm.check_integrity()
            holds = [bool(w.block_table) for w in s.waiting]
            assert holds == sorted(holds, reverse=True), "prompts in progress must lead the queue"
        assert not s.has_unfinished(), f"trial {trial}: requests left after 2000 steps"
