"""Tiny checkpoints of every family for the tensor-parallel tests, with every parameter random (biases
and norm weights too, so a bias or residual added once per rank instead of once shows)."""
from __future__ import annotations

import json
import os

import torch

PROMPT = [1, 5, 7, 9, 11, 3, 60, 17]
NUM_TOKENS = 6

_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-6, eos_token_id=2)
FAMILIES: dict[str, dict] = {
    # 2 KV heads: split at TP=2, replicated at TP=4; vocab 101 is padded on every TP size
    "llama": dict(_BASE, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=101,
                  num_key_value_heads=2),
    "mistral": dict(_BASE, architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=96,
                    num_key_value_heads=1, sliding_window=4),  # MQA: one KV head on every rank
    "qwen2": dict(_BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=96,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "opt": dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=101, hidden_size=64, ffn_dim=128,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=True,
                word_embed_proj_dim=64, activation_function="relu", enable_bias=True, eos_token_id=2),
    "chatglm": dict(architectures=["ChatGLMModel"], model_type="chatglm", padded_vocab_size=96, hidden_size=64,
                    ffn_hidden_size=96, num_layers=2, num_attention_heads=4, multi_query_attention=True,
                    multi_query_group_num=2, kv_channels=16, seq_length=128, layernorm_epsilon=1e-5, rmsnorm=True,
                    add_bias_linear=False, add_qkv_bias=True, post_layer_norm=True, eos_token_id=2),
    "glm": dict(_BASE, architectures=["GlmForCausalLM"], model_type="glm", vocab_size=96, num_key_value_heads=2,
                head_dim=16, attention_bias=True, partial_rotary_factor=0.5),
}


def write_family(name: str, path: str, seed: int = 0) -> str:
    """A checkpoint (config.json + model.safetensors in fdpp's parameter names, merged q/k/v and gate/up)."""
    from safetensors.torch import save_file

    from fdpp.config import ModelConfig
    from fdpp.models.loader import build_model

    cfg = FAMILIES[name]
    model = build_model(ModelConfig.from_hf_dict(cfg), torch.float32, torch.device("cpu"), None, seed=seed,
                        show_progress=False)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and not pname.endswith("bias"):
                p.copy_(1.0 + 0.1 * noise)  # norm weights
            else:
                p.copy_(0.08 * noise)
            tensors[pname] = p.detach().clone().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def greedy_and_logits(path: str, tensor_parallel_size: int = 1) -> dict:
    """The prompt logits and NUM_TOKENS greedy tokens of the checkpoint at ``path``."""
    from fdpp import LLM, SamplingParams

    llm = LLM(path, dtype="float32", device="cpu", show_progress=False, calibration="off", num_blocks=32,
              block_size=4, tensor_parallel_size=tensor_parallel_size)
    try:
        logits = llm.engine.prompt_logits(PROMPT)
        out = llm.generate([PROMPT], SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
        return {"logits": logits, "tokens": out[0].outputs[0].token_ids}
    finally:
        llm.close()
