"""GPU checks at real shapes (Llama-2-7B linears): each packed format's GEMV, flat GEMM and large-M path
against a float64 dequantize-then-matmul reference, and a quantized 7B-shaped model decoding through the
table dispatch with CUDA graphs. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from fdpp.quant.formats import FORMATS, dequantize, random_quant

pytestmark = pytest.mark.gpu
SHAPES = [(12288, 4096), (4096, 11008)]  # qkv, down


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_quantized_kernels_at_llama_shapes_match_float64(fmt, n, k):
    from fdpp.kernels.quant_flat_gemm import quant_flat_gemm
    from fdpp.kernels.quant_gemv import quant_gemv
    from fdpp.ops.linear import quant_large_m

    w = random_quant(fmt, n, k, device="cuda", seed=1)
    wd = dequantize(w).double()
    g = torch.Generator(device="cuda").manual_seed(2)
    for m, run in ((1, quant_gemv), (3, quant_gemv), (16, quant_flat_gemm), (48, quant_flat_gemm),
                   (300, None)):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        if run is None:
            y = quant_large_m(x, w)
        else:
            y = run(x, w.data, fmt, n, k, w.scale, w.zero, w.group_size)
        ref = x.double() @ wd.t()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        # fp16 output rounding; FP8 W8A8 (large M, fp8) also rounds the activations to e4m3
        tol = 0.05 if (run is None and fmt == "fp8") else 2e-3
        assert err < tol, f"{fmt} [{n}, {k}] M={m}: relative error {err:.2e}"


@pytest.mark.parametrize("quant", ["int4", "q4_k", "fp8"])
def test_quantized_7b_shapes_decode_with_cuda_graphs(quant):
    """A Llama-2-7B-shaped model (2 layers: real widths) quantized online decodes the same tokens with
    and without CUDA graphs, through the table dispatch."""
    from fdpp import LLM, SamplingParams
    from fdpp.models.presets import get_preset

    cfg = dict(get_preset("llama-2-7b"), num_hidden_layers=2)
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/config.json", "w") as f:
            json.dump(cfg, f)
        outs = []
        for eager in (True, False):
            llm = LLM(d, dtype="float16", device="cuda", quantization=quant, random_weights=True, max_num_seqs=2,
                      max_model_len=256, enforce_eager=eager, show_progress=False, calibration="off")
            qkv = llm.engine.model.model.layers[0].self_attn.qkv_proj.weight
            assert qkv.quant.fmt == quant and qkv.numel() == 0
            prompt = list(range(5, 69))
            out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
            outs.append(out[0].outputs[0].token_ids)
            logits = llm.engine.prompt_logits(prompt)
            assert torch.isfinite(logits).all(), f"{quant}: non-finite logits (eager={eager})"
            llm.close()
        assert outs[0] == outs[1], f"{quant}: eager {outs[0]} != CUDA graphs {outs[1]}"
