"""Shared test helpers: tiny random-weight checkpoints written to disk, compared against transformers."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from types import ModuleType

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_bench(name: str) -> ModuleType:
    """Import the benchmark script bench/<name>.py as a module (bench/ on sys.path: the scripts import
    each other's helpers)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_tiny_llama(path: str, **overrides) -> object:
    """Save a tiny random LlamaForCausalLM (fp32, safetensors) to ``path``; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the default init, so tokens differ meaningfully
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()
