"""The attention layer: writes this step's K/V into the paged cache, then attends over it."""
from __future__ import annotations

import torch
from torch import nn

from fdpp.layers.context import get_attention_metadata
from fdpp.ops import attention as attn_ops
from fdpp.ops import rotary as rope_ops
from fdpp.ops.rotary import rope_and_store_kv


class Attention(nn.Module):
    """Paged attention for one layer.

    ``k_cache`` / ``v_cache`` ([num_blocks, block_size, num_kv_heads, head_dim]) are assigned by the
    model runner once the cache is allocated. ``phi`` is the calibrated unified max value of this
    layer's softmax (None: the synchronized online softmax).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_idx: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.phi: float | None = None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
        rotary: nn.Module | None = None,
    ) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D].

        With ``rotary`` (a RotaryEmbedding) and ``positions``, q and k are rotated here, fused with the
        cache write; without, they must be rotated already.
        """
        meta = get_attention_metadata()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if rotary is not None:
            q = rope_and_store_kv(
                q, k, v, positions, rotary.cos_sin_cache, rotary.is_neox,
                self.k_cache, self.v_cache, meta.slot_mapping,
            )
        else:
            attn_ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], rotated, this step's k and v already in the cache -> [T, Hq*D]."""
        out = attn_ops.attention(
            q,
            self.k_cache,
            self.v_cache,
            get_attention_metadata(),
            scale=self.scale,
            layer_idx=self.layer_idx,
            phi=self.phi,
            sliding_window=self.sliding_window,
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def project_rope_store(self, x: torch.Tensor, weight, bias: torch.Tensor | None, positions: torch.Tensor,
                           rotary: nn.Module, norm_weight: torch.Tensor | None = None,
                           norm_eps: float = 1e-6) -> torch.Tensor | None:
        """q [T, Hq, D] rotated, this step's k and v written into the cache, from ONE launch of the merged qkv
        projection ``weight`` of x (``fdpp.ops.rotary.qkv_rope_store``); None where the dispatch does not
        allow it (the caller projects, then calls ``forward``)."""
        return rope_ops.qkv_rope_store(
            x, weight, bias, positions, rotary.cos_sin_cache, rotary.is_neox, self.k_cache, self.v_cache,
            get_attention_metadata().slot_mapping, self.num_heads, norm_weight, norm_eps)
