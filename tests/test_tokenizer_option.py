"""``tokenizer=`` (``--tokenizer``): a tokenizer apart from the model, checked against its vocabulary."""
from __future__ import annotations

import pytest

from fdpp import LLM, SamplingParams
from fdpp.errors import ModelLoadError


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_llm, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_llm.get_tokenizer().save_pretrained(str(path))  # tokenizer.json etc., no config.json
    return str(path)


def test_a_random_preset_takes_text_through_a_tokenizer_folder(smollm2_tokenizer_dir):
    llm = LLM("smollm2-135m", tokenizer=smollm2_tokenizer_dir, dtype="float32", device="cpu",
              show_progress=False, calibration="off", num_blocks=16, max_model_len=64)
    try:
        out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)[0]
        assert out.prompt_token_ids == llm.get_tokenizer().encode("Hello there")
        assert len(out.outputs[0].token_ids) == 3 and isinstance(out.outputs[0].text, str)
    finally:
        llm.close()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_llama_dir, smollm2_tokenizer_dir):
    with pytest.raises(ModelLoadError, match="49152 tokens but the model's vocabulary has only 128"):
        LLM(tiny_llama_dir, tokenizer=smollm2_tokenizer_dir, dtype="float32", device="cpu", show_progress=False,
            calibration="off", num_blocks=8)
