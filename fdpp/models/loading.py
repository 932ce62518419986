"""From a model argument (None, a preset name, a folder, a .gguf file) to a built model with its weights.

Model-level only: the tokenizer and calibration are the engine's business (``fdpp.engine.loading``)."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fdpp.config import EngineConfig, ModelConfig, resolve_dtype
from fdpp.errors import ModelLoadError
from fdpp.models.loader import build_model
from fdpp.models.presets import PRESETS, get_preset
from fdpp.utils import dtype_name, phase

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model_config: ModelConfig
    model: nn.Module
    dtype: torch.dtype
    model_key: str  # identifies the weights, for caches (calibration)
    source: Any = None  # the ModelSource read (None for random weights)


def load_model(config: EngineConfig, device: torch.device) -> LoadedModel:
    """Build ``config.model`` on ``device``: random weights for a preset (or ``random_weights``), else
    the checkpoint's weights streamed in."""
    name = config.model
    preset = get_preset(name) if isinstance(name, str) and not os.path.exists(name) else None
    if preset is None and isinstance(name, str) and _is_bare_name(name):
        raise _unknown_model(name)
    from fdpp.quant.config import resolve_quant_plan

    if preset is not None or config.random_weights:
        if preset is None:
            from fdpp.models.hf_loader import load_model_config, resolve_model

            preset = load_model_config(resolve_model(name))
        mc = _extend_context(ModelConfig.from_hf_dict(preset), config.max_model_len)
        dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        quant = resolve_quant_plan(config.quantization, preset, "hf", device, random_weights=True)
        model = build_model(mc, dtype, device, None, seed=config.seed, show_progress=False, quant=quant,
                            packed_cpu_int4=_packed_cpu_int4(config))
        key = f"{name}-random-{dtype_name(dtype)}" + (f"-{quant.tag}" if quant.tag else "")
        return LoadedModel(mc, model, dtype, key)

    from fdpp.models.hf_loader import iter_model_tensors, load_model_config, resolve_model

    src = resolve_model(name)
    # a GGUF header with a large vocabulary takes seconds to parse (once: the weights and the
    # tokenizer reuse the open reader)
    with phase(f"Reading {src.name}", config.show_progress and src.kind == "gguf"):
        hf_dict = load_model_config(src)
    mc = _extend_context(ModelConfig.from_hf_dict(hf_dict), config.max_model_len)
    dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
    quant = resolve_quant_plan(config.quantization, hf_dict, src.kind, device)
    weights = iter_model_tensors(src, dtype, config=hf_dict, quant=quant)
    if src.kind == "gguf":
        from fdpp.models.gguf_loader import gguf_tensor_names

        num: int | None = len(gguf_tensor_names(src.path))
        key = f"gguf-{src.name}-{os.stat(src.path).st_size}"
    else:
        num = None
        key = "hf-" + os.path.abspath(src.path).strip("/").replace("/", "_")
    key += "-" + dtype_name(dtype)  # the safe window of phi depends on the dtype
    key += f"-{quant.tag}" if quant.tag else ""  # and on the weights' quantization
    model = build_model(mc, dtype, device, weights, num_tensors=num, show_progress=config.show_progress,
                        quant=quant, packed_cpu_int4=_packed_cpu_int4(config))
    return LoadedModel(mc, model, dtype, key, src)


def _packed_cpu_int4(config: EngineConfig) -> bool:
    """Whether the engine's linear backend on the CPU is ``cpu`` (the default), which multiplies 4- and 8-bit
    weights in PyTorch's packed int4 kernel instead of dequantizing them."""
    return getattr(config, "linear_backend", "auto") in ("auto", "cpu")


def _is_bare_name(name: str) -> bool:
    """A word (no path separator, no file suffix) that is not an existing path: meant as a preset."""
    path = os.path.expanduser(name)
    return not os.path.exists(path) and os.sep not in name and "/" not in name and not name.endswith(".gguf")


def _unknown_model(name: str) -> ModelLoadError:
    names = sorted(PRESETS)
    close = difflib.get_close_matches(name.lower(), names, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ModelLoadError(
        f"model {name!r} is neither an existing path nor a preset name.{hint} Presets (random weights, "
        f"real shapes): {', '.join(names)}. For real weights give a Hugging Face folder or a .gguf file; "
        "with no model the embedded SmolLM2-135M-Instruct is used"
    )


def _extend_context(mc: ModelConfig, max_model_len: int | None) -> ModelConfig:
    """Allow a max_model_len beyond the model's trained context (benchmarks), with a warning."""
    if max_model_len is None or max_model_len <= mc.max_position_embeddings:
        return mc
    logger.warning(
        "max_model_len=%d exceeds the model's max_position_embeddings=%d: quality past it is not assured",
        max_model_len, mc.max_position_embeddings,
    )
    return dataclasses.replace(mc, max_position_embeddings=max_model_len)
