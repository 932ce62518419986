"""Tensor-parallel layers and the factories models build their layers with.

Outside a ``tp_context`` (TP=1) the factories return the plain layers of ``fdpp.layers`` unchanged, so a
single device runs exactly what it ran before. Inside one they return the sharded layers below:

- column-parallel (QKV with its query and KV heads split per rank, merged [gate; up], OPT's fc1): each
  rank holds a slice of the output rows; no communication;
- row-parallel (o / down / OPT's out_proj and fc2, ChatGLM's dense layers): each rank holds a slice of the
  input columns; the partial products are summed by an all-reduce. The bias and a fused residual are
  added by rank 0 alone, before the sum, so they count once;
- vocab-parallel embedding (each rank looks up its vocabulary range, zeros elsewhere, all-reduce) and LM
  head (each rank's logits slice, gathered along the vocabulary).

Each sharded parameter has ``tp_full_shape``, the shape of the whole tensor (as a TP=1 model holds it),
and a weight loader that takes the whole checkpoint tensor and keeps only this rank's slice: only the
shard reaches the device. Random weights are drawn whole and sliced the same way, so a TP=N model with
random weights equals the TP=1 one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdpp.distributed.state import TPGroup, check_heads, current_tp, kv_heads_per_rank
from fdpp.layers.embedding import LMHead, VocabEmbedding
from fdpp.layers.linear import GateUpLinear, Linear, MergedLinear, _copy_checked, weight_of
from fdpp.ops.linear import linear
from fdpp.quant.formats import QuantTensor


def _refuse_quantized(param: nn.Parameter, loaded, name: str) -> None:
    if getattr(param, "quant_mode", None) is not None or isinstance(loaded, QuantTensor):
        raise NotImplementedError(
            f"{name or 'a weight'}: quantized weights cannot be sharded for tensor parallelism yet; "
            "load with tensor_parallel_size=1, or quantization='none' to dequantize")


def _mark_full(param: nn.Parameter | None, shape: tuple[int, ...]) -> None:
    if param is not None:
        param.tp_full_shape = tuple(shape)


def _check_rows(loaded: torch.Tensor, rows: int, name: str, what: str) -> None:
    if loaded.shape[0] != rows:
        from fdpp.errors import ModelLoadError

        raise ModelLoadError(f"tensor {name!r} has {loaded.shape[0]} rows but {what} of the model has {rows}; "
                             "the checkpoint does not match its config.json")


class _ShardedMerged:
    """Loader of a merged column-parallel layer: shard ``sid`` of the whole tensor has ``full[sid]`` rows,
    of which this rank keeps ``src[sid] = (start, size)``."""

    full: dict[str, int]
    src: dict[str, tuple[int, int]]

    def _init_shards(self, full: dict[str, int], src: dict[str, tuple[int, int]], in_features: int) -> None:
        self.full, self.src = full, src
        total = sum(full.values())
        _mark_full(self.weight, (total, in_features))
        _mark_full(self.bias, (total,))

    def _shard_loader(self, param: nn.Parameter, loaded, name: str = "", shard_id=None) -> None:
        _refuse_quantized(param, loaded, name)
        if shard_id is None:  # merged in the checkpoint (or a whole random tensor): split it first
            _check_rows(loaded, sum(self.full.values()), name, "the merged layer")
            for sid, part in zip(self.full, loaded.split(list(self.full.values()), dim=0)):
                self._load_part(param, part, sid, name)
            return
        self._load_part(param, loaded, shard_id, name)

    def _load_part(self, param: nn.Parameter, part: torch.Tensor, sid: str, name: str) -> None:
        _check_rows(part, self.full[sid], name, f"shard {sid!r}")
        start, size = self.src[sid]
        off, _ = self.shard_offsets[sid]
        _copy_checked(param.data.narrow(0, off, size), part.narrow(0, start, size), name)


class QKVParallelLinear(_ShardedMerged, MergedLinear):
    """[q; k; v] with this rank's query heads and KV heads (one replicated KV head when there are fewer KV
    heads than ranks: query head h reads KV head h // (heads / kv_heads), which stays on the rank)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 tp: TPGroup) -> None:
        check_heads(num_heads, num_kv_heads, tp.size)
        hq = num_heads // tp.size
        kv, share = kv_heads_per_rank(num_kv_heads, tp.size)
        kv_start = (tp.rank // share) * kv
        D = head_dim
        super().__init__(hidden, {"q": hq * D, "k": kv * D, "v": kv * D}, bias)
        self._init_shards({"q": num_heads * D, "k": num_kv_heads * D, "v": num_kv_heads * D},
                          {"q": (tp.rank * hq * D, hq * D), "k": (kv_start * D, kv * D),
                           "v": (kv_start * D, kv * D)}, hidden)
        self.weight.weight_loader = self._shard_loader
        if self.bias is not None:
            self.bias.weight_loader = self._shard_loader


class GateUpParallelLinear(_ShardedMerged, GateUpLinear):
    """[gate; up] with this rank's slice of the intermediate dimension (silu(gate) * up stays local)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TPGroup) -> None:
        if intermediate % tp.size:
            from fdpp.errors import UnsupportedModelError

            raise UnsupportedModelError(f"tensor_parallel_size={tp.size} does not divide the intermediate size "
                                        f"{intermediate}; choose a size that divides it")
        part = intermediate // tp.size
        super().__init__(hidden, part, bias)
        self._init_shards({"gate": intermediate, "up": intermediate},
                          {"gate": (tp.rank * part, part), "up": (tp.rank * part, part)}, hidden)
        self.weight.weight_loader = self._shard_loader
        if self.bias is not None:
            self.bias.weight_loader = self._shard_loader


class ColumnParallelLinear(Linear):
    """y[:, rows of this rank] = x W_r^T (+ b_r): the output rows split over the ranks (OPT's fc1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        if out_features % tp.size:
            from fdpp.errors import UnsupportedModelError

            raise UnsupportedModelError(f"tensor_parallel_size={tp.size} does not divide {out_features} "
                                        "output features; choose a size that divides it")
        self.tp_rows = out_features // tp.size
        super().__init__(in_features, self.tp_rows, bias)
        self.tp_start = tp.rank * self.tp_rows
        self.tp_full_out = out_features
        _mark_full(self.weight, (out_features, in_features))
        _mark_full(self.bias, (out_features,))
        self.weight.weight_loader = self._load
        if self.bias is not None:
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded, name: str = "") -> None:
        _refuse_quantized(param, loaded, name)
        _check_rows(loaded, self.tp_full_out, name, "the layer")
        _copy_checked(param.data, loaded.narrow(0, self.tp_start, self.tp_rows), name)


class RowParallelLinear(Linear):
    """y = sum over ranks of x_r W_r^T, plus the bias and the residual once (rank 0 adds them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        if in_features % tp.size:
            from fdpp.errors import UnsupportedModelError

            raise UnsupportedModelError(f"tensor_parallel_size={tp.size} does not divide {in_features} "
                                        "input features; choose a size that divides it")
        self.tp_cols = in_features // tp.size
        super().__init__(self.tp_cols, out_features, bias)
        self.tp = tp
        self.tp_start = tp.rank * self.tp_cols
        self.tp_full_in = in_features
        _mark_full(self.weight, (out_features, in_features))
        self.weight.weight_loader = self._load  # the bias is whole on every rank (default loader)

    def _load(self, param: nn.Parameter, loaded, name: str = "") -> None:
        _refuse_quantized(param, loaded, name)
        if loaded.dim() != 2 or loaded.shape[1] != self.tp_full_in:
            from fdpp.errors import ModelLoadError

            raise ModelLoadError(f"tensor {name!r} has shape {tuple(loaded.shape)} but the model expects "
                                 f"{(self.out_features, self.tp_full_in)}; the checkpoint does not match its config")
        _copy_checked(param.data, loaded.narrow(1, self.tp_start, self.tp_cols), name)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        first = self.tp.rank == 0
        out = linear(x, weight_of(self.weight), self.bias if first else None,
                     residual=residual if first else None)
        return self.tp.all_reduce(out)


def _vocab_load(module: nn.Module, param: nn.Parameter, loaded, name: str = "") -> None:
    """Rows [start, start + per) of a [vocab, ...] tensor; the padding rows past the vocabulary are 0."""
    _refuse_quantized(param, loaded, name)
    _check_rows(loaded, module.tp_vocab, name, "the vocabulary")
    start, per = module.tp_start, module.tp_per
    n = max(0, min(per, module.tp_vocab - start))
    param.data.zero_()
    if n:
        _copy_checked(param.data.narrow(0, 0, n), loaded.narrow(0, start, n), name)


class VocabParallelEmbedding(VocabEmbedding):
    """Each rank holds ceil(vocab / ranks) rows; ids outside its range look up zeros; all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        per = -(-vocab_size // tp.size)
        super().__init__(per, hidden_size)
        self.tp, self.tp_vocab, self.tp_per, self.tp_start = tp, vocab_size, per, tp.rank * per
        _mark_full(self.weight, (vocab_size, hidden_size))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded, name: str = "") -> None:
        _vocab_load(self, param, loaded, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.tp_start
        inside = (local >= 0) & (local < self.tp_per)
        out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(LMHead):
    """Each rank's logits over its vocabulary rows, gathered on every rank (padding columns dropped)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool, tp: TPGroup) -> None:
        per = -(-vocab_size // tp.size)
        super().__init__(per, hidden_size, bias)
        self.tp, self.tp_vocab, self.tp_per, self.tp_start = tp, vocab_size, per, tp.rank * per
        _mark_full(self.weight, (vocab_size, hidden_size))
        _mark_full(self.bias, (vocab_size,))
        self.weight.weight_loader = self._load
        if self.bias is not None:
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded, name: str = "") -> None:
        _vocab_load(self, param, loaded, name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = linear(hidden, weight_of(self.weight), self.bias).float()
        return self.tp.all_gather_last(local)[..., : self.tp_vocab]


# ---- factories: the plain layer at TP=1, the sharded one inside a tp_context ----------------------
def qkv_linear(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> MergedLinear:
    """Merged [q; k; v] projection (shard ids "q", "k", "v")."""
    tp = current_tp()
    if tp is None:
        D = head_dim
        return MergedLinear(hidden, {"q": num_heads * D, "k": num_kv_heads * D, "v": num_kv_heads * D}, bias=bias)
    return QKVParallelLinear(hidden, num_heads, num_kv_heads, head_dim, bias, tp)


def gate_up_linear(hidden: int, intermediate: int, bias: bool = False) -> GateUpLinear:
    """Merged [gate; up] projection followed by silu(gate) * up."""
    tp = current_tp()
    return GateUpLinear(hidden, intermediate, bias) if tp is None else GateUpParallelLinear(
        hidden, intermediate, bias, tp)


def column_linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    """A linear layer whose output rows may be split over the ranks (its consumer must be row-parallel)."""
    tp = current_tp()
    return Linear(in_features, out_features, bias) if tp is None else ColumnParallelLinear(
        in_features, out_features, bias, tp)


def row_linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    """A linear layer whose input columns may be split over the ranks (sums the partial products)."""
    tp = current_tp()
    return Linear(in_features, out_features, bias) if tp is None else RowParallelLinear(
        in_features, out_features, bias, tp)


def vocab_embedding(vocab_size: int, hidden_size: int) -> VocabEmbedding:
    """The token embedding, split over the ranks by vocabulary range."""
    tp = current_tp()
    return VocabEmbedding(vocab_size, hidden_size) if tp is None else VocabParallelEmbedding(
        vocab_size, hidden_size, tp)


def lm_head(vocab_size: int, hidden_size: int, bias: bool = False) -> LMHead:
    """The LM head, split over the ranks by vocabulary range (full logits on every rank)."""
    tp = current_tp()
    return LMHead(vocab_size, hidden_size, bias) if tp is None else ParallelLMHead(
        vocab_size, hidden_size, bias, tp)


def attention_heads(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(query heads, KV heads) of one rank's attention."""
    tp = current_tp()
    if tp is None:
        return num_heads, num_kv_heads
    check_heads(num_heads, num_kv_heads, tp.size)
    return num_heads // tp.size, kv_heads_per_rank(num_kv_heads, tp.size)[0]
