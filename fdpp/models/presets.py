"""Real model shapes by name, for benchmarks with random weights (nothing is downloaded)."""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float16",
        bos_token_id=1, eos_token_id=2,
    ),
    "llama-2-13b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=5120,
        intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float16",
        bos_token_id=1, eos_token_id=2,
    ),
    "llama-2-70b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=8192,
        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float16",
        bos_token_id=1, eos_token_id=2,
    ),
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
        bos_token_id=128000, eos_token_id=128001,
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
    ),
    "opt-6.7b": dict(
        architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272, hidden_size=4096,
        ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
        do_layer_norm_before=True, word_embed_proj_dim=4096, activation_function="relu",
        enable_bias=True, tie_word_embeddings=True, torch_dtype="float16",
        bos_token_id=2, eos_token_id=2, pad_token_id=1,
    ),
    "chatglm2-6b": dict(
        architectures=["ChatGLMModel"], model_type="chatglm", padded_vocab_size=65024, hidden_size=4096,
        ffn_hidden_size=13696, num_layers=28, num_attention_heads=32, multi_query_attention=True,
        multi_query_group_num=2, kv_channels=128, seq_length=32768, layernorm_epsilon=1e-5,
        rmsnorm=True, add_bias_linear=False, add_qkv_bias=True, post_layer_norm=True,
        apply_residual_connection_post_layernorm=False, original_rope=True, tie_word_embeddings=False,
        torch_dtype="float16", eos_token_id=2, pad_token_id=0,
    ),
}


def register_preset(name: str, hf_config: dict[str, Any]) -> None:
    PRESETS[name] = hf_config


def get_preset(name: str) -> dict[str, Any] | None:
    return PRESETS.get(name.lower())
