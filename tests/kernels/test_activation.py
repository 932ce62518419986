"""The gated activation of the tensor-core GEMM path (``fdpp.kernels.activation.silu_and_mul``) and the
ImplC epilogues of ``linear`` (``tensor_core_linear``: residual inside ``addmm``, activation in one Triton pass)
against float64 references. Triton's interpreter on the CPU; the real sizes on a GPU."""
import pytest
import torch

from fdpp.kernels.activation import silu_and_mul
from fdpp.kernels.gemv import gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _ref(y: torch.Tensor) -> torch.Tensor:
    g, u = y.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, f", [(1, 7), (3, 1100), (5, 2048)])
def test_silu_and_mul_matches_float64(m, f, dtype):
    torch.manual_seed(m * 31 + f)
    y = (torch.randn(m, 2 * f, device=DEVICE) * 4).to(dtype)  # gates well into both tails of silu
    out = silu_and_mul(y)
    assert out.shape == (m, f) and out.dtype == dtype
    ref = _ref(y)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


def test_silu_and_mul_reads_strided_rows_and_refuses_bad_shapes():
    y = torch.randn(4, 64, device=DEVICE)[:, :40]  # row stride 64, last axis contiguous
    torch.testing.assert_close(silu_and_mul(y).double(), _ref(y), rtol=1e-6, atol=1e-6)
    assert silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
    with pytest.raises(ValueError, match="must be \\[M, 2F\\]"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous last axis"):
        silu_and_mul(torch.randn(8, 4, device=DEVICE).t())


@pytest.mark.parametrize("act, has_bias, has_res", [("silu_and_mul", False, False), ("silu_and_mul", True, True),
                                                    (None, False, True), (None, True, True), (None, False, False)])
def test_tensor_core_linear_epilogues_match_the_reference(monkeypatch, act, has_bias, has_res):
    """``linear`` at an M the table gives to cuBLAS: the same result as the float64 reference whichever
    epilogue is fused (addmm for a residual without bias, the Triton pass for the activation)."""
    import fdpp.ops.linear as lin
    from fdpp.ops.backend import use_backends

    monkeypatch.setattr(lin, "choose_impl", lambda *a, **k: ("cublas", None))
    torch.manual_seed(1)
    m, n, k = 70, 48, 40
    x, w = torch.randn(m, k, device=DEVICE), torch.randn(n, k, device=DEVICE) / k ** 0.5
    b = torch.randn(n, device=DEVICE) if has_bias else None
    n_out = n // 2 if act else n
    r = torch.randn(m, n_out, device=DEVICE) if has_res else None
    with use_backends(linear="table"):
        y = lin.linear(x, w, b, residual=r, act=act)
    ref = gemv_reference(x, w, b, residual=r, act=act)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_and_mul_at_prefill_size_on_cuda(dtype):
    """Llama-2-7B's gate_up output of a 1k-token prefill: within one rounding of float64, and no worse
    than PyTorch's two-kernel silu(gate) * up."""
    torch.manual_seed(0)
    y = (torch.randn(1024, 2 * 11008, device="cuda") * 3).to(dtype)
    ref = _ref(y)
    err = ((silu_and_mul(y).double() - ref).norm() / ref.norm()).item()
    g, u = y.chunk(2, dim=-1)
    err_torch = (((torch.nn.functional.silu(g) * u).double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype] and err <= err_torch * 1.01, (err, err_torch)
