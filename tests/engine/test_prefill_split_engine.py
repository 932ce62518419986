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


@pytest.mark.gpu
def test_mixed_graphs_with_forced_splits_give_the_unsplit_eager_tokens(tmp_path, monkeypatch):
    """GPU: mixed CUDA graphs captured with 4 key splits (one split count fixed at capture, the split
    length computed in the kernel per replay) vs eager mixed steps without splits: same fp32 tokens."""
    import torch

    from tests.helpers import write_tiny_llama

    write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 700)]
    # the streams decode (40 tokens) while the 700-token prompt's 64-token chunks ride with them
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    runs = {}
    for mixed, splits in ((True, "4"), (False, "1")):
        monkeypatch.setenv("FDPP_PREFILL_SPLITS", splits)
        llm = LLM(str(tmp_path), dtype="float32", device="cuda", show_progress=False, max_num_seqs=8,
                  gpu_memory_utilization=0.3, long_prefill_token_threshold=64, max_num_batched_tokens=158,
                  cuda_graph_mixed=mixed, enable_prefix_caching=False)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            replays = llm.engine.runner.num_mixed_replays
            assert (replays >= 9) if mixed else replays == 0, replays
            runs[mixed] = [o.outputs[0].token_ids for o in outs]
        finally:
            llm.close()
    assert runs[True] == runs[False]
