"""End to end on the embedded SmolLM2-135M-Instruct GGUF (real weights, CPU, fp32)."""
import pytest
import torch

from fdpp import LLM, SamplingParams
from fdpp.errors import CacheTooSmallError, InvalidRequestError

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm  # one loaded SmolLM2 per test session (tests/conftest.py)


@pytest.fixture(scope="module")
def hf_model(llm):
    transformers = pytest.importorskip("transformers")
    from fdpp.models.default_model import default_model_path

    path = default_model_path()
    import os

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    return model


def test_capital_of_france_through_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_greedy_matches_transformers_32_tokens(llm, hf_model):
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS[:3], greedy, use_tqdm=False)
    for prompt, out in zip(PROMPTS[:3], outs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                    do_sample=False, pad_token_id=tok.eos_token_id)
        ours, theirs = out.outputs[0].token_ids, ref[0, len(ids):].tolist()
        if ours != theirs:
            # Allowed only at a near-tie of transformers' own logits (fp32 rounding order differs).
            j = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids + theirs[:j]])).logits[0, -1]
            margin = (logits[theirs[j]] - logits[ours[j]]).item()
            assert margin < 1e-3, f"{prompt!r}: diverged at token {j} with logit margin {margin:.4f}"


def test_batch_equals_each_alone(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = llm.generate(PROMPTS, greedy, use_tqdm=False)
    for prompt, out in zip(PROMPTS, together):
        alone = llm.generate([prompt], greedy, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.outputs[0].text == alone.outputs[0].text
    llm.engine.check_integrity()


def test_preemption_under_tiny_cache_matches_ample_cache(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ample = llm.generate(PROMPTS, greedy, use_tqdm=False)
    # 6 blocks of 8 tokens: the four sequences (up to ~27 tokens each) cannot all fit at once
    tiny = LLM(dtype="float32", device="cpu", show_progress=False, quantization="none", block_size=8, num_blocks=6)
    outs = tiny.generate(PROMPTS, greedy, use_tqdm=False)
    assert tiny.engine.scheduler.num_preemptions > 0
    for a, b in zip(ample, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    tiny.engine.check_integrity()
    assert tiny.engine.stats()["num_free_blocks"] == 6


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    a = llm.generate([PROMPTS[2]], p, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate([PROMPTS[2], PROMPTS[0]], [p, SamplingParams(temperature=1.0, max_tokens=5)],
                     use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
    c = llm.generate([PROMPTS[2]], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16,
                                                  seed=99, ignore_eos=True), use_tqdm=False)[0]
    assert c.outputs[0].token_ids != a


def test_max_tokens_and_stop_strings(llm):
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    full = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    assert "7" in full
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=20, stop=["7"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "7"
    assert out.text == full[: full.index("7")]
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=20, stop="7",
                                                       include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text.endswith("7")


def test_logprobs_and_n(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) >= 3
        assert entry[tok] == max(entry.values())  # greedy picks the most likely token
    res = llm.generate([PROMPTS[2]], SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7), use_tqdm=False)
    assert len(res[0].outputs) == 3
    assert len({tuple(o.token_ids) for o in res[0].outputs}) > 1


def test_streaming_never_splits_characters(llm):
    pieces = list(llm.stream("Write three emoji about the sea:", SamplingParams(temperature=0, max_tokens=24)))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == llm.generate(["Write three emoji about the sea:"],
                                           SamplingParams(temperature=0, max_tokens=24),
                                           use_tqdm=False)[0].outputs[0].text
    llm.engine.check_integrity()


def test_bad_inputs_give_clear_errors(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate([[5] * (llm.engine.max_model_len + 1)], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[10**7]], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(CacheTooSmallError):
        LLM(dtype="float32", device="cpu", show_progress=False, quantization="none", kv_cache_memory=1000)
    assert not llm.engine.has_unfinished_requests()


def test_sequence_outgrowing_the_cache_ends_as_length():
    # 4 blocks of 8 tokens: a request may start (prompt fits) but cannot grow past 32 tokens
    small = LLM(dtype="float32", device="cpu", show_progress=False, quantization="none", block_size=8, num_blocks=4)
    out = small.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                         use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "length"
    # 32 tokens had KV slots; the 33rd was sampled from them and needs no slot
    assert len(out.prompt_token_ids) + len(c.token_ids) == 33
    small.engine.check_integrity()
    assert small.engine.stats()["num_free_blocks"] == 4 and not small.engine.has_unfinished_requests()
