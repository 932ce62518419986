"""ChatGLM2/3 (THUDM's checkpoint layout) and GLM-4 (transformers' layout) against transformers'
GlmForCausalLM on the same weights (fp32, CPU).

transformers has no ChatGLM2 class, so a GlmForCausalLM's weights are written in ChatGLM2's names
(q/k/v stacked into query_key_value, [gate; up] as dense_h_to_4h) with a ChatGLM2 config.json.
That GLM and ChatGLM2 agree on rotary is checked separately against a transcription of ChatGLM2's
rotary code (test_rotary_conventions_agree).
"""
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
    save_safetensors_checkpoint,
)

VOCAB = 128


def tiny_glm(num_kv_heads: int = 2, rope_theta: float = 10000.0, layers: int = 2, seed: int = 0):
    """A random transformers GlmForCausalLM: hidden 64, 4 heads of 16 (rotary on the first 8)."""
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(seed)
    return randomize_(GlmForCausalLM(cfg), seed=seed)


def chatglm_config(hf_cfg, rope_ratio: float | None = None, rmsnorm: bool = True, mqa: bool = True) -> dict:
    """A ChatGLM2/3 config.json with hf_cfg's shapes (the keys THUDM's ChatGLMConfig writes)."""
    cfg = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "num_layers": hf_cfg.num_hidden_layers, "hidden_size": hf_cfg.hidden_size,
        "ffn_hidden_size": hf_cfg.intermediate_size, "num_attention_heads": hf_cfg.num_attention_heads,
        "kv_channels": hf_cfg.head_dim, "multi_query_attention": mqa,
        "multi_query_group_num": hf_cfg.num_key_value_heads, "padded_vocab_size": hf_cfg.vocab_size,
        "seq_length": hf_cfg.max_position_embeddings, "layernorm_epsilon": hf_cfg.rms_norm_eps,
        "rmsnorm": rmsnorm, "add_bias_linear": False, "add_qkv_bias": True, "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "original_rope": True, "tie_word_embeddings": False,
        "torch_dtype": "float32", "eos_token_id": 2, "pad_token_id": 0,
    }
    if rope_ratio is not None:
        cfg["rope_ratio"] = rope_ratio
    return cfg


def glm_to_chatglm(hf_model, mqa: bool = True) -> dict[str, torch.Tensor]:
    """GlmForCausalLM weights renamed (and q/k/v stacked) into ChatGLM2's checkpoint layout: [q; k; v]
    with multi-query attention, else [q_h; k_h; v_h] head by head (Megatron's layout)."""
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    c = hf_model.config
    rot = c.head_dim // 2
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
        # a buffer real ChatGLM2 checkpoints carry (fdpp recomputes it)
        "transformer.rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, rot, 2) / rot),
    }
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = (sd[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv")
            if mqa:
                qkv = torch.cat([q, k, v])
            else:  # [H, 3, D, ...] head by head
                qkv = torch.stack([t.unflatten(0, (-1, c.head_dim)) for t in (q, k, v)], dim=1).flatten(0, 2)
            out[f"{dst}self_attention.query_key_value.{part}"] = qkv
        out[f"{dst}self_attention.dense.weight"] = sd[f"{src}self_attn.o_proj.weight"]
        out[f"{dst}mlp.dense_h_to_4h.weight"] = sd[f"{src}mlp.gate_up_proj.weight"]
        out[f"{dst}mlp.dense_4h_to_h.weight"] = sd[f"{src}mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for k, v in sd.items():
                if k.startswith(f"{src}{norm}."):
                    out[dst + k[len(src):]] = v
    for k, v in sd.items():  # final norm bias (LayerNorm variant)
        if k == "model.norm.bias":
            out["transformer.encoder.final_layernorm.bias"] = v
    return out


def write_chatglm(path, hf_model, mqa: bool = True, **config_kw) -> None:
    config = chatglm_config(hf_model.config, mqa=mqa, **config_kw)
    save_safetensors_checkpoint(str(path), glm_to_chatglm(hf_model, mqa), config)


# ------------------------------------------------------------------------------------------------
# rotary conventions
# ------------------------------------------------------------------------------------------------

def chatglm2_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """ChatGLM2's rotary, transcribed step by step from its modeling code: a RotaryEmbedding of
    dim head_dim // 2 builds a [T, dim/2, 2] (cos, sin) cache; apply_rotary_pos_emb views the first
    dim channels of each head as (dim/2, 2) pairs, rotates each pair, and passes the rest through."""
    T, H, D = x.shape
    n_elem = D // 2
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    idx_theta = torch.outer(positions.float(), theta)
    cache = torch.stack([idx_theta.cos(), idx_theta.sin()], dim=-1)
    x_rot, x_pass = x[..., :n_elem], x[..., n_elem:]
    xs = x_rot.reshape(T, H, n_elem // 2, 2)
    c = cache.view(T, 1, n_elem // 2, 2)
    out = torch.stack(
        [xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1], xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1
    )
    return torch.cat([out.flatten(-2), x_pass], dim=-1)


@pytest.mark.parametrize("rope_ratio", [1.0, 16.0])
def test_rotary_conventions_agree(rope_ratio):
    """ChatGLM2's rotary == transformers' GLM rotary (partial 0.5, interleaved) == fdpp's."""
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding, apply_rotary_pos_emb

    from fdpp.config import ModelConfig
    from fdpp.models.chatglm import glm_rotary

    base = 10000.0 * rope_ratio
    T, H, D = 50, 3, 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    positions = torch.arange(T) * 3  # spread out, so high positions are exercised

    expected_q, expected_k = chatglm2_rotary(q, positions, base), chatglm2_rotary(k, positions, base)

    hf_model = tiny_glm(rope_theta=base)
    cos, sin = GlmRotaryEmbedding(hf_model.config)(q, positions[None])
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(hq[0].transpose(0, 1), expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hk[0].transpose(0, 1), expected_k, rtol=1e-5, atol=1e-5)

    mc = ModelConfig.from_hf_dict(chatglm_config(hf_model.config, rope_ratio=rope_ratio))
    assert mc.rope_theta == base
    rotary = glm_rotary(mc, D // 2)
    rotary.init_buffers()
    fq, fk = rotary(positions, q, k)
    torch.testing.assert_close(fq, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fk, expected_k, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# ChatGLM2 / ChatGLM3 layout
# ------------------------------------------------------------------------------------------------

CHATGLM_CASES = {
    "chatglm2-2groups": dict(num_kv_heads=2, rope_ratio=None),
    "chatglm3-32k-mqa-rope_ratio": dict(num_kv_heads=1, rope_ratio=4.0),
    # multi_query_attention: false (no released checkpoint; per-head q/k/v rows)
    "no-multi-query": dict(num_kv_heads=4, rope_ratio=None, mqa=False),
}


@pytest.mark.parametrize("case", list(CHATGLM_CASES))
def test_chatglm_matches_glm(tmp_path, case):
    kw = CHATGLM_CASES[case]
    ratio = kw["rope_ratio"]
    hf = tiny_glm(kw["num_kv_heads"], rope_theta=10000.0 * (ratio or 1.0))
    write_chatglm(tmp_path, hf, mqa=kw.get("mqa", True), rope_ratio=ratio)
    llm = load_llm(tmp_path)
    assert type(llm.engine.model).__name__ == "ChatGLMForCausalLM"
    prompts = [random_prompt(37, VOCAB, seed=1), random_prompt(9, VOCAB, seed=2)]
    check_against_hf(llm, hf, prompts, n_greedy=10)


def test_chatglm_layernorm_variant(tmp_path):
    """rmsnorm: false -> LayerNorm (weight and bias); compared with GLM whose norms are swapped too."""
    hf = tiny_glm()
    g = torch.Generator().manual_seed(3)
    eps = hf.config.rms_norm_eps

    def layer_norm() -> torch.nn.LayerNorm:
        ln = torch.nn.LayerNorm(hf.config.hidden_size, eps=eps)
        with torch.no_grad():
            ln.weight.copy_(1 + 0.1 * torch.randn(ln.weight.shape, generator=g))
            ln.bias.copy_(0.1 * torch.randn(ln.bias.shape, generator=g))
        return ln

    for layer in hf.model.layers:
        layer.input_layernorm, layer.post_attention_layernorm = layer_norm(), layer_norm()
    hf.model.norm = layer_norm()
    write_chatglm(tmp_path, hf, rmsnorm=False)
    llm = load_llm(tmp_path)
    check_against_hf(llm, hf, [random_prompt(21, VOCAB)], n_greedy=6)


def test_chatglm_triton_kernels(tmp_path):
    """Through the Triton attention kernels, the flat GEMM (prefill) and the GEMV (decode)."""
    hf = tiny_glm(num_kv_heads=2)
    write_chatglm(tmp_path, hf)
    llm = load_llm(tmp_path)
    check_triton_against_hf(llm, hf, random_prompt(10, VOCAB), decode_linear="gemv", n_decode=1)


def test_chatglm_missing_tensor(tmp_path):
    hf = tiny_glm()
    write_chatglm(tmp_path, hf)
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    rewrite_checkpoint(str(tmp_path), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_llm(tmp_path)


def test_chatglm_misshapen_tensor(tmp_path):
    hf = tiny_glm()
    write_chatglm(tmp_path, hf)
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    rewrite_checkpoint(str(tmp_path), lambda t: {**t, name: t[name][:-16]})  # one kv head short
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_llm(tmp_path)


def test_chatglm2_6b_preset_config():
    """The benchmark preset has ChatGLM2-6B's real shapes."""
    from fdpp.config import ModelConfig
    from fdpp.models.chatglm import chatglm_options
    from fdpp.models.presets import get_preset

    mc = ModelConfig.from_hf_dict(get_preset("chatglm2-6b"))
    assert (mc.num_hidden_layers, mc.hidden_size, mc.num_attention_heads) == (28, 4096, 32)
    assert (mc.num_key_value_heads, mc.head_dim, mc.intermediate_size) == (2, 128, 13696)
    assert (mc.vocab_size, mc.max_position_embeddings) == (65024, 32768)
    assert mc.rms_norm_eps == 1e-5 and mc.rope_theta == 10000.0
    assert chatglm_options(mc)["qkv_bias"] and not chatglm_options(mc)["linear_bias"]
    cls = check_preset_model(mc, "chatglm2-6b", 6_243_584_000)  # the published parameter count
    assert cls.__name__ == "ChatGLMForCausalLM"


def test_chatglm_random_weight_preset(monkeypatch):
    """A preset (random weights, no checkpoint) builds and generates; shrunk from chatglm2-6b."""
    from fdpp import LLM, SamplingParams
    from fdpp.models import presets

    tiny = {**presets.PRESETS["chatglm2-6b"], "padded_vocab_size": VOCAB, "hidden_size": 64,
            "ffn_hidden_size": 96, "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
            "seq_length": 128}
    monkeypatch.setitem(presets.PRESETS, "tiny-chatglm-test", tiny)
    llm = LLM("tiny-chatglm-test", dtype="float32", device="cpu", calibration="off")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate([random_prompt(8, VOCAB)], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# ------------------------------------------------------------------------------------------------
# GLM-4 in transformers' layout
# ------------------------------------------------------------------------------------------------

def test_glm_transformers_layout(tmp_path):
    hf = tiny_glm(num_kv_heads=2, rope_theta=20000.0)
    hf.save_pretrained(str(tmp_path))
    llm = load_llm(tmp_path)
    assert type(llm.engine.model).__name__ == "GlmForCausalLM"
    prompts = [random_prompt(37, VOCAB, seed=4), random_prompt(5, VOCAB, seed=5)]
    check_against_hf(llm, hf, prompts, n_greedy=10)


def test_glm_top_level_partial_rotary_factor(tmp_path):
    """Older GLM-4 (-hf) configs keep rope_theta and partial_rotary_factor at the top level."""
    hf = tiny_glm(rope_theta=10000.0)
    hf.save_pretrained(str(tmp_path))
    cfg_path = os.path.join(tmp_path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["partial_rotary_factor"] = params["rope_theta"], params["partial_rotary_factor"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    llm = load_llm(tmp_path)
    prompt = random_prompt(16, VOCAB)
    assert rel_err(prefill_logits(llm, prompt), hf_logits(hf, prompt)) < 1e-4


def test_glm_triton_kernels(tmp_path):
    """GLM-4 (transformers layout) through the Triton attention kernels and the flat GEMM."""
    hf = tiny_glm(num_kv_heads=2)
    hf.save_pretrained(str(tmp_path))
    check_triton_against_hf(load_llm(tmp_path), hf, random_prompt(12, VOCAB), decode_linear="flat", n_decode=3)
