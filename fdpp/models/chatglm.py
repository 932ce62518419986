"""The GLM family: ChatGLM2 / ChatGLM3 (and GLM-4 in the same layout) in THUDM's own checkpoint layout
(``ChatGLMModel``, model_type "chatglm"), and GLM-4 in transformers' layout (``GlmForCausalLM``).

Both are pre-norm decoders with RMSNorm, multi-query / grouped-query attention with QKV bias, SwiGLU,
and a rotary embedding on the first half of each head's dims only, rotating interleaved pairs.

Rotary conventions (checked against ChatGLM2's ``modeling_chatglm.py`` and transformers' GLM):
- ChatGLM2 builds ``RotaryEmbedding(head_dim // 2)``, i.e. ``n_elem = head_dim / 2``, with
  ``theta_i = base ** (-2i / n_elem)`` for ``i < head_dim / 4``; ``apply_rotary_pos_emb`` rotates
  ``x[..., :n_elem]`` viewed as ``(n_elem / 2, 2)`` pairs, ``(x[2i], x[2i+1])`` by angle
  ``pos * theta_i``, and passes ``x[..., n_elem:]`` through; ``rope_ratio`` (ChatGLM3-32k,
  GLM-4) multiplies ``base`` (10000). ModelConfig folds ``rope_ratio`` into ``rope_theta``.
- transformers' GLM uses ``dim = head_dim * partial_rotary_factor`` (0.5), the same ``theta_i``,
  and ``rotate_half`` on ``x[..., 0::2]`` / ``x[..., 1::2]`` with cos/sin repeat-interleaved: the
  same pairs and angles.
- fdpp: ``RotaryEmbedding(rotary_dim=head_dim // 2, is_neox=False)`` does exactly this.

ChatGLM's ``query_key_value`` stacks [q (Hq*D); k (G*D); v (G*D)] rows with multi-query attention
(every released checkpoint), and query head h uses kv group ``h // (Hq / G)``, as fdpp's attention
does; without it (``multi_query_attention: false``) the rows are [q_h; k_h; v_h] head by head and are
reordered while loading; ``dense_h_to_4h`` stacks [gate; up] (SwiGLU is
``silu(first half) * second half``), so both load into fdpp's merged layers as they are.
Attention scale is head_dim**-0.5 (ChatGLM's query-key layer scaling cancels out).
"""
from __future__ import annotations

import torch
from torch import nn

from fdpp.config import ModelConfig
from fdpp.distributed.layers import (
    attention_heads,
    gate_up_linear,
    lm_head,
    qkv_linear,
    row_linear,
    vocab_embedding,
)
from fdpp.errors import UnsupportedModelError
from fdpp.layers.attention import Attention
from fdpp.layers.norm import LayerNorm, RMSNorm
from fdpp.layers.rotary import RotaryEmbedding
from fdpp.models.llama import LlamaForCausalLM


def chatglm_options(config: ModelConfig) -> dict:
    """ChatGLM-specific fields of config.json, with THUDM's ChatGLMConfig defaults."""
    hf = config.hf
    add_bias_linear = bool(hf.get("add_bias_linear", False))
    return {
        "vocab_size": int(hf.get("padded_vocab_size") or config.vocab_size),
        "rmsnorm": bool(hf.get("rmsnorm", True)),
        "qkv_bias": add_bias_linear or bool(hf.get("add_qkv_bias", False)),
        "linear_bias": add_bias_linear,
        "post_layer_norm": bool(hf.get("post_layer_norm", True)),
        "residual_after_norm": bool(hf.get("apply_residual_connection_post_layernorm", False)),
        # without multi-query attention, query_key_value stacks [q_h; k_h; v_h] head by head
        "per_head_qkv": not hf.get("multi_query_attention", True),
    }


def _norm(config: ModelConfig, rmsnorm: bool) -> nn.Module:
    eps = config.rms_norm_eps
    return RMSNorm(config.hidden_size, eps) if rmsnorm else LayerNorm(config.hidden_size, eps)


def glm_rotary(config: ModelConfig, rotary_dim: int) -> RotaryEmbedding:
    """GLM's rotary embedding: interleaved pairs over the first ``rotary_dim`` dims of each head."""
    return RotaryEmbedding(
        rotary_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, is_neox=False
    )


class ChatGLMSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, opts: dict) -> None:
        super().__init__()
        c = config
        heads, kv_heads = attention_heads(c.num_attention_heads, c.num_key_value_heads)  # this rank's
        self.q_size, self.kv_size, self.head_dim = heads * c.head_dim, kv_heads * c.head_dim, c.head_dim
        self.query_key_value = qkv_linear(
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, opts["qkv_bias"]
        )
        if opts["per_head_qkv"]:
            self.query_key_value.weight.weight_loader = self._load_per_head_qkv
            if self.query_key_value.bias is not None:
                self.query_key_value.bias.weight_loader = self._load_per_head_qkv
        self.dense = row_linear(c.q_size, c.hidden_size, bias=opts["linear_bias"])
        self.attn = Attention(heads, kv_heads, c.head_dim, c.head_dim**-0.5, layer_idx)

    def _load_per_head_qkv(
        self, param: nn.Parameter, loaded: torch.Tensor, name: str = "", shard_id: str | None = None
    ) -> None:
        """Reorder a non-multi-query checkpoint's [Hq, (q, k, v), D] rows into fdpp's [(q, k, v), Hq, D]."""
        # the whole tensor's rows (a quantized weight's placeholder is empty; a TP shard has fewer)
        rows = (getattr(param, "tp_full_shape", None) or getattr(param, "logical_shape", param.shape))[0]
        if shard_id is None and loaded.shape[0] == rows:
            heads = loaded.shape[0] // (3 * self.head_dim)
            if isinstance(loaded, torch.Tensor):
                rest = loaded.shape[1:]
                loaded = loaded.reshape(heads, 3, self.head_dim, *rest).transpose(0, 1).reshape(loaded.shape)
            else:  # a quantized weight: the same reordering of whole rows
                perm = torch.arange(rows).reshape(heads, 3, self.head_dim).transpose(0, 1).reshape(-1)
                loaded = loaded.permute_rows(perm.to(loaded.device))
        self.query_key_value._shard_loader(param, loaded, name, shard_id)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, rotary: RotaryEmbedding, residual: torch.Tensor
    ) -> torch.Tensor:
        """Attention of ``hidden`` [T, H] plus ``residual`` (fused into ``dense``'s epilogue)."""
        q, k, v = self.query_key_value(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        T = hidden.shape[0]
        q, k = rotary(positions, q.view(T, -1, self.head_dim), k.view(T, -1, self.head_dim))
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v)
        return self.dense(out, residual=residual)


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ModelConfig, opts: dict) -> None:
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"ChatGLM hidden_act {config.hidden_act!r} is not supported (SwiGLU)")
        bias = opts["linear_bias"]
        self.dense_h_to_4h = gate_up_linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.dense_4h_to_h = row_linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.dense_h_to_4h(x), residual=residual)


class GLMBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, opts: dict) -> None:
        super().__init__()
        self.residual_after_norm = opts["residual_after_norm"]
        self.input_layernorm = _norm(config, opts["rmsnorm"])
        self.self_attention = ChatGLMSelfAttention(config, layer_idx, opts)
        self.post_attention_layernorm = _norm(config, opts["rmsnorm"])
        self.mlp = ChatGLMMLP(config, opts)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        x = self.input_layernorm(hidden)
        hidden = self.self_attention(positions, x, rotary, x if self.residual_after_norm else hidden)
        x = self.post_attention_layernorm(hidden)
        return self.mlp(x, x if self.residual_after_norm else hidden)


class GLMTransformer(nn.Module):
    def __init__(self, config: ModelConfig, opts: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i, opts) for i in range(config.num_hidden_layers))
        self.final_layernorm = _norm(config, opts["rmsnorm"]) if opts["post_layer_norm"] else None


class ChatGLMEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.word_embeddings = vocab_embedding(vocab_size, hidden_size)


class ChatGLMTransformer(nn.Module):
    """``transformer.*`` of a ChatGLM checkpoint. The rotary cache is shared by all layers."""

    def __init__(self, config: ModelConfig, opts: dict) -> None:
        super().__init__()
        if config.tie_word_embeddings:
            raise UnsupportedModelError("ChatGLM checkpoints with tied embeddings are not supported")
        self.embedding = ChatGLMEmbedding(opts["vocab_size"], config.hidden_size)
        self.rotary_pos_emb = glm_rotary(config, config.head_dim // 2)
        self.encoder = GLMTransformer(config, opts)
        self.output_layer = lm_head(opts["vocab_size"], config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding.word_embeddings(input_ids)
        for layer in self.encoder.layers:
            hidden = layer(positions, hidden, self.rotary_pos_emb)
        if self.encoder.final_layernorm is not None:
            hidden = self.encoder.final_layernorm(hidden)
        return hidden


class ChatGLMForCausalLM(nn.Module):
    """ChatGLM2 / ChatGLM3 / GLM-4 (chatglm layout). Parameter names are the checkpoint's own, so
    a missing tensor is reported under the name the checkpoint should have had."""

    packed_modules: dict[str, tuple[str, str]] = {}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = ChatGLMTransformer(config, chatglm_options(config))

    def map_weight_name(self, name: str) -> str | None:
        """Skip the saved rotary buffer (recomputed from the config)."""
        if name.endswith("rotary_pos_emb.inv_freq"):
            return None
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transformer.output_layer(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attention.attn for layer in self.transformer.encoder.layers]


def partial_rotary_factor(config: ModelConfig, default: float = 0.5) -> float:
    """GLM's ``partial_rotary_factor``: top-level in config.json, or inside ``rope_parameters``."""
    hf = config.hf
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    value = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", default))
    return float(value if value is not None else default)


class GlmForCausalLM(LlamaForCausalLM):
    """GLM-4 in transformers' layout (``model.layers.N.self_attn.{q,k,v,o}_proj``, fused
    ``mlp.gate_up_proj``): Llama's structure, with GLM's partial interleaved rotary embedding
    (one cache shared by all layers) and QKV bias from ``attention_bias`` (no bias on o_proj)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        rotary_dim = int(config.head_dim * partial_rotary_factor(config))
        if rotary_dim % 2:
            raise UnsupportedModelError(f"GLM rotary dim {rotary_dim} must be even")
        self.rotary_emb = glm_rotary(config, rotary_dim)
        for layer in self.model.layers:
            layer.self_attn.rotary_emb = self.rotary_emb

