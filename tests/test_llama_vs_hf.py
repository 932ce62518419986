"""fdpp's Llama matches Hugging Face transformers on the same weights (fp32, CPU)."""
import pytest
import torch

from fdpp import LLM, SamplingParams
from tests.helpers import hf_greedy, write_tiny_llama

CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-llama3": dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, case):
    hf = write_tiny_llama(str(tmp_path), **CASES[case])
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", show_progress=False)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 128, (37,), generator=g).tolist()

    # prefill logits of every position
    eng = llm.engine
    ours = eng.prompt_logits(prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    err = (ours.double() - ref.double()).norm() / ref.double().norm()
    assert err < 1e-5, f"{case}: logits rel err {err:.2e}"

    # greedy decode through the paged cache
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    eng.check_integrity()
