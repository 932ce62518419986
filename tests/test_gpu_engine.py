"""The engine on a GPU: Triton kernels, CUDA graphs; checked against transformers in fp32."""
import pytest
import torch

from fdpp import LLM, SamplingParams
from tests.helpers import write_tiny_llama

pytestmark = pytest.mark.gpu


def _greedy_is_argmax_up_to_rounding(hf32, prompt, tokens, tol):
    """Each greedy token must be the fp32 reference's argmax, or within ``tol`` of it (a near-tie that
    half-precision rounding may break either way)."""
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        logits = hf32(ids).logits[0, len(prompt) - 1 : -1].float()
    best = logits.max(dim=-1).values
    chosen = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    gap = (best - chosen).max().item()
    assert gap <= tol, f"a greedy token is {gap:.3f} below the fp32 argmax logit"


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
    ours = eng.prompt_logits(prompt).double()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].double()
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < (5e-3 if dtype == "float16" else 3e-2), err
    # a batch of prompts of different lengths (graph buckets with padding rows) decodes greedily
    prompts = [prompt[:n] for n in (5, 77, 200)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for pr, out in zip(prompts, outs):
        _greedy_is_argmax_up_to_rounding(hf, pr, out.outputs[0].token_ids, 0.05 if dtype == "float16" else 0.2)
    eng.check_integrity()
    llm.close()
