"""Constrained decoding, logit_bias and prompt logprobs on the embedded model (CPU)."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from fdpp import SamplingParams
from fdpp.errors import InvalidRequestError
from fdpp.layers.sampler import apply_token_bitmask
from fdpp.structured import StructuredOutputsParams as SO
from fdpp.structured.backend import StructuredOutputBackend
from tests.structured.schemas import generated_schemas

jsonschema = pytest.importorskip("jsonschema")

PROMPT = "A JSON object:\n"


def _run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_fifty_generated_schemas_all_validate(smollm2):
    schemas = generated_schemas(50)
    params = [SamplingParams(temperature=0, max_tokens=160, structured_outputs=SO(json=s, disable_any_whitespace=True))
              for s in schemas]
    outs = _run(smollm2, [PROMPT] * len(schemas), params)  # one batch: 50 grammars side by side
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_free_whitespace_json_is_bounded_and_valid(smollm2):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
              "required": ["a", "b"], "additionalProperties": False}
    outs = _run(smollm2, [PROMPT, "{"], [
        SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=schema)),
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json_object=True)),
    ])
    jsonschema.validate(json.loads(outs[0].text), schema)
    for out in outs:
        assert not re.search(r"\s{9,}", out.text), out.text  # runs of at most 8 whitespace characters
    compact = _run(smollm2, [PROMPT], SamplingParams(temperature=0, max_tokens=60, structured_outputs=SO(
        json_object=True, disable_any_whitespace=True)))[0]
    assert isinstance(json.loads(compact.text), dict)


def test_regex_choice_grammar_share_a_batch_with_free_requests(smollm2):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = _run(smollm2, ["The capital of France is"], free)[0]
    regexes = [r"\d{3}-\d{4}", r"(cat|dog)s? [a-z]{2,6}", r"[A-Z][a-z]+ [0-9]{1,2}(\.[0-9])?"]
    choices = ["Paris", "London", "New \"York\"\n", "東京"]
    grammar = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    params = ([SamplingParams(temperature=0, max_tokens=30, structured_outputs=SO(regex=r)) for r in regexes]
              + [SamplingParams(temperature=0.9, seed=3, max_tokens=30, structured_outputs=SO(choice=choices)),
                 SamplingParams(temperature=0, max_tokens=30, structured_outputs=SO(grammar=grammar)), free])
    outs = _run(smollm2, ["Answer: "] * 5 + ["The capital of France is"], params)
    for rx, out in zip(regexes, outs):
        assert re.fullmatch(rx, out.text), (rx, out.text)
    assert outs[3].text in choices
    assert re.fullmatch(r"\((\d{1,2})(,\d{1,2})*\)", outs[4].text), outs[4].text
    # an unconstrained request in the same batch is untouched by the others' masks
    assert outs[5].token_ids == alone.token_ids


def test_sampled_completions_n2_and_min_tokens_follow_the_grammar(smollm2):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    sp = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=40, min_tokens=30,
                        structured_outputs=SO(json=schema, disable_any_whitespace=True))
    out = smollm2.generate([PROMPT], sp, use_tqdm=False)[0]
    assert len(out.outputs) == 2
    for c in out.outputs:
        assert c.finish_reason == "stop"  # the grammar ends it, min_tokens notwithstanding
        jsonschema.validate(json.loads(c.text), schema)


def test_ignore_eos_still_ends_at_the_grammar_end(smollm2):
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, structured_outputs=SO(choice=["yes", "no"]))
    out = _run(smollm2, ["Answer: "], sp)[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


@pytest.mark.parametrize("so, words", [
    (SO(json='{"type": "objec"}'), ["JSON schema", "objec"]),
    (SO(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), ["JSON schema"]),
    (SO(regex="(ab"), ["regex", "parenthesis"]),
    (SO(grammar="root ::= foo"), ["grammar", "foo"]),
])
def test_bad_constraints_are_refused_before_queueing(smollm2, so, words):
    engine = smollm2.engine
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(None, PROMPT, SamplingParams(structured_outputs=so))
    for w in words:
        assert w in str(e.value)
    assert "/project/" not in str(e.value)  # no C++ source paths
    assert not engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 0


@pytest.mark.parametrize("kwargs, words", [
    ({}, ["exactly one"]),
    ({"json": "{not json"}, ["not valid JSON"]),
    ({"json": [1]}, ["object"]),
    ({"choice": []}, ["non-empty"]),
    ({"regex": "a", "choice": ["a"]}, ["exactly one", "regex, choice"]),
])
def test_params_shape_errors(kwargs, words):
    with pytest.raises(InvalidRequestError) as e:
        SO(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_limits_name_their_flag_and_cache_hits_are_fast(smollm2):
    engine = smollm2.engine
    big = {"enum": [f"v{i}" for i in range(20000)]}
    small = StructuredOutputBackend(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids,
                                    max_spec_bytes=1000)
    with pytest.raises(InvalidRequestError, match="--structured-outputs-max-bytes"):
        small.compile(SO(json=big))
    slow = StructuredOutputBackend(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids,
                                   compile_timeout_s=0.001)
    slow._get_compiler()  # the tokenizer info is built outside the timed compilation
    with pytest.raises(InvalidRequestError, match="--structured-outputs-compile-timeout"):
        slow.compile(SO(json=big))
    schema = SO(json={"type": "object", "properties": {"x": {"type": "string", "maxLength": 4}}})
    backend = engine.structured
    before = backend.num_compiles
    backend.compile(schema)
    t0 = time.perf_counter()
    again = backend.compile(SO(json=dict(schema.json)))  # an equal schema, another object
    assert time.perf_counter() - t0 < 0.005
    assert backend.num_compiles == before + 1 and again is backend.compile(schema)


def test_logit_bias(smollm2):
    tok = smollm2.get_tokenizer()
    free = _run(smollm2, ["The capital of France is"], SamplingParams(temperature=0, max_tokens=4))[0]
    forced_id = tok.encode(" banana")[0]
    forced = _run(smollm2, ["The capital of France is"],
                  SamplingParams(temperature=0, max_tokens=4, logit_bias={forced_id: 100}))[0]
    assert forced.token_ids == [forced_id] * 4
    banned = _run(smollm2, ["The capital of France is"],
                  SamplingParams(temperature=0, max_tokens=4, logit_bias={free.token_ids[0]: -100}))[0]
    assert banned.token_ids[0] != free.token_ids[0]
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        smollm2.engine.add_request(None, "x", SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(InvalidRequestError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={5: 101})


def test_prompt_logprobs_match_the_prompt_logits_also_when_chunked(smollm2):
    engine = smollm2.engine
    prompt = "The quick brown fox jumps over the lazy dog because"
    ids = engine.tokenizer.encode(prompt)
    ref = torch.log_softmax(engine.prompt_logits(ids).float(), dim=-1)
    budget = engine.scheduler.max_num_batched_tokens
    try:
        for chunk in (budget, 4):  # whole prompt at once, then chunks of 4 tokens
            engine.scheduler.max_num_batched_tokens = chunk
            out = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3),
                                   use_tqdm=False)[0]
            plp = out.prompt_logprobs
            assert len(plp) == len(ids) and plp[0] is None
            for pos in range(1, len(ids)):
                entry = plp[pos]
                assert ids[pos] in entry and len(entry) in (3, 4)
                assert entry[ids[pos]] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
                top = ref[pos - 1].topk(3).indices.tolist()
                assert set(top) <= set(entry)
    finally:
        engine.scheduler.max_num_batched_tokens = budget


def test_apply_token_bitmask_matches_a_boolean_mask():
    g = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partly padding
    allowed = torch.rand(3, vocab, generator=g) < 0.3
    words = torch.zeros(3, 4, dtype=torch.int64)
    for t in range(vocab):
        words[:, t // 32] |= allowed[:, t].long() << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # int32 two's complement
    logits = torch.randn(3, vocab, generator=g)
    masked = apply_token_bitmask(logits, bitmask)
    assert torch.equal(masked, logits.masked_fill(~allowed, float("-inf")))
