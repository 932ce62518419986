"""The GEMV (M = 1) and the flat GEMM (small M) at the real linear shapes of Llama-2-7B and Llama-3-8B,
LM heads included, against a float64 reference, with each layer's epilogue ([gate; up] -> silu * up,
residual add on o / down). GPU only: the shapes are far too big for Triton's interpreter.

Each layer runs with the kernel's default config and with the config the shipped dataflow table picks
for this GPU (when it has one), as the engine would call it.
"""
import pytest
import torch

from fdpp.dataflow.shapes import preset_shapes
from fdpp.kernels.flat_gemm import flat_gemm
from fdpp.kernels.gemv import gemv, gemv_reference

pytestmark = pytest.mark.gpu

# Relative norm error per dtype: fp32 accumulation over K up to 14336; the output's rounding dominates.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# The epilogue each layer of a Llama uses in fdpp's models.
EPILOGUE = {"qkv": (None, False), "o": (None, True), "gate_up": ("silu_and_mul", False),
            "down": (None, True), "lm_head": (None, False)}
CASES = [(model, layer, dtype) for model, dtype in (("llama-2-7b", torch.float16), ("llama-3-8b", torch.bfloat16))
         for layer in preset_shapes(model)]


def _inputs(m, n, k, act, has_res, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).to(dtype)  # outputs of order 1
    n_out = n // 2 if act else n
    r = torch.randn(m, n_out, generator=g, device="cuda").to(dtype) if has_res else None
    return x, w, r


def _table_config(impl, dtype, n, k, m):
    from fdpp.dataflow.table import choose_impl

    chosen, config = choose_impl(torch.device("cuda"), dtype, n, k, m)
    return config if chosen == impl else None


@pytest.mark.parametrize("kernel,m", [(gemv, 1), (flat_gemm, 16)], ids=["gemv-M1", "flat-M16"])
@pytest.mark.parametrize("model,layer,dtype", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_linear_kernels_at_preset_shapes(model, layer, dtype, kernel, m):
    n, k = preset_shapes(model)[layer]
    act, has_res = EPILOGUE[layer]
    x, w, r = _inputs(m, n, k, act, has_res, dtype)
    ref = gemv_reference(x, w, None, residual=r, act=act)
    impl = "gemv" if kernel is gemv else "flat"
    configs = {"default": None, "table": _table_config(impl, dtype, n, k, m)}
    for name, config in configs.items():
        if name == "table" and config is None:
            continue  # no table entry for this GPU/shape chooses this kernel
        y = kernel(x, w, None, residual=r, act=act, config=config)
        assert y.shape == ref.shape and y.dtype == dtype
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < TOL[dtype], f"{model} {layer} {impl} ({name} config {config}): rel err {err:.2e}"
    torch.cuda.synchronize()
