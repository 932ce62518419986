import pytest
import torch

from fdpp.kernels.norm import rms_norm_fused
from fdpp.ops import norm as norm_ops


def _ref(x, w, eps, res=None):
    x = x.double() + (res.double() if res is not None else 0)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return y, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel(dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    M, N = 5, 100
    x = torch.randn(M, N, generator=g).to(dtype)
    w = torch.randn(N, generator=g).to(dtype)
    res = torch.randn(M, N, generator=g).to(dtype) if with_residual else None
    out = rms_norm_fused(x, w, 1e-6, res)
    y, r = out if with_residual else (out, None)
    y_ref, r_ref = _ref(x, w, 1e-6, res)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (y.double() - y_ref).norm() / y_ref.norm() < tol
    if with_residual:
        assert (r.double() - r_ref).norm() / r_ref.norm() < tol
    # the reference op agrees with the kernel
    ref_out = norm_ops.rms_norm(x, w, 1e-6, res)
    y2 = ref_out[0] if with_residual else ref_out
    assert (y2.double() - y.double()).norm() / y_ref.norm() < tol
