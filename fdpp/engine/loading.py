"""Engine-level loading glue: the model (``fdpp.models.loading``), its tokenizer, and calibration.

Kept out of ``fdpp.models`` so models never import the tokenizer or calibration; calibration itself
(``fdpp.calibration.calibrate``) takes a callable that runs the model, not the engine.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from fdpp.config import EngineConfig
from fdpp.models.loading import LoadedModel, load_model
from fdpp.utils import phase

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_model_and_tokenizer(config: EngineConfig, device: torch.device) -> tuple[LoadedModel, Any]:
    """The model and its tokenizer (a transformers tokenizer; None for random weights or a folder
    without tokenizer files)."""
    loaded = load_model(config, device)
    return loaded, load_tokenizer(config, loaded)


def load_tokenizer(config: EngineConfig, loaded: LoadedModel) -> Any:
    """The tokenizer of ``loaded`` (or ``config.tokenizer``); None for random weights or no tokenizer files."""
    from fdpp.tokenizer import load_tokenizer

    if config.tokenizer is not None:
        with phase("Loading the tokenizer", config.show_progress):
            tokenizer = load_tokenizer(config.tokenizer)
        _check_vocab(tokenizer, loaded.model_config.vocab_size, config.tokenizer)
        return tokenizer
    src = loaded.source
    if src is None:
        return None

    tokenizer = None
    if _has_tokenizer(src):
        with phase("Loading the tokenizer", config.show_progress):
            tokenizer = load_tokenizer(src)
    if tokenizer is None:
        logger.warning("%s has no tokenizer files: prompts must be token ids and outputs have no text", src.path)
    return tokenizer


def _check_vocab(tokenizer: Any, vocab_size: int, where: str) -> None:
    """A tokenizer given apart from the model must not produce ids the model's embedding lacks."""
    from fdpp.errors import ModelLoadError

    n = len(tokenizer)
    if n > vocab_size:
        raise ModelLoadError(
            f"the tokenizer {where!r} has {n} tokens but the model's vocabulary has only {vocab_size}: its ids "
            "would index past the embedding; use the model's own tokenizer or one with at most that many tokens"
        )


def _has_tokenizer(src: Any) -> bool:
    return src.kind == "gguf" or any(os.path.exists(os.path.join(src.path, f)) for f in _TOKENIZER_FILES)


def apply_calibration(engine: Any, mode: str) -> Any:
    """Set each attention layer's unified max value (phi) from a calibration file.

    ``mode``: "off" (synchronized softmax everywhere), "auto" (use the cached calibration of this
    model, calibrating on first use when attention runs the Triton kernels), or a path to a JSON file.
    Returns the CalibrationResult in use, or None.
    """
    if mode == "off":
        return None
    if mode == "auto" and engine.backends.attention != "triton":
        return None  # only the Triton kernels use phi
    from fdpp import calibration as cal

    if mode == "auto":
        result = cal.load_or_none(engine.model_key)
        if result is None:
            with phase("Calibrating the unified max value (first use of this model; cached after)",
                       engine.config.show_progress):
                result = calibrate_engine(engine)
    else:
        result = cal.CalibrationResult.load(mode)
    set_phi(engine.model, result)
    return result


def set_phi(model: nn.Module, result: Any) -> None:
    """Give each attention layer its unified max value from ``result`` (None: synchronized softmax)."""
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
