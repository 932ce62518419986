"""One rank's linear shapes under tensor parallelism: what its dataflow table is looked up with, and what
``fdpp tune --tensor-parallel-size N`` profiles."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fdpp.distributed.state import check_heads, kv_heads_per_rank


def rank_linear_shapes(config: Any, tp: int, *, with_lm_head: bool = True) -> dict[str, tuple[int, int]]:
    """``{name: (N, K)}`` of one rank's weights (QKV with its heads, O and down with its input columns,
    gate/up and fc1 with its rows, the LM head with ceil(vocab / tp) rows). tp=1: the whole model's."""
    from fdpp.dataflow.shapes import linear_shapes

    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or
                                                       config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if tp > 1:
        check_heads(heads, kv, tp)
        if config.intermediate_size % tp:
            from fdpp.errors import UnsupportedModelError

            raise UnsupportedModelError(f"tensor_parallel_size={tp} does not divide the intermediate size "
                                        f"{config.intermediate_size}")
    rank = SimpleNamespace(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size // tp,
        num_attention_heads=heads // tp, num_key_value_heads=kv_heads_per_rank(kv, tp)[0] if tp > 1 else kv,
        head_dim=head_dim, vocab_size=-(-int(config.vocab_size) // tp), model_type=getattr(config, "model_type", ""),
    )
    shapes = linear_shapes(rank)
    if not with_lm_head:
        shapes.pop("lm_head", None)
    return shapes


def model_config_for(model: str) -> Any:
    """The ModelConfig of a preset name, a model folder or a config.json path."""
    from fdpp.config import ModelConfig
    from fdpp.models.presets import get_preset

    path = Path(model)
    if path.exists():
        cfg_path = path / "config.json" if path.is_dir() else path
        return ModelConfig.from_hf_dict(json.loads(cfg_path.read_text()))
    preset = get_preset(model)
    if preset is None:
        raise KeyError(f"unknown model {model!r}: pass a folder with config.json or a preset name")
    return ModelConfig.from_hf_dict(preset)
