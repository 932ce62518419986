"""4- and 8-bit weights on the CPU through PyTorch's packed int4 kernel (``fdpp.quant.cpu_int4``): the
conversion is the format's own affine map (two 4-bit planes for 8-bit formats), the kernel's product matches
the dequantized weight's up to bfloat16 rounding, and the ``cpu`` linear backend routes these formats to it
and the others to their dense weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fdpp.ops.backend import Backends, use_backends
from fdpp.ops.linear import linear
from fdpp.quant import cpu_int4
from fdpp.quant.formats import QuantParts, dequantize, quantize

pytestmark = pytest.mark.skipif(not cpu_int4.kernel_available(), reason="torch has no packed int4 CPU kernel")

# (format, group size) for every layout the kernel takes; N = 40 is not a multiple of 16 (padded rows)
CASES = [("q4_0", None), ("q4_1", None), ("q4_k", None), ("int4", 32), ("int4", 64), ("int4", 128),
         ("q8_0", None), ("int8", 0), ("int8", 64)]


def _weight(fmt: str, group: int | None, n: int = 40, k: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01  # a non-zero mean: zero points matter
    return quantize(w, fmt, group)


@pytest.mark.parametrize("fmt,group", CASES)
def test_affine_planes_are_the_formats_own_map(fmt, group):
    qt = _weight(fmt, group)
    planes = cpu_int4.affine_planes(qt)
    assert len(planes) == (2 if fmt in ("q8_0", "int8") else 1)
    n, k = qt.shape
    w = torch.zeros(n, k)
    for q, scale, zero, g in planes:
        assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
        w += ((q.float() - 8.0).reshape(n, k // g, g) * scale[..., None] + zero[..., None]).reshape(n, k)
    ref = dequantize(qt)
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_packed_matmul_matches_the_dequantized_weight(fmt, group, m):
    qt = _weight(fmt, group, seed=m)
    x = torch.randn(m, qt.shape[1], generator=torch.Generator().manual_seed(1))
    y = cpu_int4.matmul(x, qt.cpu_int4())
    ref = x @ dequantize(qt).T
    assert y.shape == (m, 40) and y.dtype == torch.float32
    # bfloat16 inputs, scales and output: ~2^-8 relative per element
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert qt.cpu_int4() is qt.cpu_int4()  # packed once


def test_other_formats_are_not_packable():
    assert not cpu_int4.packable(_weight("q6_k", None))
    assert not cpu_int4.packable(_weight("q5_k", None))
    assert not cpu_int4.packable(_weight("fp8", None))
    assert not cpu_int4.packable(_weight("int8", 0, k=48))  # per channel, K not a multiple of 32
    head = _weight("q4_0", None)
    head.precise_output = True  # the LM head: float32 logits, not the kernel's bfloat16 output
    assert not cpu_int4.packable(head)
    mixed = QuantParts([_weight("q4_k", None), _weight("q6_k", None)])
    assert not cpu_int4.packable(mixed)
    assert cpu_int4.packable(QuantParts([_weight("q4_k", None), _weight("q8_0", None)]))


def test_cpu_backend_routes_4bit_weights_to_the_packed_kernel(monkeypatch):
    """Default CPU backend: a 4-bit weight through the packed kernel at every M, memoized or not; other
    formats through their dense weight; ``reference`` never packs."""
    assert Backends.default("cpu").linear == "cpu"
    qt = _weight("q4_1", None)
    calls = []
    real = cpu_int4.matmul
    monkeypatch.setattr(cpu_int4, "matmul", lambda x2, p: calls.append(x2.shape[0]) or real(x2, p))
    x1, x32 = torch.randn(1, 256), torch.randn(32, 256)
    qt.memoize = True
    linear(x1, qt)
    linear(x32, qt)
    linear(x32, _weight("q6_k", None))
    assert calls == [1, 32]
    with use_backends(linear="reference"):
        y = linear(x1, qt)
    assert calls == [1, 32] and torch.equal(y, x1 @ qt.dequantize().T)


@pytest.mark.parametrize("act", [None, "silu_and_mul"])
def test_cpu_backend_epilogue_matches_the_reference(act):
    """bias, the gated activation and the residual are applied as the reference path applies them."""
    qt = _weight("q4_k", None, n=64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 256, generator=g)
    bias = torch.randn(64, generator=g)
    residual = torch.randn(2, 3, 32 if act else 64, generator=g)
    y = linear(x, qt, bias, residual=residual, act=act)
    with use_backends(linear="reference"):
        ref = linear(x, qt, bias, residual=residual, act=act)
    assert y.shape == ref.shape and float((y - ref).norm() / ref.norm()) < 1e-2


def test_memoization_plan_leaves_4bit_weights_to_the_packed_kernel():
    """Under the packed kernel, 4-bit weights get no dense copy (nor a share of the budget); without it
    (the ``reference`` backend) they are planned as any other format."""
    from fdpp.quant.cpu_cache import pack_cpu_int4, plan_cpu_memoization

    g = torch.Generator().manual_seed(4)
    model = nn.Module()
    model.a, model.b = (nn.Linear(256, 32, bias=False) for _ in range(2))
    model.a.weight.quant = quantize(torch.randn(32, 256, generator=g), "q4_0")
    model.b.weight.quant = quantize(torch.randn(32, 256, generator=g), "q6_k")
    stats = plan_cpu_memoization(model, ram_bytes=1e12, packed_kernel=True)
    assert stats["num_weights"] == 1 and stats["num_memoized"] == 1
    assert model.b.weight.quant.memoize and not model.a.weight.quant.memoize
    assert plan_cpu_memoization(model, ram_bytes=1e12)["num_memoized"] == 2
    assert pack_cpu_int4(model) == 1 and model.a.weight.quant._cpu_int4
    model.c = nn.Linear(256, 64, bias=False)  # a merged weight with a part the kernel does not take
    mixed = QuantParts([quantize(torch.randn(32, 256, generator=g), "q4_0"),
                        quantize(torch.randn(32, 256, generator=g), "q6_k")])
    model.c.weight.quant = mixed
    assert pack_cpu_int4(model) == 1 and not mixed.parts[0]._cpu_int4  # not packed in vain
