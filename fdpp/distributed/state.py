"""The tensor-parallel group a model is built for, and how heads and rows are split over its ranks.

A model reads the group while it is constructed (``tp_context``); its sharded layers keep it, so nothing
module-wide decides how an already-built model runs. Outside a ``tp_context`` a model is built whole
(TP=1, the plain layers: no overhead).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPGroup:
    """One rank's view of its tensor-parallel group.

    ``device_group``: the collectives of the forward pass (NCCL on GPUs, gloo on the CPU);
    ``cpu_group``: a gloo group for the per-step broadcast of the engine's inputs."""

    rank: int
    size: int
    device_group: Any = None
    cpu_group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (returns ``x``)."""
        import torch.distributed as dist

        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension (rank order)."""
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.device_group)
        return torch.cat(parts, dim=-1)


_current: TPGroup | None = None


def current_tp() -> TPGroup | None:
    """The group a model under construction is sharded for; None: not sharded (TP=1)."""
    return _current


@contextlib.contextmanager
def tp_context(group: TPGroup | None) -> Iterator[None]:
    """Build models inside this block sharded for ``group`` (None or size 1: whole)."""
    global _current
    prev = _current
    _current = group if group is not None and group.size > 1 else None
    try:
        yield
    finally:
        _current = prev


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(KV heads on each rank, ranks sharing one KV head). With fewer KV heads than ranks every rank
    holds one KV head, replicated over ``tp // num_kv_heads`` ranks."""
    if num_kv_heads >= tp:
        return num_kv_heads // tp, 1
    return 1, tp // num_kv_heads


def check_heads(num_heads: int, num_kv_heads: int, tp: int, what: str = "the model") -> None:
    """Raise UnsupportedModelError unless ``tp`` ranks can split these heads evenly."""
    from fdpp.errors import UnsupportedModelError

    if num_heads % tp:
        raise UnsupportedModelError(
            f"tensor_parallel_size={tp} does not divide the {num_heads} attention heads of {what}; "
            f"choose a tensor_parallel_size that divides {num_heads}")
    if (num_kv_heads >= tp and num_kv_heads % tp) or (num_kv_heads < tp and tp % num_kv_heads):
        raise UnsupportedModelError(
            f"tensor_parallel_size={tp} and the {num_kv_heads} KV heads of {what} do not fit: the size must "
            f"divide the KV heads, or be a multiple of them (KV heads are then replicated)")


def rank_model_config(config: Any, tp: int) -> Any:
    """A ``ModelConfig`` with one rank's heads (what its KV cache holds); the same config for tp=1."""
    if tp <= 1:
        return config
    check_heads(config.num_attention_heads, config.num_key_value_heads, tp)
    kv, _ = kv_heads_per_rank(config.num_key_value_heads, tp)
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp,
                               num_key_value_heads=kv)
