"""Token embedding and the LM head (which may share the embedding's weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdpp.layers.linear import default_weight_loader, weight_of
from fdpp.ops.linear import linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        q = getattr(self.weight, "quant", None)
        if q is not None:  # a quantized table (e.g. a GGUF Q8_0 token_embd): dequantize the rows looked up
            rows = q.rows(input_ids.reshape(-1)).dequantize(self.weight.dtype)
            return rows.reshape(*input_ids.shape, q.shape[1])
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """logits = h W^T, in fp32. With ``tied`` the weight is the embedding's (set by the model)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(vocab_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, weight_of(self.weight), self.bias).float()
