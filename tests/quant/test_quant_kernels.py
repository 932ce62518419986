"""The quantized GEMV, flat GEMM and dequantize kernels (Triton; the interpreter on a CPU) against a
float64 dequantize-then-matmul reference, odd shapes included; and the op's dispatch for quantized weights."""
from __future__ import annotations

import pytest
import torch

from fdpp.kernels.quant_flat_gemm import quant_flat_gemm
from fdpp.kernels.quant_gemv import quant_dequantize, quant_gemv
from fdpp.ops.backend import use_backends
from fdpp.ops.linear import linear
from fdpp.quant.formats import QuantParts, dequantize, quantize, random_quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (format, N, K, group): odd N everywhere; K not a multiple of the kernels' K step where the format allows
CASES = [
    ("fp8", 37, 200, 0),
    ("int8", 37, 200, 0),
    ("int8", 37, 192, 64),  # per-group scales (the online default: group 128, else 64 / 32)
    ("int8", 21, 384, 128),
    ("fp8", 19, 96, 32),
    ("int4", 37, 192, 64),
    ("int4", 21, 384, 128),
    ("int4", 19, 96, 32),
    ("q8_0", 37, 96, 0),
    ("q4_0", 37, 160, 0),
    ("q4_1", 37, 96, 0),
    ("q4_k", 19, 512, 0),
    ("q5_k", 19, 512, 0),
    ("q6_k", 19, 768, 0),
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |reference|


def _weight(fmt, n, k, group, seed=0):
    if fmt in ("fp8", "int8", "int4"):
        g = torch.Generator().manual_seed(seed)
        return quantize(torch.randn(n, k, generator=g) * 0.05, fmt, group).to(DEVICE)
    return random_quant(fmt, n, k, seed=seed).to(DEVICE)


def _reference(x, qt, bias=None, residual=None):
    y = x.double() @ dequantize(qt).double().t()
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return y


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item() + 1e-6, f"max error {err:.3e}"


@pytest.mark.parametrize("fmt,n,k,group", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 3])
def test_quant_gemv_matches_float64(fmt, n, k, group, m):
    qt = _weight(fmt, n, k, group)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    bias, res = torch.randn(n, generator=g).to(DEVICE), torch.randn(m, n, generator=g).to(DEVICE)
    y = quant_gemv(x, qt.data, fmt, n, k, qt.scale, qt.zero, qt.group_size, bias, residual=res)
    _check(y, _reference(x, qt, bias, res), torch.float32)
    # split-K through the fp32 workspace, no epilogue
    y = quant_gemv(x, qt.data, fmt, n, k, qt.scale, qt.zero, qt.group_size, config={"SPLIT_K": 2, "BLOCK_N": 4})
    _check(y, _reference(x, qt), torch.float32)


@pytest.mark.parametrize("fmt,n,k,group", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_flat_gemm_matches_float64(fmt, n, k, group, dtype):
    qt = _weight(fmt, n, k, group, seed=2)
    g = torch.Generator().manual_seed(3)
    m = 5
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    res = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    y = quant_flat_gemm(x, qt.data, fmt, n, k, qt.scale, qt.zero, qt.group_size, residual=res,
                        config={"SPLIT_K": 2 if dtype == torch.float32 else 1, "BLOCK_N": 16})
    _check(y, _reference(x, qt, residual=res), dtype)


@pytest.mark.parametrize("fmt,n,k,group", CASES[::2], ids=lambda v: str(v))
def test_dequantize_kernel_is_exact(fmt, n, k, group):
    qt = _weight(fmt, n, k, group, seed=4)
    dense = quant_dequantize(qt.data, fmt, n, k, qt.scale, qt.zero, qt.group_size, dtype=torch.float32)
    torch.testing.assert_close(dense, dequantize(qt), rtol=1e-6, atol=1e-7)


def test_kernels_refuse_mismatched_arguments():
    qt = _weight("int4", 16, 128, 64)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be \[M, 128\]"):
        quant_gemv(x, qt.data, "int4", 16, 128, qt.scale, qt.zero, 64)
    with pytest.raises(ValueError, match="format 'q3_k' unknown"):
        quant_gemv(torch.randn(2, 128, device=DEVICE), qt.data, "q3_k", 16, 128)


@pytest.mark.parametrize("backend", ["gemv", "flat", "reference"])
def test_linear_op_dispatches_quantized_weights_with_epilogues(backend):
    """The op: fused [gate; up] activation, bias, residual, and a merged weight whose parts are in
    different formats (a GGUF Q4_K_M file's QKV), against dense float64 math."""
    g = torch.Generator().manual_seed(5)
    k, f = 64, 24
    gate_up = quantize(torch.randn(2 * f, k, generator=g) * 0.1, "int8").to(DEVICE)
    x = torch.randn(3, k, generator=g).to(DEVICE)
    res = torch.randn(3, f, generator=g).to(DEVICE)
    with use_backends(linear=backend):
        y = linear(x, gate_up, act="silu_and_mul", residual=res)
    h = x.double() @ dequantize(gate_up).double().t()
    ref = torch.nn.functional.silu(h[:, :f]) * h[:, f:] + res.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    parts = QuantParts([quantize(torch.randn(16, k, generator=g) * 0.1, "q4_0").to(DEVICE),
                        quantize(torch.randn(8, k, generator=g) * 0.1, "q8_0").to(DEVICE),
                        (torch.randn(8, k, generator=g) * 0.1).to(DEVICE)])
    bias = torch.randn(32, generator=g).to(DEVICE)
    with use_backends(linear=backend):
        y = linear(x, parts, bias)
    ref = x.double() @ parts.dequantize(torch.float64).t() + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fp8_w8a8_prefill_path_on_gpu():
    """Large M on a Hopper GPU: FP8 weights run W8A8 through torch._scaled_mm (per-token scales)."""
    from fdpp.ops.linear import fp8_w8a8_linear, fp8_w8a8_supported

    qt = quantize(torch.randn(256, 512) * 0.05, "fp8").to("cuda")
    x = torch.randn(300, 512, device="cuda", dtype=torch.float16)
    if not fp8_w8a8_supported(x, 256, 512):
        pytest.skip("no FP8 tensor cores")
    y = fp8_w8a8_linear(x, qt.data, qt.scale)
    ref = x.double() @ dequantize(qt).double().t()
    assert (y.double() - ref).abs().max() < 0.06 * ref.abs().max()  # activations quantized to e4m3 too
    with use_backends(linear="cublas"):
        torch.testing.assert_close(linear(x, qt), y)
