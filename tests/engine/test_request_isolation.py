"""One bad request never harms another: range checks at SamplingParams construction, failures in a
step end the request they belong to, and LLM.generate leaves nothing queued when it raises."""
import math

import pytest

from fdpp import SamplingParams
from fdpp.errors import InvalidRequestError
from fdpp.sampling_params import MAX_LOGPROBS

PROMPT = [5, 9, 13, 17]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(top_k=2**63), "top_k"),  # overflowed torch.tensor(int64) inside the engine step
        (dict(top_k=-2), "top_k"),
        (dict(seed=2**70), "seed"),  # overflowed torch.Generator.manual_seed
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(logprobs=100000), "logprobs"),  # "selected index k out of range" in topk
        (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(n=10**9), "n"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[2**64]), "stop_token_ids"),
        (dict(stop_token_ids=["7"]), "stop_token_ids"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=math.inf), "repetition_penalty"),
        (dict(presence_penalty=math.nan), "presence_penalty"),
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=1.5), "top_k"),
        (dict(n=True), "n"),
        (dict(max_tokens=10**400), "max_tokens"),
        (dict(temperature=10**400), "temperature"),
        (dict(stop=[1]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_out_of_range_params_are_rejected_naming_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError, match=param) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_edge_values_that_are_valid_construct():
    sp = SamplingParams(top_k=2**63 - 1, seed=-(2**63), logprobs=MAX_LOGPROBS, n=4)
    assert sp.top_k == 2**63 - 1 and sp.seed == -(2**63)
    assert SamplingParams(top_k=0).top_k == -1 and SamplingParams(top_k=None).top_k == -1
    assert SamplingParams(stop="x").stops == ["x"] and SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


def test_edge_values_run_in_a_step(tiny_llm):
    """The largest valid values go through tensors and the sampler (n > 1 wraps seed + i in int64)."""
    sp = SamplingParams(top_k=2**63 - 1, seed=2**63 - 1, n=2, logprobs=MAX_LOGPROBS, max_tokens=3,
                        temperature=0.7, stop_token_ids=[2**63 - 1], repetition_penalty=1.1, min_tokens=1)
    out = tiny_llm.generate([PROMPT], sp, use_tqdm=False)[0]
    assert out.error is None
    assert [len(c.token_ids) for c in out.outputs] == [3, 3]
    assert all(len(lp) == 3 and len(lp[0]) >= MAX_LOGPROBS for c in out.outputs for lp in [c.logprobs])
    assert not tiny_llm.engine.has_unfinished_requests()


def _drain(engine):
    finals = {}
    for _ in range(100):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    return finals


def _assert_empty(engine):
    engine.check_integrity()
    assert not engine.has_unfinished_requests() and not engine.requests
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_request_that_fails_in_a_step_ends_alone(tiny_llm, phase):
    """Params broken after validation make the batch's sampling-tensor build raise: that request ends
    with finish_reason "error" and its blocks are freed; the others finish normally."""
    engine = tiny_llm.engine
    good = SamplingParams(max_tokens=6, temperature=0.8, seed=1)
    engine.add_request("good-a", PROMPT, good)
    bad_params = SamplingParams(max_tokens=6, temperature=0.8, seed=2)
    engine.add_request("bad", [7, 8, 9], bad_params)
    engine.add_request("good-b", [3, 4], SamplingParams(max_tokens=6))
    if phase == "decode":
        engine.step()  # the prefill of all three, then break the params
    bad_seq = engine.requests["bad"].seqs[0]
    bad_seq.params.temperature = "0.8"  # bypasses validation, as a bug elsewhere could
    finals = _drain(engine)
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert finals["bad"].error.startswith("TypeError")
    for rid in ("good-a", "good-b"):
        assert finals[rid].error is None
        assert finals[rid].outputs[0].finish_reason == "length" and len(finals[rid].outputs[0].token_ids) == 6
    _assert_empty(engine)
    # the survivors' tokens are what they would have been alone (seeded sampling, same RNG stream)
    alone = tiny_llm.generate([PROMPT], good, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == finals["good-a"].outputs[0].token_ids


def test_a_request_whose_token_processing_fails_ends_alone(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("ok", PROMPT, SamplingParams(max_tokens=4, temperature=0))
    engine.add_request("broken", PROMPT, SamplingParams(max_tokens=4, temperature=0))

    class BrokenDetokenizer:
        def add(self, tok):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    engine.requests["broken"].detoks[0] = BrokenDetokenizer()
    finals = _drain(engine)
    assert finals["broken"].outputs[0].finish_reason == "error" and "UnicodeDecodeError" in finals["broken"].error
    assert finals["ok"].outputs[0].finish_reason == "length" and len(finals["ok"].outputs[0].token_ids) == 4
    _assert_empty(engine)


def test_a_failure_no_request_explains_propagates(tiny_llm, monkeypatch):
    """Every sequence fails, also alone: the engine raises (the caller's recovery aborts the batch)."""
    engine = tiny_llm.engine
    engine.add_request("x", PROMPT, SamplingParams(max_tokens=2))
    engine.add_request("y", PROMPT, SamplingParams(max_tokens=2))

    def broken(*a, **k):
        raise RuntimeError("device lost")

    # NOTE: an instance attribute, deleted after (monkeypatch's undo would leave the old bound method
    # in the instance's __dict__, hiding later class-level patches from tests sharing this engine)
    engine.runner.execute = broken
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            engine.step()
    finally:
        del engine.runner.execute
    for rid in ("x", "y"):
        engine.abort_request(rid)
    _assert_empty(engine)


def test_generate_leaves_nothing_queued_when_one_prompt_is_rejected(tiny_llm):
    """Defect 2: generate(["ok", too_long]) raised but left "ok" queued for the next call."""
    with pytest.raises(InvalidRequestError, match="context"):
        tiny_llm.generate([PROMPT, [5] * 300], SamplingParams(max_tokens=2), use_tqdm=False)
    _assert_empty(tiny_llm.engine)
    outs = tiny_llm.generate([[3, 4]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(outs) == 1 and outs[0].prompt_token_ids == [3, 4]


def test_logprobs_above_the_vocabulary_are_rejected(tiny_llm, monkeypatch):
    import dataclasses

    engine = tiny_llm.engine
    # a vocabulary smaller than MAX_LOGPROBS, as a toy model has
    monkeypatch.setattr(engine, "model_config", dataclasses.replace(engine.model_config, vocab_size=10))
    with pytest.raises(InvalidRequestError, match="vocabulary") as info:
        engine.add_request(None, [1, 2], SamplingParams(logprobs=11))
    assert info.value.param == "logprobs"
    _assert_empty(engine)
