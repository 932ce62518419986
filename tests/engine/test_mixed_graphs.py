"""Mixed steps (decode rows + one prompt chunk) through the padded static step that a mixed CUDA graph
captures (``ModelRunner.mixed_step``), and prefill steps of one prompt chunk through the padded static step
of a prefill graph (``ModelRunner.prefill_step``), run eagerly on the CPU: the sampled rows' logits equal
the eager step's, the KV cache afterwards is the eager step's, and padded rows write nothing."""
from dataclasses import replace

import pytest
import torch

from fdpp import SamplingParams
from fdpp.engine import cuda_graph as cg
from fdpp.engine import model_runner as mr
from fdpp.engine.model_runner import DeviceTokens
from fdpp.engine.scheduler import ScheduledBatch
from fdpp.engine.sequence import Sequence

C = 16  # the chunk the static step is padded to
BUCKETS = [1, 2, 4]
SENTINEL = 0.125  # every cache entry before a case: an entry the step did not write keeps it exactly


@pytest.fixture
def runner(tiny_llm, monkeypatch):
    """The shared tiny engine's runner (block size 16, 64 blocks); its cache is restored afterwards.
    ``runner.logits``: the logits each ``execute`` sampled from."""
    r = tiny_llm.engine.runner
    saved = r.kv_cache.clone()
    r.logits = []
    real = mr.sample

    def sample(logits, batch):
        r.logits.append(logits.clone())
        return real(logits, batch)

    monkeypatch.setattr(mr, "sample", sample)
    try:
        yield r
    finally:
        r.init_mixed_inputs(0, [])
        r.init_prefill_inputs([])
        r.kv_cache.copy_(saved)
        del r.logits


class _Blocks:
    """Hands out KV blocks from 1 on: block 0 stays unused, so a padded row writing slot 0 shows."""

    def __init__(self) -> None:
        self.next = 1

    def table(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // 16)
        self.next += n
        return list(range(self.next - n, self.next))


def _seq(tokens: list[int], blocks: _Blocks) -> Sequence:
    s = Sequence("mixed", tokens, SamplingParams(temperature=0, max_tokens=4), 0.0)
    s.block_table = blocks.table(len(tokens) + 1)
    return s


def _computed(runner, seq: Sequence, k: int) -> None:
    """Write the K/V of ``seq``'s first ``k`` tokens (an eager prefill) and mark them computed."""
    if k:
        runner.execute(ScheduledBatch([seq], [k], True))
    seq.num_computed_tokens = k


def _setup(runner, nd: int, prompt_len: int, prefix: int, n: int, seed: int):
    """nd decode rows (contexts of 7, 20, 33... tokens) and one prompt of ``prompt_len`` tokens whose
    first ``prefix`` are computed; the step computes its next ``n``."""
    g = torch.Generator().manual_seed(seed)
    blocks = _Blocks()
    decode = []
    for i in range(nd):
        length = 7 + 13 * i
        s = _seq(torch.randint(0, 128, (length,), generator=g).tolist(), blocks)
        _computed(runner, s, length - 1)
        decode.append(s)
    chunk = _seq(torch.randint(0, 128, (prompt_len,), generator=g).tolist(), blocks)
    _computed(runner, chunk, prefix)
    return ScheduledBatch(decode + [chunk], [1] * nd + [n], True)


def _step(runner, batch, static: bool, device_tokens=None):
    runner.init_mixed_inputs(C if static else 0, BUCKETS if static else [])
    before = runner.num_mixed_replays
    seqs, out = runner.execute(batch, device_tokens)
    assert runner.num_mixed_replays - before == int(static), "the step did not take the expected path"
    return seqs, runner.logits[-1], out.token_ids


@pytest.mark.parametrize("nd, prompt_len, prefix, n", [
    (1, 40, 0, C),  # a full chunk, the prompt goes on
    (3, 5, 0, 5),  # a short prompt completes; bucket 4 has a padded decode row
    (2, 36, 20, C),  # a full chunk on a cached prefix (a partial block) completes the prompt
    (4, 40, 16, 9),  # a partial chunk on a cached prefix, the prompt goes on
])
def test_static_mixed_step_matches_the_eager_step(runner, nd, prompt_len, prefix, n):
    r = runner
    r.kv_cache.fill_(SENTINEL)
    batch = _setup(r, nd, prompt_len, prefix, n, seed=nd)
    (seqs_e, logits_e, tokens_e), (seqs_s, logits_s, tokens_s) = _eager_then_static(r, batch, _step)
    completes = prefix + n == prompt_len
    assert [s.seq_id for s in seqs_s] == [s.seq_id for s in seqs_e]
    assert len(seqs_s) == nd + completes
    assert logits_s.shape == logits_e.shape
    torch.testing.assert_close(logits_s, logits_e, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens_s, tokens_e)


def _eager_then_static(runner, batch, step) -> tuple:
    """Run ``batch`` eagerly, then (the cache put back) through the static step: both results of
    ``step(runner, batch, static)``. Asserts the static step wrote the eager step's cache entries, to the
    same values, and nothing else (the sentinel stays in every other entry, block 0 included)."""
    before = runner.kv_cache.clone()
    eager = step(runner, batch, False)
    cache_e = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    static = step(runner, batch, True)
    written = cache_e != before
    assert written.any()
    assert torch.equal(runner.kv_cache != before, written)
    assert not written[:, :, 0].any()  # padded rows (slot -1) wrote nothing
    torch.testing.assert_close(runner.kv_cache, cache_e, atol=1e-5, rtol=1e-5)
    return eager, static


def test_static_mixed_step_takes_device_tokens(runner):
    """Async scheduling: decode rows' ids from the device (the previous step's samples), reordered."""
    r = runner
    r.kv_cache.fill_(SENTINEL)
    batch = _setup(r, 2, 12, 0, 12, seed=7)
    dev = DeviceTokens(torch.tensor([5, 77, 3]), rows=[0, 1], src_rows=[2, 1])
    before = r.kv_cache.clone()
    _, logits_e, _ = _step(r, batch, static=False, device_tokens=dev)
    cache_e = r.kv_cache.clone()
    r.kv_cache.copy_(before)
    _, logits_s, _ = _step(r, batch, static=True, device_tokens=dev)
    torch.testing.assert_close(logits_s, logits_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.kv_cache, cache_e, atol=1e-5, rtol=1e-5)


def _with_second_prompt(b: ScheduledBatch) -> ScheduledBatch:
    """``b`` with a second prompt chunk (6 tokens in block 60) after its rows."""
    extra = _seq(list(range(6)), _Blocks())
    extra.block_table = [60]
    return ScheduledBatch(b.seqs + [extra], b.num_new_tokens + [6], True)


def _with_prompt_logprobs(b: ScheduledBatch) -> ScheduledBatch:
    b.seqs[-1].prompt_logprobs = [None]
    return b


def _assert_eager(runner, cases: list[ScheduledBatch], counter: str) -> None:
    """Each step runs eagerly: the runner's static-step ``counter`` does not move."""
    for b in cases:
        before = getattr(runner, counter)
        runner.execute(b)
        assert getattr(runner, counter) == before


def test_other_steps_stay_eager(runner):
    """Too long a chunk, two chunks, prompt logprobs, more decode rows than the largest bucket, no
    decode row: the eager step (the counter does not move)."""
    r = runner
    r.init_mixed_inputs(C, BUCKETS)
    cases = [_setup(r, 1, 40, 0, C + 1, seed=1), _with_second_prompt(_setup(r, 1, 10, 0, 10, seed=2)),
             _with_prompt_logprobs(_setup(r, 2, 10, 0, 10, seed=3))]
    cases.append(_setup(r, 5, 10, 0, 10, seed=4))
    cases.append(_setup(r, 0, 10, 0, 10, seed=5))
    _assert_eager(r, cases, "num_mixed_replays")
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        r.init_mixed_inputs(-1, BUCKETS)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_mixed_steps_through_the_static_step(tiny_llm, async_scheduling):
    """The engine end to end: streams decode while a long prompt's chunks (capped at C) ride with them,
    its last chunk forking n = 2; the static mixed steps give the eager steps' tokens."""
    eng = tiny_llm.engine
    r, sched = eng.runner, eng.scheduler
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 17, 9, 100)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 3
    params.append(SamplingParams(temperature=0, max_tokens=3, n=2, ignore_eos=True))
    saved = (sched.long_prefill_token_threshold, sched.max_num_batched_tokens, eng.async_scheduling)
    sched.long_prefill_token_threshold, sched.max_num_batched_tokens = C, 31 + C  # step 1: 3 prompts + C
    eng.async_scheduling = async_scheduling
    runs = []
    try:
        for static in (False, True):
            eng.reset_prefix_cache()
            r.init_mixed_inputs(C if static else 0, BUCKETS if static else [])
            before = r.num_mixed_replays
            outs = tiny_llm.generate(prompts, params, use_tqdm=False)
            eng.check_integrity()
            runs.append([[c.token_ids for c in o.outputs] for o in outs])
            # 100 - 16 = 84 tokens in chunks of 16 while the streams decode: 6 mixed steps
            assert r.num_mixed_replays - before == (6 if static else 0)
    finally:
        r.init_mixed_inputs(0, [])
        sched.long_prefill_token_threshold, sched.max_num_batched_tokens, eng.async_scheduling = saved
    assert runs[1] == runs[0]
    assert all(len(t) == 12 for o in runs[0][:3] for t in o) and len(runs[0][3]) == 2


@pytest.mark.parametrize("nd", [1, 2, 3, 5])
def test_eager_mixed_step_tensors_keep_one_triton_specialization(runner, nd):
    """Triton compiles a kernel variant per alignment of a pointer argument and per class of an int (1,
    multiple of 16, other): the prefill part of an eager mixed step must hand it 16-byte aligned context
    lengths and block-table rows, and a block-table stride that is a multiple of 16, whatever the number
    of decode rows and the table widths (each new variant is a ~1 s compile in the middle of serving)."""
    blocks = _Blocks()
    decode = [_seq(list(range(3, 3 + 5 + i)), blocks) for i in range(nd)]
    for s in decode:
        s.num_computed_tokens = s.num_tokens - 1
    chunk = _seq(list(range(40, 40 + 37)), blocks)
    batch = ScheduledBatch([*decode, chunk], [1] * nd + [37], True)
    _, _, meta, _, _ = runner.prepare(batch)
    part = meta.prefill_part
    assert meta.decode_part is not None and part is not None
    for t in (part.context_lens, part.block_tables, part.cu_seqlens_q, meta.decode_part.block_tables):
        assert t.data_ptr() % 16 == 0
    assert meta.block_tables.stride(0) % 16 == 0
    assert part.context_lens.tolist() == [37]


def test_fresh_prefill_flag(runner):
    """Only a step whose sequences all start at token 0 is a fresh prefill (the TMA prefill kernel reads
    the step's own k/v and would recompute a cached prefix in its slow fallback)."""
    blocks = _Blocks()
    a = _seq(list(range(1, 30)), blocks)
    b = _seq(list(range(2, 12)), blocks)
    *_, meta, _, _ = runner.prepare(ScheduledBatch([a, b], [29, 10], True))
    assert meta.is_prefill and meta.fresh_prefill
    *_, meta, _, _ = runner.prepare(ScheduledBatch([a], [16], True))  # the first chunk of a
    assert meta.fresh_prefill
    a.num_computed_tokens = 16  # the next chunk sees a computed prefix
    *_, meta, _, _ = runner.prepare(ScheduledBatch([a, b], [13, 10], True))
    assert meta.is_prefill and not meta.fresh_prefill
    batch = _setup(runner, 1, 20, 0, 16, seed=3)  # mixed: decode rows are never fresh
    *_, meta, _, _ = runner.prepare(batch)
    assert not meta.fresh_prefill and not meta.prefill_part.fresh_prefill


def test_tma_dispatch_only_for_fresh_prefills(monkeypatch):
    """attention() offers a prefill to the TMA kernel only when the metadata says fresh_prefill."""
    from fdpp.ops import attention as ops
    calls = []

    def dispatch(*args, **kw):
        calls.append(args[3].fresh_prefill)

    monkeypatch.setattr(ops, "prefill_tma_dispatch", dispatch)
    monkeypatch.setattr(ops, "attention_backend", lambda device: "triton")  # the kernels' path, interpreted
    q = torch.randn(4, 2, 16)
    cache = torch.randn(2, 16, 2, 16)
    for fresh in (True, False):
        meta = ops.AttentionMetadata(
            is_prefill=True, context_lens=torch.tensor([4], dtype=torch.int32),
            block_tables=torch.tensor([[0]], dtype=torch.int32), slot_mapping=torch.arange(4),
            cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32), max_seqlen_q=4, max_context_len=4,
            fresh_prefill=fresh)
        ops.attention(q, cache, cache, meta, scale=0.25, layer_idx=0)
    assert calls == [True]


def test_unequal_decode_rows_get_balanced_splits(runner, monkeypatch):
    """An eager decode step with one long row among short ones carries the balanced split count in its
    metadata (thresholds lowered to the tiny cache's sizes), and attention with it equals the unsplit one."""
    from fdpp.kernels import attention_decode as ad
    from fdpp.ops import attention as ops
    monkeypatch.setattr(ad, "DECODE_BALANCE_MIN_TOKENS", 64)
    monkeypatch.setattr(ad, "DECODE_MIN_TOKENS_PER_SPLIT", 16)
    # attention is called below without the step's own K/V write: each row's last slot must hold a finite
    # value, not what the cache held before (torch.empty: NaN in CI, 2026-12-03)
    runner.kv_cache.uniform_(-1, 1)
    blocks = _Blocks()
    g = torch.Generator().manual_seed(5)
    seqs = []
    for n in (200, 7, 7, 7, 7, 7):
        s = _seq(torch.randint(0, 128, (n,), generator=g).tolist(), blocks)
        _computed(runner, s, n - 1)
        seqs.append(s)
    *_, meta, _, _ = runner.prepare(ScheduledBatch(seqs, [1] * 6, True))
    assert meta.decode_num_splits is not None and meta.decode_num_splits > 1
    *_, even, _, _ = runner.prepare(ScheduledBatch(seqs[1:], [1] * 5, True))
    assert even.decode_num_splits is None  # equal rows: the batch's own split count
    monkeypatch.setattr(ops, "attention_backend", lambda device: "triton")
    kc, vc = runner.kv_cache[0, 0], runner.kv_cache[0, 1]
    q = torch.randn(6, 2 * kc.shape[2], kc.shape[3], generator=g)
    split = ops.attention(q, kc, vc, meta, scale=0.25, layer_idx=0)
    meta.decode_num_splits = None
    whole = ops.attention(q, kc, vc, meta, scale=0.25, layer_idx=0)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("max_batch", "want"), [
    (1, [1]), (5, [1, 2, 4, 5]), (32, [1, 2, 4, 8, 16, 24, 32]), (33, [1, 2, 4, 8, 16, 24, 32, 33]),
    (256, list(cg.GRAPH_BUCKETS)), (300, [*cg.GRAPH_BUCKETS, 300]), (0, []),
])
def test_graph_buckets_end_at_max_batch(max_batch, want):
    """The decode graph buckets end at the engine's max batch, so a full batch never runs eagerly."""
    assert cg.graph_bucket_sizes(max_batch) == want


def test_graph_block_tables_share_the_eager_stride_class():
    """The graphs' block tables are as wide as a multiple of 16, like an eager step's: Triton specializes on
    the stride's divisibility by 16, so another width would need kernel variants no capture compiled."""
    inp = cg._GraphInputs(4, 4, 3, 1028, torch.device("cpu"))
    assert inp.tables.shape == (3, 1040) and inp.tables.stride(0) % 16 == 0
    assert cg._GraphInputs(4, 4, 3, 64, torch.device("cpu")).tables.shape == (3, 64)


# ---- prefill steps (one prompt chunk, no decode rows) ---------------------------------------------------
PREFILL_BUCKETS = [16, 32, 64]


def _prefill_step(runner, batch, static: bool, device_tokens=None):
    runner.init_prefill_inputs(PREFILL_BUCKETS if static else [])
    before = runner.num_prefill_replays
    seqs, out = runner.execute(batch, device_tokens)
    assert runner.num_prefill_replays - before == int(static), "the step did not take the expected path"
    return seqs, (runner.logits[-1] if out is not None else None), (out.token_ids if out is not None else None)


@pytest.mark.parametrize("prompt_len, prefix, n", [
    (5, 0, 5),  # a short prompt: bucket 16, 11 padded rows
    (16, 0, 16),  # exactly a bucket
    (40, 0, 40),  # bucket 64, across block boundaries
    (36, 20, 16),  # the last chunk on a cached prefix (a partial block)
    (60, 16, 30),  # a chunk that does not complete its prompt: nothing sampled
])
def test_static_prefill_step_matches_the_eager_step(runner, prompt_len, prefix, n):
    r = runner
    r.kv_cache.fill_(SENTINEL)
    batch = _setup(r, 0, prompt_len, prefix, n, seed=prompt_len)
    r.logits.clear()
    (seqs_e, logits_e, tokens_e), (seqs_s, logits_s, tokens_s) = _eager_then_static(r, batch, _prefill_step)
    completes = prefix + n == prompt_len
    assert [s.seq_id for s in seqs_s] == [s.seq_id for s in seqs_e]
    assert len(seqs_s) == int(completes) and (logits_s is None) == (not completes) and len(r.logits) == 2 * completes
    if completes:
        assert logits_s.shape == logits_e.shape == (1, logits_e.shape[1])
        torch.testing.assert_close(logits_s, logits_e, atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens_s, tokens_e)


def test_static_prefill_step_forks_its_samples(runner):
    """n = 2: the completing prompt's one logits row is sampled for each fork, as in the eager step."""
    r = runner
    batch = _setup(r, 0, 9, 0, 9, seed=11)
    seq = batch.seqs[0]
    child = Sequence("fork", list(seq.token_ids), seq.params, 0.0)
    batch.forks = {seq.seq_id: [child]}
    outs = []
    for static in (False, True):
        seqs, logits, tokens = _prefill_step(r, batch, static)
        assert [s.seq_id for s in seqs] == [seq.seq_id, child.seq_id]
        outs.append((logits, tokens))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[1][1], outs[0][1])


def test_other_prefill_steps_stay_eager(runner):
    """Two prompts, a chunk longer than the largest bucket, prompt logprobs, a step with decode rows (the
    mixed path's, off here): the eager step (the counter does not move)."""
    r = runner
    r.init_prefill_inputs(PREFILL_BUCKETS)
    cases = [_setup(r, 0, 65, 0, 65, seed=1), _with_second_prompt(_setup(r, 0, 10, 0, 10, seed=2)),
             _with_prompt_logprobs(_setup(r, 0, 10, 0, 10, seed=3)), _setup(r, 2, 10, 0, 10, seed=4)]
    _assert_eager(r, cases, "num_prefill_replays")
    with pytest.raises(ValueError, match="positive multiples of 16"):
        r.init_prefill_inputs([16, 24])


@pytest.mark.parametrize(("max_tokens", "budget", "model_len", "want"), [
    (512, 2048, 4096, [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]),
    (512, 256, 4096, [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]),  # the step's token budget caps it
    (1024, 2048, 300, [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]),  # so does the model length
    (0, 2048, 4096, []), (8, 2048, 4096, []),
])
def test_prefill_graph_sizes(max_tokens, budget, model_len, want):
    assert cg.prefill_graph_sizes(max_tokens, budget, model_len) == want


def test_prefill_buckets_pad_little():
    """Above 64 tokens no prompt is padded by more than 1/4 (its bucket's device work over its own)."""
    sizes = cg.PREFILL_GRAPH_TOKENS
    assert all(t % 16 == 0 for t in sizes) and list(sizes) == sorted(sizes)
    assert all(b / (a + 1) <= 1.25 for a, b in zip(sizes, sizes[1:]) if a >= 64)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_prefills_through_the_static_step(tiny_llm, async_scheduling):
    """The engine end to end: prompts arriving one at a time while nothing decodes are prefilled through the
    static step (a long one in chunks: its first chunks up to the largest bucket, the rest eagerly), and
    give the eager steps' tokens; n = 2 forks the sample of a static step."""
    eng = tiny_llm.engine
    r = eng.runner
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 33, 64)]
    saved = eng.async_scheduling
    eng.async_scheduling = async_scheduling
    runs = []
    try:
        for static in (False, True):
            eng.reset_prefix_cache()
            r.init_prefill_inputs(PREFILL_BUCKETS if static else [])
            before = r.num_prefill_replays
            outs = []
            for i, p in enumerate(prompts):  # one at a time: each prefill step holds one prompt only
                params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2 if i == 1 else 1)
                outs += tiny_llm.generate([p], params, use_tqdm=False)
            eng.check_integrity()
            runs.append([[c.token_ids for c in o.outputs] for o in outs])
            assert r.num_prefill_replays - before == (3 if static else 0)
    finally:
        r.init_prefill_inputs([])
        eng.async_scheduling = saved
    assert runs[1] == runs[0]
    assert [len(o) for o in runs[0]] == [1, 2, 1] and all(len(t) == 6 for o in runs[0] for t in o)


@pytest.mark.parametrize("prompt_len, prefix, n", [(5, 0, 5), (36, 20, 16)])
def test_static_prefill_step_through_the_triton_kernels(runner, monkeypatch, prompt_len, prefix, n):
    """The padded static prefill step through the paged prefill kernel (Triton's interpreter here, the
    graphs' route on a GPU): padded query rows past the chunk and the max_model_len grid give the eager
    step's logits and cache."""
    from fdpp.ops import attention as ops
    monkeypatch.setattr(ops, "attention_backend", lambda device: "triton")
    r = runner
    r.kv_cache.fill_(SENTINEL)
    batch = _setup(r, 0, prompt_len, prefix, n, seed=prompt_len + 1)
    (_, logits_e, tokens_e), (_, logits_s, tokens_s) = _eager_then_static(r, batch, _prefill_step)
    torch.testing.assert_close(logits_s, logits_e, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens_s, tokens_e)


def test_engine_captures_the_graphs_its_config_asks_for(tiny_llm, monkeypatch):
    """LLMEngine.capture_cuda_graphs (start-up on CUDA, and benchmarks that change the forward) hands the
    runner the config's decode buckets, mixed chunk, balanced decode and prefill buckets (capped by the step
    budget and the model length)."""
    eng = tiny_llm.engine
    seen = {}
    monkeypatch.setattr(eng.runner, "capture_cuda_graphs", lambda bs, **kw: seen.update(bs=bs, **kw))
    monkeypatch.setattr(eng.scheduler, "long_prefill_token_threshold", 48)
    eng.capture_cuda_graphs()
    assert seen == {"bs": eng.config.max_num_seqs, "show_progress": eng.config.show_progress, "mixed_chunk_tokens": 48,
                    "balanced_decode": True,
                    "prefill_tokens": cg.prefill_graph_sizes(1024, eng.max_num_batched_tokens, eng.max_model_len)}
    assert seen["prefill_tokens"] and seen["prefill_tokens"][-1] <= min(eng.max_num_batched_tokens, eng.max_model_len)
    monkeypatch.setattr(eng, "config", replace(eng.config, cuda_graph_mixed=False, cuda_graph_prefill_max_tokens=0))
    eng.capture_cuda_graphs(3)
    assert seen["bs"] == 3 and seen["mixed_chunk_tokens"] == 0 and seen["prefill_tokens"] == []


def test_negative_prefill_graph_tokens_are_refused(tiny_llama_dir):
    from fdpp import LLM
    from fdpp.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="cuda_graph_prefill_max_tokens must be >= 0"):
        LLM(tiny_llama_dir, dtype="float32", device="cpu", show_progress=False, calibration="off", num_blocks=16,
            cuda_graph_prefill_max_tokens=-1)


@pytest.mark.parametrize("start, end", [(0, 5), (3, 64), (0, 200), (17, 250)])
def test_slots_short_and_long(runner, start, end):
    """A chunk's cache slots: the per-token rule, whichever path (list or numpy) computes them."""
    seq = _seq(list(range(1, 260)), _Blocks())
    bs = runner.block_size
    want = [seq.block_table[t // bs] * bs + t % bs for t in range(start, end)]
    got = runner._slots(seq, start, end)
    assert got == want and all(type(v) is int for v in got)


def test_prefill_tma_route_for_chunks_that_start_their_prompt(runner, monkeypatch):
    """FDPP_PREFILL_GRAPH_TMA=1 (where the TMA kernel exists; forced here): buckets from
    PREFILL_TMA_GRAPH_MIN_TOKENS on also get the TMA route's static step, taken by a chunk with no cached
    prefix only; a chunk on a prefix, or a smaller bucket, keeps the paged route. Same logits either way
    (the TMA kernel itself is GPU-only: here attention() falls back to the paged kernel)."""
    monkeypatch.setenv("FDPP_PREFILL_GRAPH_TMA", "1")
    monkeypatch.setattr(cg, "prefill_tma_available", lambda *a: True)
    monkeypatch.setattr(cg, "PREFILL_TMA_GRAPH_MIN_TOKENS", 32)
    r = runner
    r.kv_cache.fill_(SENTINEL)

    def step(runner, batch, static):
        runner.init_prefill_inputs(PREFILL_BUCKETS if static else [])
        if static:
            assert runner.prefill_tma_token_sizes == [32, 64]
        before = runner.num_prefill_tma_replays
        seqs, out = runner.execute(batch)
        return runner.num_prefill_tma_replays - before, runner.logits[-1], out.token_ids

    for prompt_len, prefix, n, tma in [(40, 0, 40, 1), (10, 0, 10, 0), (36, 20, 16, 0)]:
        batch = _setup(r, 0, prompt_len, prefix, n, seed=prompt_len + 3)
        (_, logits_e, tokens_e), (used, logits_s, tokens_s) = _eager_then_static(r, batch, step)
        assert used == tma, (prompt_len, prefix)
        torch.testing.assert_close(logits_s, logits_e, atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens_s, tokens_e)
