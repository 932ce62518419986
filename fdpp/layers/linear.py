"""Linear layers with per-parameter weight loaders (merged QKV and gate/up projections)."""
from __future__ import annotations

import torch
from torch import nn

from fdpp.ops.linear import linear


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        from fdpp.errors import ModelLoadError

        raise ModelLoadError(
            f"tensor {what!r} has shape {tuple(src.shape)} but the model expects {tuple(dst.shape)}; "
            "the checkpoint does not match its config.json"
        )
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
    _copy_checked(param.data, loaded, name)


class Linear(nn.Module):
    """y = x W^T (+ b). ``weight`` is [out_features, in_features], as checkpoints store it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, residual=residual)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (e.g. q, k, v or gate, up).

    ``shard_sizes`` maps a shard id to its number of output rows, in order. Checkpoint tensors of
    each shard are copied into their row range by ``weight_loader(param, tensor, shard_id)``.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for sid, size in shard_sizes.items():
            self.shard_offsets[sid] = (off, size)
            off += size
        self.weight.weight_loader = self._shard_loader
        if self.bias is not None:
            self.bias.weight_loader = self._shard_loader

    def _shard_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "", shard_id=None) -> None:
        if shard_id is None:  # already merged in the checkpoint
            _copy_checked(param.data, loaded, name)
            return
        off, size = self.shard_offsets[shard_id]
        _copy_checked(param.data.narrow(0, off, size), loaded, name)


class GateUpLinear(MergedLinear):
    """Fused [gate; up] projection followed by silu(gate) * up, in one op (a GEMM epilogue on GPU)."""

    def __init__(self, in_features: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__(in_features, {"gate": intermediate_size, "up": intermediate_size}, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, act="silu_and_mul")
