"""The linear-layer shapes [N, K] of a model: what the dataflow tuner profiles and the table is keyed by.

A decoder has few distinct linear shapes (the paper's observation): QKV, O, the first FFN matrix (a
fused [gate; up] of 2 * ffn rows for gated FFNs), the second FFN matrix and the LM head. Weights are in
their loaded layout [N, K] (out_features, in_features).
"""
from __future__ import annotations

from typing import Any

# Model types whose FFN has no gate (fc1 [ffn, hidden] -> act -> fc2 [hidden, ffn]).
_UNGATED_MODEL_TYPES = frozenset({"opt", "gpt2", "gpt_neox", "gptj", "bloom", "falcon", "phi", "starcoder2"})


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (N, K)}`` for every linear layer shape of a model described by ``config``.

    ``config`` is a ``fdpp.config.ModelConfig`` or anything with the fields hidden_size,
    intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size (and optionally
    model_type). Gated FFNs give ``gate_up`` / ``down``; ungated ones (OPT and similar) ``fc1`` / ``fc2``.
    """
    hidden = int(config.hidden_size)
    ffn = int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    shapes = {"qkv": (q_size + 2 * kv_size, hidden), "o": (hidden, q_size)}
    if getattr(config, "model_type", "") in _UNGATED_MODEL_TYPES:
        shapes["fc1"] = (ffn, hidden)
        shapes["fc2"] = (hidden, ffn)
    else:
        shapes["gate_up"] = (2 * ffn, hidden)
        shapes["down"] = (hidden, ffn)
    shapes["lm_head"] = (int(config.vocab_size), hidden)
    return shapes


# The paper's and the benchmark's models (fp16 checkpoints on the HF hub), written out so that the tuner
# and the benchmark need neither network nor config files.
PRESET_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "llama-2-7b": {
        "qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
        "lm_head": (32000, 4096),
    },
    "llama-2-13b": {
        "qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (27648, 5120), "down": (5120, 13824),
        "lm_head": (32000, 5120),
    },
    "llama-2-70b": {
        "qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672),
        "lm_head": (32000, 8192),
    },
    "llama-3-8b": {
        "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
        "lm_head": (128256, 4096),
    },
    "opt-6.7b": {
        "qkv": (12288, 4096), "o": (4096, 4096), "fc1": (16384, 4096), "fc2": (4096, 16384),
        "lm_head": (50272, 4096),
    },
    "chatglm2-6b": {
        "qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696),
        "lm_head": (65024, 4096),
    },
}


def preset_shapes(name: str, *, with_lm_head: bool = True) -> dict[str, tuple[int, int]]:
    """Shapes of a preset model by name (case-insensitive; ``Llama-2-7B`` and ``llama-2-7b`` both work)."""
    key = name.lower().split("/")[-1]
    key = key.removesuffix("-hf").removesuffix("-chat")
    if key not in PRESET_SHAPES:
        raise KeyError(f"no preset shapes for model {name!r}; known presets: {sorted(PRESET_SHAPES)}")
    shapes = dict(PRESET_SHAPES[key])
    if not with_lm_head:
        shapes.pop("lm_head", None)
    return shapes
