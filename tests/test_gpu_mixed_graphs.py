"""Mixed CUDA graphs (decode rows + one prompt chunk padded to long_prefill_token_threshold) on a GPU:
a long prompt arriving while streams decode gives the tokens of eager mixed steps, and the mixed
graphs were replayed."""
import pytest
import torch

from fdpp import LLM, SamplingParams
from tests.helpers import write_tiny_llama
from tests.test_gpu_engine import _greedy_is_argmax_up_to_rounding

pytestmark = pytest.mark.gpu

CHUNK = 64  # long_prefill_token_threshold: the mixed graphs' chunk


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mixed_graphs_give_the_eager_mixed_tokens(tmp_path, dtype):
    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    hf = hf.to("cuda", torch.float32)
    g = torch.Generator().manual_seed(0)
    # 5 streams first (prefilled in step 1 with the long prompt's first tokens), then a 700-token
    # prompt whose chunks (64 tokens, the last one shorter: 700 - 64 = 636 = 9 x 64 + 60) ride with
    # the streams' decode rows, on and past the first chunk's block boundaries; n = 2 forks its end.
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 9, 23, 700)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 5
    params.append(SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True))
    runs = {}
    for mixed in (True, False):
        llm = LLM(str(tmp_path), dtype=dtype, device="cuda", show_progress=False, max_num_seqs=8,
                  gpu_memory_utilization=0.3, long_prefill_token_threshold=CHUNK,
                  max_num_batched_tokens=158, cuda_graph_mixed=mixed)
        try:
            runner = llm.engine.runner
            assert runner.graphs and bool(runner.mixed_graphs) == mixed
            assert llm.engine.async_scheduling  # device tokens feed the mixed graphs' decode rows
            outs = llm.generate(prompts, params, use_tqdm=False)
            llm.engine.check_integrity()
            assert llm.engine.block_manager.num_used_blocks == 0
            replays = runner.num_mixed_replays
            assert (replays >= 9) if mixed else replays == 0, replays
            runs[mixed] = [[c.token_ids for c in o.outputs] for o in outs]
        finally:
            llm.close()
    for pr, out in zip(prompts, runs[True]):
        for tokens in out:
            _greedy_is_argmax_up_to_rounding(hf, pr, tokens, 0.02 if dtype == "float32" else 0.05)
    if dtype == "float32":  # fp16 may round a near-tie either way (other GEMM shapes): checked above
        assert runs[True] == runs[False]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_prefill_graphs_give_the_eager_prefill_tokens(tmp_path, dtype):
    """Prompts arriving one at a time (batch-1 prefills, the TTFT case) replay the prefill graphs up to
    cuda_graph_prefill_max_tokens, padded to their bucket; a longer one runs eagerly; same tokens as with
    the prefill graphs off (float32), the argmax up to rounding (float16)."""
    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    hf = hf.to("cuda", torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 100, 256, 300)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    for max_tokens in (256, 0):
        llm = LLM(str(tmp_path), dtype=dtype, device="cuda", show_progress=False, max_num_seqs=4,
                  gpu_memory_utilization=0.3, cuda_graph_prefill_max_tokens=max_tokens)
        try:
            runner = llm.engine.runner
            assert sorted(runner.prefill_graphs) == ([16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256] if max_tokens else [])
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
            llm.engine.check_integrity()
            assert runner.num_prefill_replays == (3 if max_tokens else 0)
            runs[max_tokens] = [o.outputs[0].token_ids for o in outs]
        finally:
            llm.close()
    for pr, tokens in zip(prompts, runs[256]):
        _greedy_is_argmax_up_to_rounding(hf, pr, tokens, 0.02 if dtype == "float32" else 0.05)
    if dtype == "float32":
        assert runs[256] == runs[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_prefill_tma_graphs_for_fresh_prompts(tmp_path, monkeypatch, dtype):
    """FDPP_PREFILL_GRAPH_TMA=1 with head_dim 128 on sm_90+: fresh prompts of 300 and 600 tokens replay the
    TMA-route prefill graphs (buckets 320, 640), a repeat of the 600-token prompt (a cached prefix) the paged
    route; the greedy tokens are the fp32 argmax up to rounding."""
    from fdpp.ops.attention import prefill_tma_available

    if not prefill_tma_available(torch.device("cuda"), getattr(torch, dtype), 128):
        pytest.skip("the TMA prefill kernel needs compute capability >= 9")
    monkeypatch.setenv("FDPP_PREFILL_GRAPH_TMA", "1")
    hf = write_tiny_llama(str(tmp_path), hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)
    hf = hf.to("cuda", torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (300, 600)]
    prompts.append(prompts[1][:590] + [7, 8, 9, 10, 11, 12, 13, 14, 15, 16])  # shares 36 blocks with the 2nd
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(tmp_path), dtype=dtype, device="cuda", show_progress=False, max_num_seqs=2,
              gpu_memory_utilization=0.3)
    try:
        runner = llm.engine.runner
        assert sorted(runner.prefill_tma_graphs) == [t for t in sorted(runner.prefill_graphs) if t >= 256]
        outs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        assert runner.num_prefill_tma_replays == 2 and runner.num_prefill_replays == 3
        llm.engine.check_integrity()
    finally:
        llm.close()
    for pr, tokens in zip(prompts, outs):
        _greedy_is_argmax_up_to_rounding(hf, pr, tokens, 0.08)
