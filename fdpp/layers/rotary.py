"""Rotary embedding layer: owns the cos/sin cache (a buffer built after weights are placed)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdpp.ops.rotary import apply_rotary, build_cos_sin_cache


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        rotary_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        is_neox: bool = True,
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.is_neox = is_neox
        self.register_buffer("cos_sin_cache", torch.empty(max_positions, rotary_dim), persistent=False)

    def init_buffers(self) -> None:
        """Called once the module is on its device (the model is built on the meta device)."""
        self.cos_sin_cache = build_cos_sin_cache(
            self.rotary_dim, self.max_positions, self.theta, self.scaling, self.cos_sin_cache.device
        )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return apply_rotary(q, k, positions, self.cos_sin_cache, self.is_neox)
