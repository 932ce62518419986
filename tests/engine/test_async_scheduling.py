"""Async scheduling (step t+1 planned while step t runs, tokens read one step late) gives the same
tokens as synchronous steps: stops, max_tokens, n > 1, streaming, abort, preemption and structured
output. On the CPU nothing overlaps in time, but every bookkeeping path runs: placeholders, input
ids taken from the previous step's sampled tensor, dropped samples past a stop, rollback of blocks,
grammar rows whose previous token is applied between the forward and the sampler."""
import pytest
import torch

from fdpp import LLM, SamplingParams
from fdpp.engine.model_runner import ModelRunner
from fdpp.engine.sequence import PLACEHOLDER_TOKEN

PROMPTS = [[5, 9, 13, 17], [3, 3, 8, 21, 34, 55, 89, 4, 7], [11] * 20, [60, 61]]


@pytest.fixture(scope="module")
def small_cache_llm(tiny_llama_dir):
    """The tiny model with 6 blocks of 8 tokens: four streams of ~30 tokens must preempt."""
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", show_progress=False, calibration="off",
              num_blocks=6, block_size=8)
    yield llm
    llm.close()


@pytest.fixture
def device_token_steps(monkeypatch):
    """Counts the steps that ran with input ids from the previous step's device tensor (counted
    after they return: a launch that raises is rerun synchronously and does not count)."""
    calls = {"device": 0, "host": 0}
    original = ModelRunner.execute

    def execute(self, batch, device_tokens=None, before_sample=None):
        result = original(self, batch, device_tokens, before_sample)
        calls["device" if device_tokens is not None else "host"] += 1
        return result

    monkeypatch.setattr(ModelRunner, "execute", execute)
    return calls


def _generate(llm, prompts, params, use_async):
    llm.engine.reset_prefix_cache()  # compare cold runs: a prefix hit reorders the prompt's arithmetic
    llm.engine.async_scheduling = use_async
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.async_scheduling = False
    _assert_idle(llm)
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs] for o in outs]


def _assert_idle(llm):
    eng = llm.engine
    eng.check_integrity()
    bm = eng.block_manager
    assert bm.num_used_blocks == 0, "blocks still held after every request ended"
    assert eng._in_flight is None or not any(eng._is_live(s) for s in eng._in_flight.seqs)
    assert not eng.has_unfinished_requests()


def test_greedy_seeded_logprobs_and_n_match_sync(tiny_llm, device_token_steps):
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=9, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, n=3, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1),
    ]
    sync = _generate(tiny_llm, PROMPTS, params, False)
    assert device_token_steps["device"] == 0
    overlapped = _generate(tiny_llm, PROMPTS, params, True)
    assert overlapped == sync
    assert device_token_steps["device"] >= 5, device_token_steps  # the overlap path really ran
    assert [len(c[0]) for c in sync[0]] == [12] and [len(c[0]) for c in sync[2]] == [7, 7, 7]


def test_stop_token_and_eos_end_exactly(tiny_llm):
    free = _generate(tiny_llm, PROMPTS[:2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), False)
    stop_a, stop_b = free[0][0][0][4], free[1][0][0][2]  # tokens that occur mid-generation
    params = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_a]),
              SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_b], min_tokens=4),
              # samples of one request that stop at different steps (the others keep decoding)
              SamplingParams(temperature=1.0, seed=11, n=4, max_tokens=16, stop_token_ids=list(range(0, 128, 9)))]
    sync = _generate(tiny_llm, PROMPTS[:3], params, False)
    overlapped = _generate(tiny_llm, PROMPTS[:3], params, True)
    assert overlapped == sync
    lengths = [len(c[0]) for c in sync[2]]
    assert len(set(lengths)) > 1 and min(lengths) < 16, lengths
    tokens, reason, stop_reason, _ = sync[0][0]
    assert reason == "stop" and stop_reason == stop_a and tokens[-1] == stop_a
    assert len(tokens) <= 5 and stop_a not in tokens[:-1]  # nothing past the stop is returned
    assert PLACEHOLDER_TOKEN not in tokens


def test_streaming_outputs_match_step_by_step(tiny_llm):
    def stream(use_async):
        eng = tiny_llm.engine
        eng.async_scheduling = use_async
        try:
            eng.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            eng.add_request("b", PROMPTS[1], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
            steps = []
            while eng.has_unfinished_requests():
                steps.append(sorted((o.request_id, tuple(o.outputs[0].token_ids), o.finished) for o in eng.step()))
        finally:
            eng.async_scheduling = False
        _assert_idle(tiny_llm)
        return steps

    sync = stream(False)
    assert stream(True) == sync
    assert len(sync) == 9  # one token per step and per call, async or not


def test_abort_while_a_step_is_in_flight(tiny_llm):
    def run(use_async):
        eng = tiny_llm.engine
        eng.async_scheduling = use_async
        try:
            eng.add_request("keep", PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
            eng.add_request("drop", PROMPTS[2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
            seen = []
            for _ in range(3):
                seen += [(o.request_id, list(o.outputs[0].token_ids)) for o in eng.step()]
            if use_async:
                assert eng._in_flight is not None  # the abort lands while a step holds its row
            assert eng.abort_request("drop")
            eng.check_integrity()
            while eng.has_unfinished_requests():
                seen += [(o.request_id, list(o.outputs[0].token_ids)) for o in eng.step()]
        finally:
            eng.async_scheduling = False
        _assert_idle(tiny_llm)
        return seen

    sync = run(False)
    assert run(True) == sync
    assert [len(t) for r, t in sync if r == "keep"][-1] == 10


def test_switching_async_off_mid_stream_drains_the_step_in_flight(tiny_llm):
    eng = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = _generate(tiny_llm, PROMPTS[:2], params, False)
    eng.async_scheduling = True
    try:
        eng.add_request("x", PROMPTS[0], params)
        eng.add_request("y", PROMPTS[1], params)
        eng.step()
        eng.step()
        assert eng._in_flight is not None
        eng.async_scheduling = False
        final = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    final[o.request_id] = [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
    finally:
        eng.async_scheduling = False
    _assert_idle(tiny_llm)
    assert [final["x"], final["y"]] == expected


def test_preemption_falls_back_and_matches(small_cache_llm, device_token_steps):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34], [40]]
    sync = _generate(small_cache_llm, prompts, params, False)
    before = small_cache_llm.engine.scheduler.num_preemptions
    assert before > 0
    overlapped = _generate(small_cache_llm, prompts, params, True)
    assert overlapped == sync
    assert small_cache_llm.engine.scheduler.num_preemptions > before
    assert device_token_steps["device"] > 0


def test_structured_output_and_penalties_match_sync(smollm2_llm):
    from fdpp.structured import StructuredOutputsParams as SO

    prompts = ["Is the sky blue? Answer:", "Count: one, two,", "Say hi:"]
    params = [
        SamplingParams(temperature=0, max_tokens=8, structured_outputs=SO(choice=["yes", "no", "maybe"])),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=6, stop=[" "]),  # a stop string, read one step late
    ]
    sync = _generate(smollm2_llm, prompts, params, False)
    overlapped = _generate(smollm2_llm, prompts, params, True)
    assert overlapped == sync
    texts = [o.outputs[0].text for o in smollm2_llm.generate(prompts[:1], params[:1], use_tqdm=False)]
    assert texts[0] in ("yes", "no", "maybe")


def test_grammar_requests_overlap_and_match_sync(smollm2_llm, device_token_steps):
    """A batch of grammar rows only (JSON schema, regex, choice, n > 1): step t+1's forward runs
    before step t's tokens advance the grammars, and the outputs are exactly the sync ones."""
    import json
    import re

    from fdpp.structured import StructuredOutputsParams as SO

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    prompts = ["A JSON object:\n", "Phone:", "Pets:", "Pick one:"]
    params = [
        SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(json=schema, disable_any_whitespace=True)),
        SamplingParams(temperature=0, max_tokens=16, structured_outputs=SO(regex=r"\d{3}-\d{4}")),
        SamplingParams(temperature=0.9, seed=5, max_tokens=16, logprobs=1,
                       structured_outputs=SO(regex=r"(cat|dog)s? [a-z]{2,6}")),
        SamplingParams(temperature=1.0, seed=2, n=3, max_tokens=8, structured_outputs=SO(choice=["red", "green", "blue"])),
    ]
    sync = _generate(smollm2_llm, prompts, params, False)
    assert device_token_steps["device"] == 0
    overlapped = _generate(smollm2_llm, prompts, params, True)
    _assert_same_tokens_close_logprobs(overlapped, sync)
    assert device_token_steps["device"] >= 5, device_token_steps  # grammar steps really overlapped
    tok = smollm2_llm.engine.tokenizer
    texts = [[tok.decode(c[0], skip_special_tokens=True) for c in o] for o in sync]
    assert json.loads(texts[0][0])["n"] in range(100)
    assert re.fullmatch(r"\d{3}-\d{4}", texts[1][0]) and re.fullmatch(r"(cat|dog)s? [a-z]{2,6}", texts[2][0])
    assert len(texts[3]) == 3 and all(t in ("red", "green", "blue") for t in texts[3])
    assert all(c[1] == "stop" for o in sync for c in o)  # every grammar ended itself


def test_grammar_ending_early_beside_free_rows_matches_sync(smollm2_llm, device_token_steps):
    """A choice that ends after a few tokens while free rows and a longer regex go on: the ended
    row rides the next step with a placeholder (unconstrained, its sample dropped)."""
    from fdpp.structured import StructuredOutputsParams as SO

    prompts = ["Is the sky blue? Answer:", "Count: one, two,", "Code:", "Say hi:"]
    params = [
        SamplingParams(temperature=0, max_tokens=8, structured_outputs=SO(choice=["yes", "no"])),
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=14, structured_outputs=SO(regex=r"[A-Z]{4}-[0-9]{6}")),
        SamplingParams(temperature=0, max_tokens=10, stop=[" "]),
    ]
    sync = _generate(smollm2_llm, prompts, params, False)
    overlapped = _generate(smollm2_llm, prompts, params, True)
    assert overlapped == sync
    assert device_token_steps["device"] >= 5, device_token_steps
    (choice_ids, reason, _, _), = sync[0]
    assert reason == "stop" and len(choice_ids) < len(sync[1][0][0]) == 14  # it ended first
    assert PLACEHOLDER_TOKEN not in [t for o in sync for c in o for t in c[0]]


def _assert_same_tokens_close_logprobs(overlapped, sync):
    """Tokens, finish and stop reasons exactly equal; logprobs equal to float32 rounding.

    NOTE: a row ended by a stop the host could not foresee (EOS, a stop token, a grammar's end)
    still rides the next step's forward with a placeholder (async scheduling, with or without
    grammars), so the other rows of that step run in a batch one row larger; the CPU GEMMs round
    such a batch differently in the last bits, which reaches the logprobs (not the tokens here)."""
    assert [[c[:3] for c in o] for o in overlapped] == [[c[:3] for c in o] for o in sync]
    for o_async, o_sync in zip(overlapped, sync):
        for c_async, c_sync in zip(o_async, o_sync):
            if c_sync[3] is None:
                assert c_async[3] is None
                continue
            assert [sorted(d) for d in c_async[3]] == [sorted(d) for d in c_sync[3]]
            for d_async, d_sync in zip(c_async[3], c_sync[3]):
                assert [d_async[k] for k in sorted(d_sync)] == pytest.approx([d_sync[k] for k in sorted(d_sync)], abs=1e-4)


class _RejectAfter:
    """A grammar matcher that rejects its ``k``-th token (a stand-in for a sampler/grammar mismatch)."""

    def __init__(self, matcher, k):
        self._m, self._k = matcher, k
        self.masks_after_rejection = 0

    def accept_token(self, tok):
        self._k -= 1
        return self._k > 0 and self._m.accept_token(tok)

    def fill_next_token_bitmask(self, out, row):  # the only grammar row: fill_bitmask calls this
        self.masks_after_rejection += self._k <= 0
        return self._m.fill_next_token_bitmask(out, row)

    def __getattr__(self, name):
        return getattr(self._m, name)


def test_grammar_rejection_ends_only_that_request_with_async(smollm2_llm, device_token_steps):
    from fdpp.structured import StructuredOutputsParams as SO

    def run(use_async):
        eng = smollm2_llm.engine
        eng.reset_prefix_cache()
        eng.async_scheduling = use_async
        final = {}
        try:
            eng.add_request("bad", "Code:", SamplingParams(temperature=0, max_tokens=14,
                                                            structured_outputs=SO(regex=r"[A-Z]{4}-[0-9]{6}")))
            eng.add_request("free", "Count: one, two,", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
            seq = eng.requests["bad"].seqs[0]
            seq.grammar = matcher = _RejectAfter(seq.grammar, 3)
            while eng.has_unfinished_requests():
                for o in eng.step():
                    if o.finished:
                        final[o.request_id] = (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.error)
        finally:
            eng.async_scheduling = False
        _assert_idle(smollm2_llm)
        assert matcher.masks_after_rejection == 0  # the ended request's row was left unconstrained
        return final

    sync = run(False)
    overlapped = run(True)
    assert overlapped == sync
    assert device_token_steps["device"] > 0
    assert sync["bad"][1] == "error" and "grammar rejected" in sync["bad"][2]
    assert sync["free"][1] == "length" and len(sync["free"][0]) == 10


def test_config_defaults_and_cli_flags(tiny_llama_dir, small_cache_llm, monkeypatch):
    import argparse

    import fdpp.cli.common as common

    assert small_cache_llm.engine.async_scheduling is False  # the CPU default: nothing to overlap
    assert small_cache_llm.engine.fuse_norm is False
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    seen = {}
    monkeypatch.setattr("fdpp.llm.LLM", lambda *a, **kw: seen.update(kw))
    common.llm_from_args(p.parse_args(["--model", tiny_llama_dir, "--async-scheduling", "--no-fuse-norm", "-q"]))
    assert seen["async_scheduling"] is True and seen["fuse_norm"] is False
    common.llm_from_args(p.parse_args(["--model", tiny_llama_dir, "-q"]))
    assert seen["async_scheduling"] is None and seen["fuse_norm"] is None  # auto: on for CUDA
    from fdpp.engine.llm_engine import _resolve_fuse_norm

    monkeypatch.setenv("FDPP_FUSED_NORM", "0")
    assert _resolve_fuse_norm(None, torch.device("cuda")) is False
    monkeypatch.setenv("FDPP_FUSED_NORM", "1")
    assert _resolve_fuse_norm(None, torch.device("cuda")) is True
    assert _resolve_fuse_norm(None, torch.device("cpu")) is False


def test_a_failed_read_of_the_step_in_flight_is_raised_not_retried(smollm2_llm):
    """With grammar rows the previous step's tokens are read inside the next launch: a failure of
    that read (a device error) is raised from step(), as it is without overlap, and is not taken
    for a failure of the new batch (whose synchronous rerun would read placeholder ids)."""
    from fdpp.structured import StructuredOutputsParams as SO

    eng = smollm2_llm.engine
    eng.reset_prefix_cache()
    eng.async_scheduling = True
    try:
        eng.add_request("g", "Phone:", SamplingParams(temperature=0, max_tokens=12,
                                                      structured_outputs=SO(regex=r"\d{3}-\d{4}")))
        eng.step()
        assert eng._in_flight is not None and eng._in_flight.pending is not None

        def lost():
            raise RuntimeError("device lost")

        eng._in_flight.pending.wait = lost
        with pytest.raises(RuntimeError, match="device lost"):
            eng.step()
    finally:
        eng.async_scheduling = False
        eng.abort_request("g")
    _assert_idle(smollm2_llm)


def test_capped_prompts_side_by_side_match_sync(tiny_llm, device_token_steps, monkeypatch):
    """Several prompts computed in capped chunks side by side while streams decode (the GPU default's
    policy) give the synchronous tokens under async scheduling, where a step is planned before the
    previous one's tokens are read."""
    sched = tiny_llm.engine.scheduler
    monkeypatch.setattr(sched, "long_prefill_token_threshold", 5)
    monkeypatch.setattr(sched, "max_num_partial_prefills", 3)
    monkeypatch.setattr(sched, "max_num_batched_tokens", 24)
    chunks_per_step = []
    original = sched.schedule

    def schedule(*a, **kw):
        batch = original(*a, **kw)
        if batch is not None:
            chunks_per_step.append(sum(1 for n in batch.num_new_tokens if n > 1))
        return batch

    monkeypatch.setattr(sched, "schedule", schedule)
    prompts = [[7, 8], [9, 10, 11]] + [[(13 * i + j) % 120 + 3 for j in range(17 + 3 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sync = _generate(tiny_llm, prompts, params, False)
    assert max(chunks_per_step) >= 2, chunks_per_step  # prompts really advanced side by side
    assert _generate(tiny_llm, prompts, params, True) == sync
    assert device_token_steps["device"] >= 5, device_token_steps
