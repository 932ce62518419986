"""OPT (Meta's Open Pre-trained Transformers, ``OPTForCausalLM``), one of FlashDecoding++'s paper models.

Differences from Llama:
- learned absolute position embeddings, looked up at ``position + 2`` (fairseq's padding offset);
- LayerNorm with bias; pre-norm (``do_layer_norm_before=True``: 125m, 1.3b, 6.7b, ...) or post-norm
  (350m) decoder layers; the final LayerNorm exists only in the pre-norm variant;
- ReLU FFN (``fc1`` / ``fc2``), biases on every projection (``enable_bias``);
- no rotary embedding; queries scaled by head_dim**-0.5 (inside the attention op);
- ``project_in`` / ``project_out`` when ``word_embed_proj_dim`` != ``hidden_size`` (350m);
- the LM head is tied to the token embedding unless config.json says ``tie_word_embeddings: false``
  (OPT's configs leave the key out, and transformers' default for OPT is True).

Parameter names follow Hugging Face's (``model.decoder.layers.N.self_attn.q_proj...``), with q/k/v
merged into ``qkv_proj``. Checkpoints converted from metaseq omit the ``model.`` prefix
(``decoder.layers...``); ``map_weight_name`` adds it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdpp.config import ModelConfig
from fdpp.distributed.layers import (
    attention_heads,
    column_linear,
    lm_head,
    qkv_linear,
    row_linear,
    vocab_embedding,
)
from fdpp.errors import UnsupportedModelError
from fdpp.layers.attention import Attention
from fdpp.layers.embedding import VocabEmbedding
from fdpp.layers.linear import Linear
from fdpp.layers.norm import LayerNorm
from fdpp.ops.norm import layer_norm

# OPT's learned position embedding has 2 extra leading rows: position p uses row p + 2.
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which OPT uses


def opt_options(config: ModelConfig) -> dict:
    """OPT-specific fields of config.json, with transformers' OPTConfig defaults."""
    hf = config.hf
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    return {
        "pre_norm": pre_norm,
        "bias": bool(hf.get("enable_bias", True)),
        "affine": bool(hf.get("layer_norm_elementwise_affine", True)),
        "final_norm": pre_norm and not hf.get("_remove_final_layer_norm", False),
        "embed_dim": int(hf.get("word_embed_proj_dim") or config.hidden_size),
        "tied": bool(hf.get("tie_word_embeddings", True)),
    }


class _PlainLayerNorm(nn.Module):
    """LayerNorm without learned weight and bias (``layer_norm_elementwise_affine=False``)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("ones", torch.empty(hidden_size), persistent=False)

    def init_buffers(self) -> None:
        self.ones = torch.ones_like(self.ones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.ones, None, self.eps)


def _layer_norm(hidden_size: int, affine: bool) -> nn.Module:
    return LayerNorm(hidden_size, LAYER_NORM_EPS) if affine else _PlainLayerNorm(hidden_size, LAYER_NORM_EPS)


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, bias: bool) -> None:
        super().__init__()
        c = config
        if c.num_key_value_heads != c.num_attention_heads:
            raise UnsupportedModelError("OPT has no grouped-query attention: remove num_key_value_heads")
        heads, _ = attention_heads(c.num_attention_heads, c.num_attention_heads)  # this rank's
        self.q_size = heads * c.head_dim
        self.qkv_proj = qkv_linear(c.hidden_size, c.num_attention_heads, c.num_attention_heads, c.head_dim, bias)
        self.out_proj = row_linear(c.q_size, c.hidden_size, bias=bias)
        self.attn = Attention(heads, heads, c.head_dim, c.head_dim**-0.5, layer_idx)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of ``hidden`` [T, H]; ``residual`` (if given) is added to the output."""
        q, k, v = self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v), residual=residual)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = opt_options(config)
        if config.hidden_act != "relu":
            raise UnsupportedModelError(f"OPT activation {config.hidden_act!r} is not supported (relu)")
        self.pre_norm = opts["pre_norm"]
        self.self_attn = OPTAttention(config, layer_idx, opts["bias"])
        self.self_attn_layer_norm = _layer_norm(config.hidden_size, opts["affine"])
        self.fc1 = column_linear(config.hidden_size, config.intermediate_size, bias=opts["bias"])
        self.fc2 = row_linear(config.intermediate_size, config.hidden_size, bias=opts["bias"])
        self.final_layer_norm = _layer_norm(config.hidden_size, opts["affine"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # attention block: residual add fused into out_proj's epilogue
        x = self.self_attn_layer_norm(hidden) if self.pre_norm else hidden
        hidden = self.self_attn(x, residual=hidden)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        # FFN block
        x = self.final_layer_norm(hidden) if self.pre_norm else hidden
        hidden = self.fc2(F.relu(self.fc1(x)), residual=hidden)
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        opts = opt_options(config)
        hidden, embed_dim = config.hidden_size, opts["embed_dim"]
        self.embed_tokens = vocab_embedding(config.vocab_size, embed_dim)
        self.embed_positions = VocabEmbedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = Linear(embed_dim, hidden) if embed_dim != hidden else None
        self.project_out = Linear(hidden, embed_dim) if embed_dim != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = _layer_norm(hidden, opts["affine"]) if opts["final_norm"] else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    # checkpoint name fragment -> (parameter name fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        opts = opt_options(config)
        self.tied = opts["tied"]
        self.model = OPTModel(config)
        self.lm_head = lm_head(config.vocab_size, opts["embed_dim"])
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head (re-done after the model leaves the meta device)."""
        if self.tied:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def map_weight_name(self, name: str) -> str | None:
        """Checkpoint name -> parameter name (None: skip). Adds the ``model.`` prefix metaseq-converted
        checkpoints lack and drops ``lm_head.weight`` when it is tied to the embedding."""
        if name.startswith("decoder."):
            name = "model." + name
        if name == "lm_head.weight" and self.tied:
            return None
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]
