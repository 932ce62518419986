"""The Llama family: Llama-2, Llama-3.x, Mistral, SmolLM2, Qwen2 (QKV bias) share this code.

RMSNorm, RoPE (with linear / llama3 scaling), GQA/MQA, SwiGLU, optionally tied embeddings.
Parameter names follow Hugging Face's, with q/k/v and gate/up merged (see ``packed_modules``).
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
from fdpp.layers.attention import Attention
from fdpp.layers.linear import norm_kwargs, weight_of
from fdpp.layers.norm import RMSNorm
from fdpp.layers.rotary import RotaryEmbedding


def layer_sliding_window(c: ModelConfig, layer_idx: int) -> int | None:
    """The attention window of one layer: transformers' ``layer_types`` when given; Qwen2 windows only
    the layers from ``max_window_layers`` on; otherwise every layer has the config's window."""
    w = c.sliding_window
    if w is None:
        return None
    types = c.hf.get("layer_types")
    if types:
        return w if types[layer_idx] == "sliding_attention" else None
    if c.model_type == "qwen2":
        return w if layer_idx >= c.hf.get("max_window_layers", 0) else None
    return w


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_bias: bool, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        c = config
        heads, kv_heads = attention_heads(c.num_attention_heads, c.num_key_value_heads)  # this rank's
        self.q_size, self.kv_size = heads * c.head_dim, kv_heads * c.head_dim
        self.qkv_proj = qkv_linear(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, qkv_bias)
        self.o_proj = row_linear(c.q_size, c.hidden_size, bias=c.attention_bias and not qkv_bias)
        self.rotary_emb = rotary_emb  # NOTE: one module (one cos/sin cache) shared by all layers
        self.fuse_rope = False  # set by LlamaForCausalLM.set_fuse_rope
        self.attn = Attention(
            heads,
            kv_heads,
            c.head_dim,
            c.head_dim**-0.5,
            layer_idx,
            sliding_window=layer_sliding_window(c, layer_idx),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``norm``: RMSNorm of ``hidden`` fused into the qkv projection; ``residual``: added by o_proj.
        With ``fuse_rope``, where the qkv projection is a GEMV, it also rotates q and k and writes k and v
        into the cache (one launch instead of two)."""
        if self.fuse_rope:
            q = self.attn.project_rope_store(
                hidden, weight_of(self.qkv_proj.weight), self.qkv_proj.bias, positions, self.rotary_emb,
                **norm_kwargs(norm))
            if q is not None:
                return self.o_proj(self.attn.attend(q), residual=residual)
        qkv = self.qkv_proj(hidden, norm=norm)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = self.attn(q, k, v, positions=positions, rotary=self.rotary_emb)
        return self.o_proj(out, residual=residual)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            from fdpp.errors import UnsupportedModelError

            raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported for Llama (silu)")
        self.gate_up_proj = gate_up_linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = row_linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x, norm=norm), residual=residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_bias: bool, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias, rotary_emb)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fuse_norm = False  # set by LlamaForCausalLM.set_fuse_norm

    def forward(self, positions, hidden, residual):
        if self.fuse_norm:
            # ``hidden`` is the residual stream itself: each norm runs in the prologue of the projection
            # after it, each residual add in the epilogue of the projection before it (no norm launch).
            hidden = self.self_attn(positions, hidden, norm=self.input_layernorm, residual=hidden)
            return self.mlp(hidden, norm=self.post_attention_layernorm, residual=hidden), None
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        c = config
        self.embed_tokens = vocab_embedding(c.vocab_size, c.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling, is_neox=True
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(c, i, qkv_bias, self.rotary_emb) for i in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        if residual is None:  # fused norms: hidden is the residual stream
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (parameter name fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    qkv_bias = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.qkv_bias or config.attention_bias)
        self.lm_head = lm_head(config.vocab_size, config.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (re-done after the model leaves the meta device)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def set_fuse_norm(self, enabled: bool) -> None:
        """Fuse each decoder layer's RMSNorms into the qkv / gate_up projections (and the residual adds
        into o / down); same math, 64 fewer launches per step for a 32-layer model."""
        for layer in self.model.layers:
            layer.fuse_norm = enabled

    def set_fuse_rope(self, enabled: bool) -> None:
        """Let each layer's qkv projection, where it is a GEMV, rotate q and k and write k and v into the
        KV cache in its epilogue (``Attention.project_rope_store``); same math, one launch fewer a layer."""
        for layer in self.model.layers:
            layer.self_attn.fuse_rope = enabled

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class MistralForCausalLM(LlamaForCausalLM):
    pass
