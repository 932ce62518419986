"""Engine level: a long prompt prefilled in chunks (each chunk reads the cached prefix through the
paged prefill kernel) gives the same greedy tokens with split-KV forced on and off. Triton kernels
run in the interpreter on the CPU (tiny Llama, float32)."""
import pytest

import fdpp.kernels.attention_prefill as prefill_mod
from fdpp import LLM, SamplingParams


@pytest.fixture(scope="module")
def chunked_llm(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", show_progress=False, calibration="off",
              num_blocks=24, block_size=16, attention_backend="triton", max_num_batched_tokens=40,
              long_prefill_token_threshold=32, enable_prefix_caching=False)
    yield llm
    llm.close()


def _generate(llm, monkeypatch, splits: str) -> tuple[dict[str, list[int]], list[int]]:
    monkeypatch.setenv("FDPP_PREFILL_SPLITS", splits)
    seen: list[int] = []
    real = prefill_mod.paged_prefill_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_splits", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill_mod, "paged_prefill_attention", spy)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    long_prompt = [(7 * i + 3) % 120 + 1 for i in range(90)]  # 90 tokens: chunks of <= 32
    eng.add_request("long", long_prompt, params)
    eng.add_request("short", [5, 9, 13], params)
    done: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    monkeypatch.undo()
    return done, seen


def test_chunked_long_prompt_same_tokens_split_on_off(chunked_llm, monkeypatch):
    off, seen_off = _generate(chunked_llm, monkeypatch, "1")
    on, seen_on = _generate(chunked_llm, monkeypatch, "3")
    assert set(seen_off) == {1} and set(seen_on) == {3}
    assert len(seen_on) >= 3 * 2  # >= 3 chunks x 2 layers went through the split path
    assert on == off and all(len(t) == 3 for t in on.values())
