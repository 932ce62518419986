"""Prefix caching, shared n > 1 prompts and mixed prefill + decode steps, end to end on tiny random
models of several families (fp32, CPU): outputs never depend on what was reused."""
from __future__ import annotations

import random

import pytest

from fdpp import SamplingParams
from tests.helpers import write_tiny_llama
from tests.models import load_llm
from tests.models.test_opt import write_tiny_opt
from tests.models.test_qwen2_mistral import write_tiny

VOCAB = 128
FAMILIES = {
    "llama": lambda p: write_tiny_llama(str(p)),
    "qwen2": lambda p: write_tiny(p, "Qwen2", tie_word_embeddings=False),
    # a sliding window shorter than the prompts: cached blocks outside it must still be right
    "mistral-window": lambda p: write_tiny(p, "Mistral", sliding_window=8, tie_word_embeddings=False),
    "opt": lambda p: write_tiny_opt(p, max_position_embeddings=128),  # learned positions
}


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param](path)
    return path


def test_greedy_identical_with_caching_on_and_off(family_path):
    """Shared system prompt, repeated and nested prompts, multi-turn follow-ups (history + reply +
    new turn), on a cache so small that sequences are preempted, recomputed and cached blocks
    evicted; every output must equal the cache-off engine's on an ample cache."""
    rng = random.Random(0)
    system = [rng.randrange(3, VOCAB) for _ in range(21)]
    wave1 = [system + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 7))] for _ in range(6)]
    wave1 += [system[:9], list(system), wave1[0]]
    off = load_llm(family_path, enable_prefix_caching=False, block_size=4)
    ref1 = tokens(off.generate(wave1, greedy(8), use_tqdm=False))
    wave2 = [p + out + [rng.randrange(3, VOCAB) for _ in range(3)] for p, out in zip(wave1, ref1)]
    ref2 = tokens(off.generate(wave2, greedy(8), use_tqdm=False))
    assert off.engine.stats()["prefix_cache_hits"] == 0

    on = load_llm(family_path, block_size=4, num_blocks=24, max_num_seqs=6, max_num_batched_tokens=16)
    assert tokens(on.generate(wave1, greedy(8), use_tqdm=False)) == ref1
    assert tokens(on.generate(wave2, greedy(8), use_tqdm=False)) == ref2
    assert tokens(on.generate(wave1, greedy(8), use_tqdm=False)) == ref1  # after eviction
    stats = on.engine.stats()
    on.engine.check_integrity()
    assert stats["num_preemptions"] > 0, "the test meant to preempt and recompute"
    assert on.engine.block_manager.num_evicted_blocks > 0, "the test meant to evict cached blocks"
    assert stats["prefix_cache_hits"] > 0
    assert stats["num_prefill_tokens"] < off.engine.stats()["num_prefill_tokens"]  # reuse computed less

    # Capped chunks of several prompts side by side (the GPU default's policy), on the same small cache.
    side = load_llm(family_path, block_size=4, num_blocks=24, max_num_seqs=6, max_num_batched_tokens=16,
                    long_prefill_token_threshold=3, max_num_partial_prefills=3)
    assert side.engine.scheduler.max_num_partial_prefills == 3
    assert tokens(side.generate(wave1, greedy(8), use_tqdm=False)) == ref1
    assert tokens(side.generate(wave2, greedy(8), use_tqdm=False)) == ref2
    side.engine.check_integrity()


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_tiny_llama(str(path))
    return path


def test_cached_tokens_reported_and_counted(llama_path):
    llm = load_llm(llama_path, block_size=4)
    prompt = random.Random(1).sample(range(3, VOCAB), 23)
    first = llm.generate([prompt], greedy(4), use_tqdm=False)[0]
    second = llm.generate([prompt], greedy(4), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    # every full block but the one holding the last prompt token, which is computed again for logits
    assert second.num_cached_tokens == 20
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    s = llm.engine.stats()
    assert (s["prefix_cache_queries"], s["prefix_cache_hits"]) == (46, 20)
    assert s["num_prefill_tokens"] == 23 + 3
    assert llm.engine.reset_prefix_cache() > 0
    assert llm.generate([prompt], greedy(4), use_tqdm=False)[0].num_cached_tokens == 0


@pytest.mark.parametrize("caching", [True, False])
def test_n4_prefills_once_and_matches_n1(llama_path, caching):
    """n = 4 computes the prompt once; greedy samples all equal n = 1's, and each seeded sample equals
    a lone n = 1 request with its seed (so the shared last block was copied before it diverged)."""
    llm = load_llm(llama_path, block_size=4, enable_prefix_caching=caching)
    prompt = random.Random(2).sample(range(3, VOCAB), 22)  # 22 % 4 != 0: a shared partial block
    alone = llm.generate([prompt], greedy(10), use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.reset_prefix_cache()
    before = llm.engine.stats()["num_prefill_tokens"]
    out = llm.generate([prompt], greedy(10, n=4), use_tqdm=False)[0]
    assert llm.engine.stats()["num_prefill_tokens"] - before == len(prompt)
    assert [c.token_ids for c in out.outputs] == [alone] * 4
    sampled = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, n=4, seed=7)
    llm.engine.reset_prefix_cache()
    before = llm.engine.stats()["num_prefill_tokens"]
    outs = llm.generate([prompt], sampled, use_tqdm=False)[0].outputs
    assert llm.engine.stats()["num_prefill_tokens"] - before == len(prompt)
    assert len({tuple(c.token_ids) for c in outs}) > 1, "the samples should differ"
    for i, c in enumerate(outs):
        lone = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=7 + i)
        assert llm.generate([prompt], lone, use_tqdm=False)[0].outputs[0].token_ids == c.token_ids
    llm.engine.check_integrity()


def test_running_stream_keeps_decoding_while_a_long_prompt_prefills(llama_path):
    llm = load_llm(llama_path, block_size=4, max_num_batched_tokens=8)
    eng = llm.engine
    stream = eng.add_request("stream", [5, 6, 7, 8, 9], greedy(60))
    for _ in range(3):
        eng.step()
    long_prompt = random.Random(3).choices(range(3, VOCAB), k=120)
    eng.add_request("long", long_prompt, greedy(4))
    steps = 0
    while eng.requests["long"].metrics.first_token_time is None:
        outs = {o.request_id: o for o in eng.step()}
        steps += 1
        # every step of the long prefill also gives the stream its next token
        assert len(outs[stream].outputs[0].token_ids) == 3 + steps
    assert steps >= 120 // 7  # 7 prompt tokens a step fit beside the stream's decode token
    while eng.has_unfinished_requests():
        eng.step()
    eng.check_integrity()


def test_cli_flag_turns_prefix_caching_off():
    import argparse

    from fdpp.cli.common import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert p.parse_args([]).enable_prefix_caching is True
    args = p.parse_args(["--no-enable-prefix-caching", "--max-num-batched-tokens", "256"])
    assert args.enable_prefix_caching is False and args.max_num_batched_tokens == 256


def test_server_reports_cached_tokens_and_prefix_metrics(llama_path):
    httpx = pytest.importorskip("httpx")
    from tests.server.conftest import serve_in_thread

    llm = load_llm(llama_path, block_size=4)
    prompt = list(range(3, 26))  # 23 tokens: 5 full blocks can be reused
    with serve_in_thread(llm) as srv:
        usages = []
        for _ in range(2):
            r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 20]
        samples = {}
        for line in httpx.get(srv.base_url + "/metrics").text.splitlines():
            if line.startswith("fdpp:prefix_cache") and "_total" in line:
                key, _, value = line.rpartition(" ")
                samples[key.split("{")[0]] = float(value)
        assert samples == {"fdpp:prefix_cache_queries_total": 46.0, "fdpp:prefix_cache_hits_total": 20.0}


def test_mixed_step_through_the_triton_kernels(llama_path):
    """A mixed step splits attention between the decode kernel (decode rows) and the prefill kernel
    (chunks reading a cached prefix); in Triton's interpreter here, on the GPU in CI. Same tokens as
    the reference backend."""
    prompts = [list(range(3, 12)), list(range(3, 30)), list(range(3, 25)) + [7]]
    results = {}
    for backend in ("reference", "triton"):
        llm = load_llm(llama_path, block_size=4, max_num_batched_tokens=12, attention_backend=backend)
        eng = llm.engine
        eng.add_request("a", prompts[0], greedy(6))
        eng.step()  # a: prefill
        eng.add_request("b", prompts[1], greedy(3))
        eng.step()  # mixed: a decodes, b's first chunk
        eng.step()
        eng.add_request("c", prompts[2], greedy(3))  # shares b's first blocks
        seen = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                seen[o.request_id] = o
        assert seen["c"].num_cached_tokens > 0
        results[backend] = {k: v.outputs[0].token_ids for k, v in seen.items()}
    assert results["triton"] == results["reference"]
