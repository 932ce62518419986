"""From a model argument (None, a preset name, a folder, a .gguf file) to a model and tokenizer."""
from __future__ import annotations

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
            from fdpp.models.hf_loader import load_hf_config, resolve_model

            src = resolve_model(name)
            preset = load_hf_config(src.path) if src.kind == "hf" else _gguf_config(src)
        mc = ModelConfig.from_hf_dict(preset)
        dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        model = build_model(mc, dtype, device, None, seed=config.seed, show_progress=False)
        return LoadedModel(mc, model, dtype, None, f"{name}-random")

    from fdpp.models.hf_loader import load_hf_config, resolve_model
    from fdpp.tokenizer import load_tokenizer

    src = resolve_model(name)
    if src.kind == "gguf":
        from fdpp.models.gguf_loader import gguf_tensor_names, iter_gguf_tensors, load_gguf_config

        hf_dict = load_gguf_config(src.path)
        mc = ModelConfig.from_hf_dict(hf_dict)
        dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        weights = iter_gguf_tensors(src.path, dtype, config=hf_dict)
        num = len(gguf_tensor_names(src.path))
        st = os.stat(src.path)
        key = f"gguf-{os.path.basename(src.path)}-{st.st_size}"
    else:
        from fdpp.models.hf_loader import count_hf_tensors, iter_hf_tensors

        hf_dict = load_hf_config(src.path)
        mc = ModelConfig.from_hf_dict(hf_dict)
        dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        weights = iter_hf_tensors(src.path, dtype)
        num = count_hf_tensors(src.path)
        key = "hf-" + os.path.abspath(src.path).strip("/").replace("/", "_")
    model = build_model(mc, dtype, device, weights, num_tensors=num, show_progress=config.show_progress)
    tokenizer = load_tokenizer(src)
    return LoadedModel(mc, model, dtype, tokenizer, key, src)


def _gguf_config(src: Any) -> dict[str, Any]:
    from fdpp.models.gguf_loader import load_gguf_config

    return load_gguf_config(src.path)


def apply_calibration(engine: Any, mode: str) -> Any:
    """Set each attention layer's unified max value (phi) from a calibration file.

    ``mode``: "off" (synchronized softmax everywhere), "auto" (use the cached calibration of this
    model, calibrating on first use when attention runs the Triton kernels), or a path to a JSON file.
    Returns the CalibrationResult in use, or None.
    """
    if mode == "off":
        return None
    from fdpp import calibration as cal

    if mode == "auto":
        result = cal.load_or_none(engine.model_key)
        if result is None:
            from fdpp.ops.backend import attention_backend

            if attention_backend(engine.device) != "triton":
                return None  # the reference path does not use phi: nothing to gain now
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
    from fdpp.engine.scheduler import ScheduledBatch
    from fdpp.engine.sequence import Sequence
    from fdpp.ops.backend import use_backends
    from fdpp.sampling_params import SamplingParams

    runner = engine.runner
    bm = engine.block_manager

    def run_model(token_ids: list[int]) -> None:
        n = min(len(token_ids), engine.max_model_len - 1)
        seq = Sequence("calibration", token_ids[:n], SamplingParams(max_tokens=1), 0.0)
        bm.allocate(seq, n)
        try:
            with use_backends(attention="reference"):
                runner.forward_logits(ScheduledBatch([seq], [n], True))
        finally:
            bm.free(seq)

    result = cal.calibrate(
        run_model,
        num_layers=engine.model_config.num_hidden_layers,
        dtype=engine.dtype,
        model_key=engine.model_key,
        texts=texts,
        tokenizer=engine.tokenizer,
    )
    if save:
        result.save(cal.default_path(engine.model_key))
    return result
