"""Qwen2 (QKV bias, GQA, tied or untied head) and Mistral (sliding window, explicit head_dim) against
transformers (fp32, CPU). Both run on fdpp's Llama code (fdpp/models/llama.py)."""
from __future__ import annotations

import pytest
import torch

from fdpp.errors import ModelLoadError
from tests.models import (
    check_against_hf,
    check_triton_against_hf,
    hf_logits,
    load_llm,
    prefill_logits,
    random_prompt,
    randomize_,
    rel_err,
    rewrite_checkpoint,
)

VOCAB = 128
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)


def write_tiny(path, family: str, seed: int = 0, **overrides):
    """Save a tiny random Qwen2ForCausalLM / MistralForCausalLM to ``path``; returns the HF model."""
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    cfg = {**BASE, **overrides}
    torch.manual_seed(seed)
    model = randomize_(model_cls(config_cls(**cfg)), seed=seed)
    model.save_pretrained(str(path))
    return model


CASES = {
    "qwen2-gqa": ("Qwen2", dict(tie_word_embeddings=False)),
    "qwen2-mqa-tied": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral-no-window": ("Mistral", dict(sliding_window=None, tie_word_embeddings=False)),
    # a window shorter than the prompt, and a head_dim that is not hidden / heads (as Mistral-Nemo)
    "mistral-window-head_dim": ("Mistral", dict(sliding_window=8, head_dim=24, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(tmp_path, case):
    family, overrides = CASES[case]
    hf = write_tiny(tmp_path, family, **overrides)
    llm = load_llm(tmp_path)
    assert type(llm.engine.model).__name__ == f"{family}ForCausalLM"
    prompts = [random_prompt(37, VOCAB, seed=1), random_prompt(5, VOCAB, seed=2)]
    check_against_hf(llm, hf, prompts, n_greedy=10)


def test_mistral_sliding_window_is_used(tmp_path):
    """The window changes the output (so the match above really tests it) and reaches the layers."""
    hf = write_tiny(tmp_path, "Mistral", sliding_window=8, tie_word_embeddings=False)
    llm = load_llm(tmp_path)
    assert all(a.sliding_window == 8 for a in llm.engine.model.attention_layers())
    prompt = random_prompt(37, VOCAB, seed=1)
    hf.config.sliding_window = None
    hf.config._attn_implementation = "eager"
    for layer in hf.model.layers:
        layer.self_attn.sliding_window = None
    full = hf_logits(hf, prompt)
    assert rel_err(prefill_logits(llm, prompt), full) > 1e-2


def test_qwen2_default_config_has_no_window(tmp_path):
    """Qwen2 configs carry sliding_window but use_sliding_window=false: full attention."""
    write_tiny(tmp_path, "Qwen2", use_sliding_window=False, sliding_window=4, tie_word_embeddings=False)
    llm = load_llm(tmp_path)
    assert all(a.sliding_window is None for a in llm.engine.model.attention_layers())


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_triton_kernels(tmp_path, family):
    """Through the Triton attention kernels (with the sliding window for Mistral) and the flat GEMM."""
    extra = dict(sliding_window=8) if family == "Mistral" else {}
    hf = write_tiny(tmp_path, family, tie_word_embeddings=False, **extra)
    llm = load_llm(tmp_path)
    check_triton_against_hf(llm, hf, random_prompt(12, VOCAB), decode_linear="flat", n_decode=3)


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_missing_and_misshapen_tensors(tmp_path, family):
    write_tiny(tmp_path, family, tie_word_embeddings=False)
    name = f"model.layers.1.self_attn.k_proj.{'bias' if family == 'Qwen2' else 'weight'}"
    rewrite_checkpoint(str(tmp_path), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ModelLoadError, match="k_proj|qkv_proj"):
        load_llm(tmp_path)

    write_tiny(tmp_path, family, tie_word_embeddings=False)
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_checkpoint(str(tmp_path), lambda t: {**t, name: t[name][:-1]})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_llm(tmp_path)


def test_qwen2_sliding_window_on_upper_layers_only(tmp_path):
    """use_sliding_window=true: transformers windows layers >= max_window_layers only."""
    hf = write_tiny(tmp_path, "Qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                    tie_word_embeddings=False)
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    llm = load_llm(tmp_path)
    assert [a.sliding_window for a in llm.engine.model.attention_layers()] == [None, 8]
    check_against_hf(llm, hf, [random_prompt(37, VOCAB, seed=1)], n_greedy=4)
