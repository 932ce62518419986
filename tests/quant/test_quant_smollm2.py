"""The embedded SmolLM2-135M-Instruct (a GGUF file in Q4_1, its embedding / LM head in Q8_0) run with its
weights kept in their blocks: it answers, and its logits equal those of the same weights dequantized at
load (the reference path dequantizes per matmul with the same float32 arithmetic as the gguf package)."""
from __future__ import annotations

import pytest
import torch

from fdpp import LLM, SamplingParams
from fdpp.ops.backend import use_backends
from fdpp.quant.formats import QuantTensor
from fdpp.quant.perplexity import perplexity


@pytest.fixture(scope="module")
def quantized():
    llm = LLM(device="cpu", show_progress=False, calibration="off")  # the default keeps the GGUF blocks
    yield llm
    llm.close()


def test_smollm2_q4_1_runs_quantized_and_answers_paris(quantized):
    model = quantized.engine.model
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.quant
    assert isinstance(qkv, QuantTensor) and qkv.fmt == "q4_1" and qkv.shape == (960, 576)
    assert model.lm_head.weight.quant.fmt == "q8_0"  # tied to the Q8_0 token embedding
    out = quantized.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_quantized_equals_dequantized_and_perplexity_is_sane(quantized):
    """The reference linear (dequantized blocks) equals the dense twin; the CPU default (Q4_1 weights in
    PyTorch's packed int4 kernel with bfloat16 activations, the Q8_0 LM head dense) stays within bfloat16
    rounding of it, logits and perplexity."""
    dense = LLM(quantization="none", device="cpu", show_progress=False, calibration="off")
    try:
        assert getattr(dense.engine.model.model.layers[0].self_attn.qkv_proj.weight, "quant", None) is None
        ids = dense.get_tokenizer().encode("The river town woke slowly on market days.")
        want = dense.engine.prompt_logits(ids)
        with use_backends(linear="reference"):
            torch.testing.assert_close(quantized.engine.prompt_logits(ids), want, rtol=1e-5, atol=1e-4)
            ppl_q, n = perplexity(quantized)
        ppl_d, _ = perplexity(dense)
        assert n > 300 and ppl_q == pytest.approx(ppl_d, rel=1e-4) and 5 < ppl_q < 60
        got = quantized.engine.prompt_logits(ids)
        assert float((got - want).norm() / want.norm()) < 2e-2
        assert perplexity(quantized)[0] == pytest.approx(ppl_d, rel=1e-2)
        qkv = quantized.engine.model.model.layers[0].self_attn.qkv_proj.weight.quant
        assert qkv._cpu_int4 and not qkv.memoize  # packed at load, no dense copy
        head = quantized.engine.model.lm_head.weight.quant  # float32 logits: its memoized dense copy
        assert head.precise_output and head.memoize and not head._cpu_int4
    finally:
        dense.close()
