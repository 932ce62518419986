"""Linear layers with per-parameter weight loaders (merged QKV and gate/up projections).

Quantized weights: a weight parameter marked by ``mark_quantized`` (before the model leaves the meta
device) holds no dense data (a 0-element placeholder); its weight loader stores what the checkpoint gives
in ``param.quant`` instead: a ``QuantTensor`` as is (GGUF blocks, AWQ / GPTQ / FP8 checkpoints), a float
tensor quantized on arrival (online quantization), or, for a merged projection whose shards arrive in
different formats, a ``QuantParts``. Tied weights share the parameter, hence its ``quant`` too.
"""
from __future__ import annotations

import torch
from torch import nn

from fdpp.ops.linear import linear
from fdpp.quant.formats import QuantParts, QuantTensor, online_format, online_group_size, quantize


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        from fdpp.errors import ModelLoadError

        raise ModelLoadError(
            f"tensor {what!r} has shape {tuple(src.shape)} but the model expects {tuple(dst.shape)}; "
            "the checkpoint does not match its config.json"
        )
    dst.copy_(src)


def mark_quantized(param: nn.Parameter, shape: tuple[int, int], mode: str, group_size: int = 128) -> None:
    """Make ``param`` (a weight of logical ``shape`` [N, K], still on the meta device) a quantized weight.

    ``mode``: a format name (fp8 | int8 | int4 | a GGUF block type) to quantize float tensors into at load
    (and to fill with random weights), or ``"keep"`` to store what the checkpoint gives (quantized tensors
    as they are, float tensors dense)."""
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    param.quant_mode = mode
    param.quant_group_size = group_size
    param.logical_shape = tuple(shape)


def weight_of(param: nn.Parameter) -> torch.Tensor | QuantTensor | QuantParts:
    """What a matmul reads: the quantized weight when the parameter has one, else the parameter."""
    q = getattr(param, "quant", None)
    return param if q is None else q


def _as_stored(param: nn.Parameter, loaded, name: str):
    """A checkpoint tensor as a quantized parameter keeps it: quantized (online) or as given."""
    mode = param.quant_mode
    if mode != "keep":
        if isinstance(loaded, QuantTensor):  # re-quantizing a quantized checkpoint: the user asked for it
            loaded = loaded.dequantize(torch.float32)
        fmt = online_format(mode, int(loaded.shape[1]), name)
        return quantize(loaded.to(param.device), fmt, _group_for(fmt, param.quant_group_size, loaded.shape[1], name))
    return loaded.to(param.device) if isinstance(loaded, QuantTensor) else loaded.to(param.device, param.dtype)


def _group_for(fmt: str, group_size: int, k: int, name: str) -> int:
    """The scale group size of ``fmt`` for K (``online_group_size``: int4 / int8 the requested one, else the
    largest of 128/64/32 dividing K; int8 then per channel; fp8 per channel unless asked)."""
    try:
        return online_group_size(fmt, k, group_size)
    except ValueError as e:
        from fdpp.errors import UnsupportedModelError

        raise UnsupportedModelError(f"cannot quantize {name or 'a weight'} to {fmt}: {e}") from None


def set_quant_weight(param: nn.Parameter, parts: list, name: str = "") -> None:
    """Set a quantized parameter from its (row-ordered) parts: one QuantTensor, dense, or mixed parts."""
    shape = param.logical_shape
    if sum(p.shape[0] for p in parts) != shape[0] or any(p.shape[1] != shape[1] for p in parts):
        from fdpp.errors import ModelLoadError

        got = [list(p.shape) for p in parts]
        raise ModelLoadError(f"tensor {name!r} has shape(s) {got} but the model expects {list(shape)}; "
                             "the checkpoint does not match its config")
    if all(isinstance(p, torch.Tensor) for p in parts):  # a float checkpoint tensor kept dense
        param.data = torch.cat(parts).to(param.dtype) if len(parts) > 1 else parts[0].to(param.dtype).contiguous()
        param.quant = None
    elif all(isinstance(p, QuantTensor) for p in parts) and len({p.layout_key() for p in parts}) == 1:
        param.quant = QuantTensor.cat(parts) if len(parts) > 1 else parts[0]
    else:
        param.quant = QuantParts(parts)


def default_weight_loader(param: nn.Parameter, loaded, name: str = "") -> None:
    if getattr(param, "quant_mode", None) is not None:
        set_quant_weight(param, [_as_stored(param, loaded, name)], name)
        return
    if isinstance(loaded, QuantTensor):
        raise _unexpected_quant(name, loaded)
    _copy_checked(param.data, loaded, name)


def _unexpected_quant(name: str, loaded: QuantTensor) -> Exception:
    from fdpp.errors import UnsupportedModelError

    return UnsupportedModelError(f"tensor {name!r} is quantized ({loaded.fmt}) but its layer takes only dense "
                                 "weights; load with quantization='none' (--quantization none) to dequantize it at load")


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                norm: nn.Module | None = None) -> torch.Tensor:
        """``norm``: an RMSNorm applied to x first, fused into the kernel's prologue on a GPU."""
        return linear(x, weight_of(self.weight), self.bias, residual=residual, **norm_kwargs(norm))


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

    def _shard_loader(self, param: nn.Parameter, loaded, name: str = "", shard_id=None) -> None:
        if getattr(param, "quant_mode", None) is not None:
            self._quant_shard_loader(param, loaded, name, shard_id)
            return
        if isinstance(loaded, QuantTensor):
            raise _unexpected_quant(name, loaded)
        if shard_id is None:  # already merged in the checkpoint
            _copy_checked(param.data, loaded, name)
            return
        off, size = self.shard_offsets[shard_id]
        _copy_checked(param.data.narrow(0, off, size), loaded, name)

    def _quant_shard_loader(self, param: nn.Parameter, loaded, name: str, shard_id) -> None:
        """Shards of a quantized merged weight are kept until all arrived, then joined in row order (each
        keeps its own scales: every format is row-wise)."""
        if shard_id is None:
            set_quant_weight(param, [_as_stored(param, loaded, name)], name)
            return
        if loaded.shape[0] != self.shard_offsets[shard_id][1]:
            from fdpp.errors import ModelLoadError

            raise ModelLoadError(f"tensor {name!r} has {loaded.shape[0]} rows but shard {shard_id!r} of the "
                                 f"model has {self.shard_offsets[shard_id][1]}; the checkpoint does not match its config")
        pending = getattr(param, "pending_shards", None)
        if pending is None:
            pending = param.pending_shards = {}
        pending[shard_id] = _as_stored(param, loaded, name)
        if len(pending) == len(self.shard_offsets):
            set_quant_weight(param, [pending[sid] for sid in self.shard_offsets], name)
            del param.pending_shards


class GateUpLinear(MergedLinear):
    """Fused [gate; up] projection followed by silu(gate) * up, in one op (a GEMM epilogue on GPU)."""

    def __init__(self, in_features: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__(in_features, {"gate": intermediate_size, "up": intermediate_size}, bias)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        return linear(x, weight_of(self.weight), self.bias, act="silu_and_mul", **norm_kwargs(norm))


def norm_kwargs(norm: nn.Module | None) -> dict:
    """The ``linear`` keywords of a fused RMSNorm prologue (an RMSNorm layer: ``weight`` and ``eps``)."""
    return {} if norm is None else {"norm_weight": norm.weight, "norm_eps": norm.eps}
