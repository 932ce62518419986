"""fdpp's OPT matches transformers' OPTForCausalLM on the same weights (fp32, CPU)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fdpp.errors import ModelLoadError
from tests.models import (
    check_against_hf,
    check_preset_model,
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


def write_tiny_opt(path, seed: int = 0, std: float = 0.08, **overrides):
    """Save a tiny random OPTForCausalLM (fp32 safetensors) to ``path``; returns the HF model."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, do_layer_norm_before=True, dropout=0.0, pad_token_id=1,
        bos_token_id=2, eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = randomize_(OPTForCausalLM(OPTConfig(**cfg)), std=std, seed=seed)
    model.save_pretrained(str(path))
    return model


CASES = {
    # 125m / 1.3b / 6.7b style: pre-norm, final LayerNorm, tied head
    "pre-norm": dict(),
    # 350m style: post-norm, no final LayerNorm, project_in / project_out (512 -> 1024 in the real one)
    "post-norm-project": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
    "pre-norm-project": dict(word_embed_proj_dim=48),
    # enable_bias=false and layer_norm_elementwise_affine=false (no biases, parameter-free LayerNorms)
    "no-bias-no-affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opt_matches_transformers(tmp_path, case):
    hf = write_tiny_opt(tmp_path, **CASES[case])
    llm = load_llm(tmp_path)
    # the longest prompt + generation stays within max_position_embeddings (64)
    prompts = [random_prompt(37, VOCAB, seed=1), random_prompt(6, VOCAB, seed=2)]
    check_against_hf(llm, hf, prompts, n_greedy=10)


def test_opt_metaseq_names_and_absent_tie_flag(tmp_path):
    """Checkpoints converted from metaseq have no ``model.`` prefix and configs without
    ``tie_word_embeddings`` (transformers' OPT default: tied)."""
    hf = write_tiny_opt(tmp_path)
    rewrite_checkpoint(str(tmp_path), lambda t: {k.removeprefix("model."): v for k, v in t.items()})
    cfg_path = os.path.join(tmp_path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("tie_word_embeddings", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    llm = load_llm(tmp_path)
    model = llm.engine.model
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    prompt = random_prompt(20, VOCAB)
    assert rel_err(prefill_logits(llm, prompt), hf_logits(hf, prompt)) < 1e-4


def test_opt_triton_kernels(tmp_path):
    """Through the Triton attention kernels, the flat GEMM (prefill) and the GEMV (decode)."""
    hf = write_tiny_opt(tmp_path)
    llm = load_llm(tmp_path)
    check_triton_against_hf(llm, hf, random_prompt(10, VOCAB), decode_linear="gemv", n_decode=1)


def test_opt_missing_tensor(tmp_path):
    write_tiny_opt(tmp_path)
    name = "model.decoder.layers.1.fc2.bias"
    rewrite_checkpoint(str(tmp_path), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_llm(tmp_path)


def test_opt_misshapen_tensor(tmp_path):
    write_tiny_opt(tmp_path)
    name = "model.decoder.layers.0.self_attn.k_proj.weight"
    rewrite_checkpoint(str(tmp_path), lambda t: {**t, name: t[name][:, :-1]})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_llm(tmp_path)


def test_opt_6_7b_preset_config():
    """The benchmark preset has OPT-6.7B's real shapes."""
    from fdpp.config import ModelConfig
    from fdpp.models.opt import opt_options
    from fdpp.models.presets import get_preset

    mc = ModelConfig.from_hf_dict(get_preset("opt-6.7b"))
    assert (mc.num_hidden_layers, mc.hidden_size) == (32, 4096)
    assert (mc.num_attention_heads, mc.num_key_value_heads) == (32, 32)
    assert (mc.intermediate_size, mc.vocab_size, mc.max_position_embeddings) == (16384, 50272, 2048)
    assert mc.hidden_act == "relu"
    opts = opt_options(mc)
    assert opts["pre_norm"] and opts["tied"] and opts["embed_dim"] == 4096
    cls = check_preset_model(mc, "opt-6.7b", 6_658_473_984)  # the published parameter count
    assert cls.__name__ == "OPTForCausalLM"


def test_opt_random_weight_preset(monkeypatch):
    """A preset (random weights, no checkpoint) builds and generates; shrunk from opt-6.7b."""
    from fdpp import LLM, SamplingParams
    from fdpp.models import presets

    tiny = {**presets.PRESETS["opt-6.7b"], "vocab_size": VOCAB, "hidden_size": 64, "ffn_dim": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64}
    monkeypatch.setitem(presets.PRESETS, "tiny-opt-test", tiny)
    llm = LLM("tiny-opt-test", dtype="float32", device="cpu", calibration="off")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate([random_prompt(8, VOCAB)], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_opt_wide_scores_calibrate_synchronized(tmp_path):
    """The paper found OPT-6.7B's attention scores too wide for one unified max: a tiny OPT whose
    q/k weights make scores span hundreds of nats is calibrated to the synchronized softmax, while
    the same model with ordinary weights gets a unified max."""
    from fdpp.engine.loading import calibrate_engine

    texts = [random_prompt(48, VOCAB, seed=s) for s in range(4)]  # token ids: the checkpoint has no tokenizer
    hf = write_tiny_opt(tmp_path / "narrow")
    narrow = calibrate_engine(load_llm(tmp_path / "narrow").engine, texts=texts, save=False)
    assert narrow.mode == "unified", narrow.summary()
    assert all(narrow.phi_for_layer(i) is not None for i in range(2))

    with torch.no_grad():
        for layer in hf.model.decoder.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    hf.save_pretrained(str(tmp_path / "wide"))
    wide = calibrate_engine(load_llm(tmp_path / "wide").engine, texts=texts, save=False)
    assert wide.mode == "synchronized", wide.summary()
    assert all(wide.phi_for_layer(i) is None for i in range(2))
