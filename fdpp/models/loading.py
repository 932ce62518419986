"""From a model argument (None, a preset name, a folder, a .gguf file) to a model and tokenizer."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fdpp.config import EngineConfig, ModelConfig, resolve_dtype
from fdpp.models.loader import build_model
from fdpp.models.presets import get_preset

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model_config: ModelConfig
    model: nn.Module
    dtype: torch.dtype
    tokenizer: Any  # a transformers tokenizer, or None for random-weight presets
    model_key: str  # identifies the weights, for caches (calibration)
    source: Any = None


def load_model_and_tokenizer(config: EngineConfig, device: torch.device) -> LoadedModel:
    name = config.model
    preset = get_preset(name) if isinstance(name, str) and not os.path.exists(name) else None
    if preset is not None or config.random_weights:
        if preset is None:
            from fdpp.models.hf_loader import load_model_config, resolve_model

            preset = load_model_config(resolve_model(name))
        mc = _extend_context(ModelConfig.from_hf_dict(preset), config.max_model_len)
        dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        model = build_model(mc, dtype, device, None, seed=config.seed, show_progress=False)
        return LoadedModel(mc, model, dtype, None, f"{name}-random-{str(dtype).removeprefix('torch.')}")

    from fdpp.models.hf_loader import iter_model_tensors, load_model_config, resolve_model
    from fdpp.tokenizer import load_tokenizer

    src = resolve_model(name)
    hf_dict = load_model_config(src)
    mc = _extend_context(ModelConfig.from_hf_dict(hf_dict), config.max_model_len)
    dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
    weights = iter_model_tensors(src, dtype, config=hf_dict)
    if src.kind == "gguf":
        from fdpp.models.gguf_loader import gguf_tensor_names

        num: int | None = len(gguf_tensor_names(src.path))
        key = f"gguf-{src.name}-{os.stat(src.path).st_size}"
    else:
        num = None
        key = "hf-" + os.path.abspath(src.path).strip("/").replace("/", "_")
    key += "-" + str(dtype).removeprefix("torch.")  # the safe window of phi depends on the dtype
    model = build_model(mc, dtype, device, weights, num_tensors=num, show_progress=config.show_progress)
    tokenizer = load_tokenizer(src) if _has_tokenizer(src) else None
    if tokenizer is None:
        logger.warning("%s has no tokenizer files: prompts must be token ids and outputs have no text", src.path)
    return LoadedModel(mc, model, dtype, tokenizer, key, src)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _extend_context(mc: ModelConfig, max_model_len: int | None) -> ModelConfig:
    """Allow a max_model_len beyond the model's trained context (benchmarks), with a warning."""
    if max_model_len is None or max_model_len <= mc.max_position_embeddings:
        return mc
    logger.warning(
        "max_model_len=%d exceeds the model's max_position_embeddings=%d: quality past it is not assured",
        max_model_len, mc.max_position_embeddings,
    )
    return dataclasses.replace(mc, max_position_embeddings=max_model_len)


def _has_tokenizer(src: Any) -> bool:
    return src.kind == "gguf" or any(os.path.exists(os.path.join(src.path, f)) for f in _TOKENIZER_FILES)


def apply_calibration(engine: Any, mode: str) -> Any:
    """Set each attention layer's unified max value (phi) from a calibration file.

    ``mode``: "off" (synchronized softmax everywhere), "auto" (use the cached calibration of this
    model, calibrating on first use when attention runs the Triton kernels), or a path to a JSON file.
    Returns the CalibrationResult in use, or None.
    """
    from fdpp.ops.backend import attention_backend

    if mode == "off":
        return None
    if mode == "auto" and attention_backend(engine.device) != "triton":
        return None  # only the Triton kernels use phi
    from fdpp import calibration as cal

    if mode == "auto":
        result = cal.load_or_none(engine.model_key)
        if result is None:
            result = calibrate_engine(engine)
    else:
        result = cal.CalibrationResult.load(mode)
    set_phi(engine.model, result)
    return result


def set_phi(model: nn.Module, result: Any) -> None:
    for attn in model.attention_layers():
        attn.phi = None if result is None else result.phi_for_layer(attn.layer_idx)


def calibrate_engine(engine: Any, texts: list[str] | None = None, save: bool = True) -> Any:
    """Run the built-in calibration text through the model and record per-layer score statistics."""
    from fdpp import calibration as cal
    from fdpp.ops.backend import use_backends

    def run_model(token_ids: list[int]) -> None:
        with use_backends(attention="reference"):
            engine.prompt_logits(token_ids[: engine.max_model_len - 1])

    if texts is None and engine.tokenizer is None:
        # random-weight models have no tokenizer: calibrate on random token ids
        gen = torch.Generator().manual_seed(0)
        texts = [torch.randint(0, engine.model_config.vocab_size, (256,), generator=gen).tolist() for _ in range(2)]
    return cal.calibrate(
        run_model,
        num_layers=engine.model_config.num_hidden_layers,
        dtype=engine.dtype,
        model_key=engine.model_key,
        texts=texts,
        tokenizer=engine.tokenizer,
        save=save,
    )
