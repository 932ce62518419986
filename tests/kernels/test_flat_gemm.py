"""ImplB (flat GEMM on tensor cores, pipelined K loop) against a float64 reference at odd shapes.

Runs in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1); tiny shapes.
"""
import pytest
import torch

from fdpp.kernels.flat_gemm import flat_gemm
from fdpp.kernels.gemv import gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
if DEVICE == "cuda":
    TOL[torch.float32] = 1e-5  # fp32 runs the dot in IEEE mode, not tf32

# (M, N, K, act, bias, residual, config): N, K not multiples of the tile; M from 1 to 70.
CASES = [
    (1, 37, 100, None, True, True, {"BLOCK_N": 16, "BLOCK_K": 32, "num_stages": 2}),
    (3, 38, 70, "silu_and_mul", True, True, {"BLOCK_N": 16, "BLOCK_K": 32}),
    (16, 45, 130, None, False, False, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3}),
    (20, 34, 66, "silu_and_mul", False, True, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}),
    (70, 21, 48, None, True, True, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}),
]


def _inputs(m, n, k, act, has_bias, has_res, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if has_bias else None
    n_out = n // 2 if act else n
    r = torch.randn(m, n_out, generator=g).to(dtype) if has_res else None
    return [t.to(DEVICE) if t is not None else None for t in (x, w, b, r)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}_N{c[1]}_K{c[2]}_{c[3]}_s{c[6].get('SPLIT_K', 1)}")
def test_flat_gemm_matches_float64(case, dtype):
    m, n, k, act, has_bias, has_res, cfg = case
    x, w, b, r = _inputs(m, n, k, act, has_bias, has_res, dtype)
    y = flat_gemm(x, w, b, residual=r, act=act, config=cfg)
    ref = gemv_reference(x, w, b, residual=r, act=act)
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


def test_flat_gemm_default_config():
    x, w, _, r = _inputs(5, 24, 40, None, False, True, torch.float16)
    y = flat_gemm(x, w, residual=r)
    ref = gemv_reference(x, w, residual=r)
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


def test_flat_gemm_rejects_bad_input():
    x, w, _, _ = _inputs(2, 10, 16, None, False, False, torch.float16)
    with pytest.raises(ValueError, match=">= 16"):
        flat_gemm(x, w, config={"BLOCK_N": 8})
    with pytest.raises(ValueError, match="bias"):
        flat_gemm(x, w, torch.zeros(3, dtype=torch.float16, device=DEVICE))
