"""Architecture name (config.json "architectures") -> model class."""
from __future__ import annotations

import importlib

from fdpp.config import ModelConfig
from fdpp.errors import UnsupportedModelError

# architecture -> "module:Class", imported on demand
_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "fdpp.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "fdpp.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "fdpp.models.llama:Qwen2ForCausalLM",
    "OPTForCausalLM": "fdpp.models.opt:OPTForCausalLM",
    "ChatGLMModel": "fdpp.models.chatglm:ChatGLMForCausalLM",
    "ChatGLMForConditionalGeneration": "fdpp.models.chatglm:ChatGLMForCausalLM",
    "GlmForCausalLM": "fdpp.models.chatglm:GlmForCausalLM",
}


def register_model(architecture: str, target: str) -> None:
    _MODELS[architecture] = target


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(config: ModelConfig):
    target = _MODELS.get(config.architecture)
    if target is None:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} (model_type {config.model_type!r}) is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
