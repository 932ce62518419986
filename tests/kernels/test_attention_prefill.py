"""Varlen causal prefill over the paged cache (unified max + fallback, synchronized) vs float64.

Queries are the last q_len tokens of each sequence's context (chunked prefill / cached prefix).
Runs in Triton's interpreter on the CPU: tiny shapes.
"""
import pytest
import torch

from fdpp.ops.attention import safe_window
from tests.kernels.paged_utils import TOL, prefill_case, reference, rel_err, run_paged_prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    return prefill_case(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, DEVICE,
                        seed)


_run = run_paged_prefill


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim", [
    (torch.float16, 2, 2, 32),    # MHA
    (torch.bfloat16, 4, 1, 32),   # GQA 4
    (torch.float16, 8, 1, 16),    # GQA 8
    (torch.float32, 2, 1, 24),    # non-power-of-2 head_dim
])
@pytest.mark.parametrize("mode", ["unified", "sync"])
def test_prefill_matches_reference(dtype, num_heads, num_kv_heads, head_dim, mode):
    # (q_len, context_len): full prompt, 1 token, chunk after a cached prefix, chunk of 1
    q_lens = [21, 1, 9, 1]
    context_lens = [21, 1, 30, 17]
    q, kc, vc, meta = _case(q_lens, context_lens, num_heads, num_kv_heads, head_dim, 8, dtype)
    scale = head_dim ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    flags = []
    phi = 0.5 if mode == "unified" else None
    out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), stats=stats, flags_out=flags)
    assert rel_err(out, ref) < TOL[dtype]
    if mode == "unified":
        assert int(stats[0]) == sum(q_lens) * num_heads


@pytest.mark.parametrize("phi", [-30.0, 40.0])
def test_prefill_out_of_window_falls_back(phi):
    dtype = torch.float16
    q_lens, context_lens = [18, 5], [18, 12]
    q, kc, vc, meta = _case(q_lens, context_lens, 2, 1, 16, 4, dtype, seed=1)
    scale = 16 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), stats=stats)
    assert int(stats[0]) == int(stats[1]) == sum(q_lens) * 2
    assert rel_err(out, ref) < TOL[dtype]
    bad = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), fallback=False)
    assert not torch.isfinite(bad).all() or rel_err(bad, ref) > 1e-2


def test_prefill_sliding_window_gqa():
    dtype = torch.bfloat16
    q_lens, context_lens = [19, 6], [19, 23]
    q, kc, vc, meta = _case(q_lens, context_lens, 4, 2, 16, 4, dtype, seed=2)
    scale = 16 ** -0.5
    ref = reference(q, kc, vc, meta, scale, sliding_window=7)
    for phi in (None, 0.0):
        out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), sliding_window=7)
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_gpu_real_sizes(num_heads, num_kv_heads, dtype):
    q_lens, context_lens = [1000, 1, 513, 2048], [1000, 700, 1600, 2048]
    q, kc, vc, meta = _case(q_lens, context_lens, num_heads, num_kv_heads, 128, 16, dtype, seed=3)
    scale = 128 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    for phi in (None, 2.0, -40.0):
        out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype))
        assert rel_err(out, ref) < TOL[dtype]
