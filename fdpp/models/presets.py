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
}


def register_preset(name: str, hf_config: dict[str, Any]) -> None:
    PRESETS[name] = hf_config


def get_preset(name: str) -> dict[str, Any] | None:
    return PRESETS.get(name.lower())
