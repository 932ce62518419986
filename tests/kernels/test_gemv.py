"""ImplA (CUDA-core GEMV) against a float64 reference at odd shapes, with every epilogue.

Runs in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1); tiny shapes.
"""
import pytest
import torch

from fdpp.kernels.gemv import gemv, gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative norm error allowed per dtype (fp32 accumulation; the inputs' rounding dominates).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# (M, N, K, act, bias, residual, config): N and K are not multiples of any tile.
CASES = [
    (1, 37, 100, None, True, False, {"BLOCK_N": 16, "BLOCK_K": 32}),
    (2, 38, 70, "silu_and_mul", True, True, {"BLOCK_N": 8, "BLOCK_K": 32}),
    (5, 29, 130, None, False, True, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 3}),
    (8, 42, 66, "silu_and_mul", False, False, {"BLOCK_N": 8, "BLOCK_K": 16, "SPLIT_K": 2}),
    (17, 23, 50, None, True, True, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 32}),
    (3, 24, 50, "silu_and_mul", True, True, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 16, "SPLIT_K": 2}),
    (1, 30, 90, "silu_and_mul", True, True, {"BLOCK_N": 8, "BLOCK_K": 16, "PREFETCH": False}),
    (6, 21, 90, None, True, False, {"BLOCK_N": 8, "BLOCK_K": 16, "PREFETCH": False}),
    (70, 18, 40, "silu_and_mul", True, True, {"BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}),
    (7, 26, 40, "silu_and_mul", False, True, {"BLOCK_M": 4, "BLOCK_N": 4, "BLOCK_K": 16}),
]


def _inputs(m, n, k, act, has_bias, has_res, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if has_bias else None
    n_out = n // 2 if act else n
    r = torch.randn(m, n_out, generator=g).to(dtype) if has_res else None
    return [t.to(DEVICE) if t is not None else None for t in (x, w, b, r)]


def _rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}_N{c[1]}_K{c[2]}_{c[3]}_s{c[6].get('SPLIT_K', 1)}")
def test_gemv_matches_float64(case, dtype):
    m, n, k, act, has_bias, has_res, cfg = case
    x, w, b, r = _inputs(m, n, k, act, has_bias, has_res, dtype)
    y = gemv(x, w, b, residual=r, act=act, config=cfg)
    ref = gemv_reference(x, w, b, residual=r, act=act)
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOL[dtype]


def test_gemv_default_config_and_empty_batch():
    x, w, b, _ = _inputs(3, 40, 72, None, True, False, torch.float16)
    y = gemv(x, w, b)
    assert _rel_err(y, gemv_reference(x, w, b)) < TOL[torch.float16]
    assert gemv(x[:0], w).shape == (0, 40)


def test_gemv_rejects_bad_input():
    x, w, _, _ = _inputs(2, 10, 16, None, False, False, torch.float16)
    with pytest.raises(ValueError, match="K="):
        gemv(x, w[:, :8])
    with pytest.raises(TypeError, match="dtype"):
        gemv(x, w.float())
    with pytest.raises(ValueError, match="even N"):
        gemv(x, w[:9], act="silu_and_mul")
    with pytest.raises(ValueError, match="act="):
        gemv(x, w, act="gelu")
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=torch.zeros(2, 5, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="unit stride"):
        gemv(x, w.t().contiguous().t())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pdl_chain_matches_plain_launches(monkeypatch):
    """FDPP_PDL=1: a chain of dependent GEMVs (each reads the previous output, residual and norm
    prologue included), eager and replayed from a CUDA graph, gives the plain launches' bits."""
    from fdpp.kernels.device import pdl_enabled

    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", generator=g, dtype=torch.float16) / k ** 0.5
          for n, k in ((4096, 4096), (22016, 4096), (4096, 11008), (4096, 4096))]
    nw = torch.rand(4096, device="cuda", generator=g, dtype=torch.float16) + 0.5
    x0 = torch.randn(1, 4096, device="cuda", generator=g, dtype=torch.float16)

    def chain(x):
        h = gemv(x, ws[0], residual=x)
        u = gemv(h, ws[1], act="silu_and_mul", norm_weight=nw)
        d = gemv(u, ws[2], residual=h)
        return gemv(d, ws[3], norm_weight=nw)

    monkeypatch.setenv("FDPP_PDL", "0")
    plain = chain(x0)
    monkeypatch.setenv("FDPP_PDL", "1")
    if not pdl_enabled(x0.device):
        pytest.skip("PDL needs compute capability >= 9")
    assert torch.equal(chain(x0), plain)
    static = x0.clone()
    chain(static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, plain)
