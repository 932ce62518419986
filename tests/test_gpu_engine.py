"""The engine on a GPU: Triton kernels, CUDA graphs; checked against transformers in fp32."""
import pytest
import torch

from fdpp import LLM, SamplingParams
from fdpp.engine.scheduler import ScheduledBatch
from fdpp.engine.sequence import Sequence
from tests.helpers import write_tiny_llama

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False])
def test_gpu_engine_matches_transformers(tmp_path, dtype, eager):
    hf = write_tiny_llama(str(tmp_path), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    hf = hf.to("cuda", torch.float32)
    llm = LLM(str(tmp_path), dtype=dtype, device="cuda", show_progress=False, enforce_eager=eager,
              max_num_seqs=8, gpu_memory_utilization=0.3)
    prompt = torch.randint(3, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    eng = llm.engine
    seq = Sequence("t", prompt, SamplingParams(), 0.0)
    eng.block_manager.allocate(seq, len(prompt))
    ours = eng.runner.forward_logits(ScheduledBatch([seq], [len(prompt)], True)).double()
    eng.block_manager.free(seq)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].double()
    assert ((ours - ref).norm() / ref.norm()).item() < 3e-2
    # batched greedy decode equals each prompt alone (graph buckets, padding rows)
    prompts = [prompt[:n] for n in (5, 77, 200)]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = llm.generate(prompts, p, use_tqdm=False)
    for pr, out in zip(prompts, together):
        assert out.outputs[0].token_ids == llm.generate([pr], p, use_tqdm=False)[0].outputs[0].token_ids
    eng.check_integrity()
    llm.close()
