"""Quantized models end to end on tiny checkpoints: online fp8 / int8 / int4, AWQ, GPTQ and FP8
(compressed-tensors) folders, GGUF files kept in their blocks (mixed types in one merged QKV included).

Each quantized model is compared with its *dequantized twin*: a transformers model holding the very
weights the quantized format represents (dequantized to fp32). Logits must match the twin as tightly as
two fp32 implementations do, on the reference path and through the Triton kernels (interpreted); 4-bit
formats also through the CPU's packed int4 kernel (bfloat16 activations: a looser bound)."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from fdpp.errors import UnsupportedModelError
from fdpp.quant.formats import QuantParts, QuantTensor, quantize
from fdpp.quant.packing import quant_to_awq, quant_to_gptq
from tests.helpers import write_tiny_llama
from tests.models import (
    check_against_hf,
    check_cpu_int4_against_hf,
    check_triton_against_hf,
    load_llm,
    random_prompt,
    save_safetensors_checkpoint,
)

gguf = pytest.importorskip("gguf")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    return path, write_tiny_llama(path)


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def _twin(hf_model, weights: dict[str, torch.Tensor]):
    """A copy of ``hf_model`` with some weights replaced (the dequantized values)."""
    twin = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, w in weights.items():
            twin.get_parameter(name).copy_(w)
    return twin




@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", "q4_k"])
def test_online_quantization_matches_its_dequantized_twin(tiny, fmt):
    """(q4_k: the tiny model's K = 64 / 96 are not multiples of 256, so its weights take the Q4_1 fallback.)"""
    from fdpp.quant.formats import online_format

    path, hf = tiny
    llm = load_llm(path, quantization=fmt, linear_backend="reference")
    model = llm.engine.model
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    stored = online_format(fmt, qkv.quant.shape[1])
    assert isinstance(qkv.quant, QuantTensor) and qkv.quant.fmt == stored and qkv.numel() == 0
    assert getattr(model.lm_head.weight, "quant", None) is None  # the LM head stays dense
    # the twin: each weight quantized independently with the scale groups online quantization picks
    # (int8 / int4: 64 for K = 64, 32 for K = 96; fp8: per channel)
    assert qkv.quant.group_size == {"fp8": 0, "int8": 64, "int4": 64, "q4_k": 0}[fmt]
    deq = {n: quantize(w, online_format(fmt, w.shape[1])).dequantize()
           for n, w in hf.state_dict().items() if _is_linear(n)}
    twin = _twin(hf, deq)
    prompts = [random_prompt(9, 128, seed=s) for s in (1, 2)]
    check_against_hf(llm, twin, prompts, n_greedy=4)
    if fmt in ("int4", "q4_k"):
        check_cpu_int4_against_hf(llm, twin, prompts[0])
    if fmt != "q4_k":  # its Q4_1 fallback runs through the Triton GEMV in the GGUF test below
        check_triton_against_hf(llm, twin, prompts[0][:6], "gemv", n_decode=1, unified=False)
    # and the quantization itself is close to the fp32 model
    from tests.models import hf_logits, prefill_logits, rel_err

    err = rel_err(prefill_logits(llm, prompts[0]), hf_logits(hf, prompts[0]))
    assert err < {"fp8": 0.08, "int8": 0.02, "int4": 0.25, "q4_k": 0.25}[fmt], err
    llm.close()


def _quantized_folder(path, hf, method: str, tmp_path, **qc) -> tuple[str, object]:
    """Write ``hf``'s weights as an AWQ / GPTQ / FP8 checkpoint; returns (folder, dequantized twin)."""
    tensors, deq = {}, {}
    for name, w in hf.state_dict().items():
        if not _is_linear(name):
            tensors[name] = w
            continue
        prefix = name.removesuffix(".weight")
        if method in ("awq", "gptq"):
            qt = quantize(w, "int4", 32)
            if method == "awq":
                parts = dict(zip(("qweight", "qzeros", "scales"), quant_to_awq(qt)))
            else:
                parts = dict(zip(("qweight", "qzeros", "scales", "g_idx"), quant_to_gptq(qt)))
                if qc.get("desc_act"):
                    parts["g_idx"] = parts["g_idx"].flip(0)
            tensors.update({f"{prefix}.{k}": v for k, v in parts.items()})
            deq[name] = qt.dequantize()
        elif method == "int8":  # compressed-tensors INT8, strategy group (32), symmetric: zero points of 0
            qt = quantize(w, "int8", 32)
            tensors[f"{prefix}.weight"] = qt.data
            tensors[f"{prefix}.weight_scale"] = qt.scale
            tensors[f"{prefix}.weight_zero_point"] = torch.zeros(qt.scale.shape, dtype=torch.int8)
            deq[name] = qt.dequantize()
        else:  # FP8: per-channel scales, except a per-tensor one on the down projections
            qt = quantize(w, "fp8")
            scale = qt.scale.max().reshape(()) if "down_proj" in name else qt.scale[:, None]
            q8 = (w / (scale if scale.dim() == 0 else scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[f"{prefix}.weight"] = q8
            tensors[f"{prefix}.weight_scale"] = scale.float()
            tensors[f"{prefix}.input_scale"] = torch.tensor(1.0)
            deq[name] = q8.float() * scale
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"] = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False},
        "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
            "ignore": ["lm_head"]},
        "int8": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                           "strategy": "group", "group_size": 32}}},
            "ignore": ["lm_head"]},
    }[method] | qc
    out = str(tmp_path / method)
    save_safetensors_checkpoint(out, tensors, config)
    for f in ("generation_config.json",):
        if os.path.exists(os.path.join(path, f)):
            os.link(os.path.join(path, f), os.path.join(out, f))
    return out, _twin(hf, deq)


@pytest.mark.parametrize("method,fmt", [("awq", "int4"), ("gptq", "int4"), ("fp8", "fp8"), ("int8", "int8")])
def test_quantized_checkpoints_load_kept_quantized_and_match_their_twin(tiny, tmp_path, method, fmt):
    path, hf = tiny
    folder, twin = _quantized_folder(path, hf, method, tmp_path)
    name = {"awq": "awq", "gptq": "gptq", "fp8": "compressed-tensors", "int8": "compressed-tensors"}[method]
    llm = load_llm(folder, quantization=name, linear_backend="reference")
    gate_up = llm.engine.model.model.layers[1].mlp.gate_up_proj.weight
    assert gate_up.quant.fmt == fmt and gate_up.quant.shape == (192, 64)  # gate and up shards joined
    assert gate_up.quant.group_size == (32 if method == "int8" else gate_up.quant.group_size)
    prompts = [random_prompt(9, 128, seed=3)]
    check_against_hf(llm, twin, prompts, n_greedy=3)
    check_triton_against_hf(llm, twin, prompts[0][:5], "gemv", n_decode=1, unified=False)
    if fmt == "int4":
        check_cpu_int4_against_hf(llm, twin, prompts[0])
    llm.close()
    # auto (the default) keeps it quantized on the CPU too; "none" asks for dense weights
    llm = load_llm(folder)
    assert llm.engine.model.model.layers[1].mlp.gate_up_proj.weight.quant.fmt == fmt
    llm.close()
    llm = load_llm(folder, quantization="none")
    assert getattr(llm.engine.model.model.layers[1].mlp.gate_up_proj.weight, "quant", None) is None
    check_against_hf(llm, twin, prompts, n_greedy=2)
    llm.close()


def test_unsupported_quantized_checkpoints_fail_at_load(tiny, tmp_path):
    path, hf = tiny
    folder, _ = _quantized_folder(path, hf, "gptq", tmp_path, desc_act=True)
    with pytest.raises(UnsupportedModelError, match="act-order"):
        load_llm(folder, quantization="gptq")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="'bitsandbytes'.*cannot read"):
        load_llm(folder)
    with pytest.raises(UnsupportedModelError, match="quantization='awq' was requested but the checkpoint is not"):
        load_llm(path, quantization="awq")
    folder, _ = _quantized_folder(path, hf, "int8", tmp_path)
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="symmetric INT8"):
        load_llm(folder)


# ---- GGUF --------------------------------------------------------------------------------------------

_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        mod, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_GGUF_NAMES[mod]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _write_gguf(hf, path: str, qtype_of) -> str:
    """A llama.cpp-style GGUF of ``hf`` with each 2-D tensor in ``qtype_of(hf_name)`` (q/k rows permuted)."""
    cfg = hf.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")  # a toy byte-level vocabulary: LLM() builds a tokenizer for every GGUF
    w.add_token_list([chr(0x100 + i) for i in range(cfg.vocab_size)])
    w.add_token_merges([])
    w.add_eos_token_id(2)
    for name, t in hf.state_dict().items():
        a = t.detach().float().numpy()
        for frag, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            if name.endswith(f"{frag}.weight"):
                a = a.reshape(heads, 2, a.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(a.shape)
        qtype = qtype_of(name) if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(a))
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_blocks_kept_quantized_match_their_twin(tiny, tmp_path):
    """Q4_0 / Q4_1 / Q8_0 tensors stay in their blocks (the embedding and LM head too); a QKV whose v is
    Q8_0 and q, k Q4_0 becomes mixed parts; F32 tensors stay dense."""
    from fdpp.models.gguf_loader import iter_gguf_tensors

    _, hf = tiny
    T = gguf.GGMLQuantizationType
    types = {"v_proj": T.Q8_0, "o_proj": T.Q4_1, "down_proj": T.Q8_0, "embed_tokens": T.Q8_0, "lm_head": T.Q4_1,
             "up_proj": T.F32}

    def qtype_of(name):
        return next((t for frag, t in types.items() if frag in name), T.Q4_0)

    path = _write_gguf(hf, str(tmp_path / "mixed.gguf"), qtype_of)
    twin = _twin(hf, dict(iter_gguf_tensors(path)))  # the file's weights, dequantized by the gguf package
    llm = load_llm(path, quantization="gguf", linear_backend="reference")
    layer = llm.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.weight.quant, QuantParts)
    assert layer.self_attn.o_proj.weight.quant.fmt == "q4_1"
    assert isinstance(layer.mlp.gate_up_proj.weight.quant, QuantParts)  # Q4_0 gate + dense up
    assert llm.engine.model.model.embed_tokens.weight.quant.fmt == "q8_0"
    prompts = [random_prompt(9, 128, seed=4)]
    check_against_hf(llm, twin, prompts, n_greedy=3)
    check_triton_against_hf(llm, twin, prompts[0][:5], "gemv", n_decode=1, unified=False)
    check_cpu_int4_against_hf(llm, twin, prompts[0])  # all but the gate (Q4_0) + dense up parts
    llm.close()


def test_gguf_types_fdpp_cannot_run_quantized_fail_with_the_tensor_and_type(tiny, tmp_path):
    _, hf = tiny
    T = gguf.GGMLQuantizationType
    path = _write_gguf(hf, str(tmp_path / "q5.gguf"), lambda n: T.Q5_0 if "down_proj" in n else T.Q8_0)
    with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.ffn_down\.weight'.* is Q5_0.*quantization='none'"):
        load_llm(path, quantization="gguf")
    llm = load_llm(path, quantization="none")  # asked for: dequantized at load
    assert getattr(llm.engine.model.model.layers[0].mlp.down_proj.weight, "quant", None) is None
    llm.close()
