"""Quantized weight formats: GGUF dequantization against the gguf package, quantize/dequantize error
bounds, AWQ / GPTQ / FP8 checkpoint layouts (round trips and an independent reading of each layout)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fdpp.errors import UnsupportedModelError
from fdpp.quant.formats import (
    FP8_MAX,
    GGUF_BLOCKS,
    QuantParts,
    QuantTensor,
    dequantize,
    online_group_size,
    quantize,
    random_quant,
)
from fdpp.quant.packing import (
    AWQ_ORDER,
    awq_to_quant,
    fp8_to_quant,
    gptq_to_quant,
    quant_to_awq,
    quant_to_gptq,
)

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("fmt", list(GGUF_BLOCKS))
def test_gguf_dequant_matches_gguf_package_bit_for_bit(fmt):
    """Random blocks (random quant bits and scale bytes, finite float16 scales) decode exactly as ggml's
    reference dequantizer in the gguf package does."""
    qk, bb = GGUF_BLOCKS[fmt]
    n, k = 3, 2 * 256
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n, k // qk, bb), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (n, k // qk)).astype(np.float16).view(np.uint8).reshape(n, -1, 2)
    if fmt == "q6_k":
        raw[..., 208:210] = scales
    else:
        raw[..., 0:2] = scales
        if fmt in ("q4_1", "q4_k", "q5_k"):
            raw[..., 2:4] = scales[:, ::-1]
    raw = raw.reshape(n, -1)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, fmt.upper())).reshape(n, k)
    ours = dequantize(QuantTensor(fmt, (n, k), torch.from_numpy(raw))).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("fmt,group", [("fp8", 0), ("fp8", 32), ("int8", 0), ("int8", 64), ("int8", 128),
                                       ("int4", 32), ("int4", 64), ("int4", 128), ("q8_0", 0), ("q4_0", 0),
                                       ("q4_1", 0)])
def test_quantize_error_is_within_the_format_step(fmt, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 256, generator=g) * 0.05
    w[3] *= 20  # rows of very different scale: per-channel / per-group scales must follow
    qt = quantize(w, fmt, group)
    assert qt.group_size == (group if fmt in ("fp8", "int8", "int4") else 0)
    err = (qt.dequantize() - w).abs()
    if fmt == "fp8":  # 3 mantissa bits: relative step 2^-3, rounding error half of it
        assert (err <= w.abs() * 2**-4 + 1e-6).all()
    else:
        span = {"int8": 127, "q8_0": 127, "int4": 7.5, "q4_0": 7.5, "q4_1": 7.5}[fmt]
        block = {"int8": group or 256, "q8_0": 32, "int4": group, "q4_0": 32, "q4_1": 32}[fmt]
        amax = w.abs().reshape(7, -1, block).amax(-1, keepdim=True)
        step = (amax / span).expand(-1, -1, block).reshape(7, 256)
        assert (err <= step * 1.01 + 1e-6).all(), f"max error / step {(err / step).max():.3f}"


def test_online_group_size_falls_back_where_k_is_not_a_multiple():
    """int8: group 128, else the largest of 64 / 32 dividing K, else per channel (0); fp8: per channel
    (whatever group is asked for); int4: as int8 but never per channel."""
    assert [online_group_size("int8", k) for k in (4096, 1536, 576, 96, 200)] == [128, 128, 64, 32, 0]
    assert online_group_size("int8", 4096, 0) == 0 and online_group_size("int8", 4096, 64) == 64
    assert online_group_size("fp8", 4096) == 0 and online_group_size("fp8", 512, 128) == 0
    assert online_group_size("int4", 576) == 64 and online_group_size("q4_k", 4096) == 0
    with pytest.raises(ValueError, match="K=200 is not a multiple of 32"):
        online_group_size("int4", 200)
    assert quantize(torch.randn(3, 576), "int8").group_size == 64  # quantize's default is the online choice
    assert quantize(torch.randn(3, 200), "int8").scale.shape == (3,)


def test_grouped_scales_round_trip_and_refuse_wrong_shapes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g) * torch.logspace(-2, 1, 256)  # scales that vary along K
    per_group, per_channel = quantize(w, "int8", 64), quantize(w, "int8", 0)
    assert per_group.scale.shape == (6, 4) and per_group.scale.dtype == torch.float32
    assert per_group.nbytes == 6 * 256 + 6 * 4 * 4
    # per-group scales follow the magnitude along K: a smaller error than one scale per row
    assert (per_group.dequantize() - w).square().sum() < 0.5 * (per_channel.dequantize() - w).square().sum()
    # the stored values come back exactly: re-quantizing the dequantized weight is the identity
    again = quantize(per_group.dequantize(), "int8", 64)
    assert torch.equal(again.data, per_group.data)
    torch.testing.assert_close(again.scale, per_group.scale, rtol=1e-6, atol=0)
    both = QuantTensor.cat([per_group, quantize(w[:2] * 3, "int8", 64)])
    torch.testing.assert_close(both.dequantize()[6:], quantize(w[:2] * 3, "int8", 64).dequantize())
    torch.testing.assert_close(both.rows(torch.tensor([1])).dequantize(), per_group.dequantize()[1:2])
    with pytest.raises(ValueError, match="cannot concatenate"):
        QuantTensor.cat([per_group, per_channel])
    with pytest.raises(ValueError, match=r"needs a scale of shape \[6, 4\]"):
        QuantTensor("int8", (6, 256), per_group.data, per_channel.scale, group_size=64)
    with pytest.raises(ValueError, match="K divisible by its group size"):
        quantize(w[:, :192], "int8", 128)


def test_fp8_scale_search_never_loses_to_absmax():
    """The searched fp8 scale has at most the squared error of absmax / 448 on every row (absmax is one of
    its candidates) and clearly less in total; it stays finite and within e4m3's range."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 384, generator=g) * 0.02
    absmax_scale = w.abs().amax(1) / FP8_MAX
    naive = (w / absmax_scale[:, None]).to(torch.float8_e4m3fn).float() * absmax_scale[:, None]
    qt = quantize(w, "fp8", 0)
    row_err = (qt.dequantize() - w).square().sum(1)
    assert (row_err <= (naive - w).square().sum(1) * (1 + 1e-6)).all()
    assert row_err.sum() < 0.95 * (naive - w).square().sum()
    assert (qt.scale >= absmax_scale * (1 - 1e-6)).all() and (qt.scale < 2 * absmax_scale).all()
    assert torch.isfinite(qt.data.float()).all()


def _int4(n=48, k=128, group=32, seed=0) -> QuantTensor:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g), "int4", group)


def test_awq_layout_round_trip_and_independent_reading():
    qt = _int4()
    qweight, qzeros, scales = quant_to_awq(qt)
    n, k = qt.shape
    assert qweight.dtype == torch.int32 and qweight.shape == (k, n // 8) and scales.shape == (k // 32, n)
    back = awq_to_quant(qweight, qzeros, scales)
    assert torch.equal(back.data, qt.data) and torch.equal(back.zero, qt.zero) and torch.equal(back.scale, qt.scale)
    # AutoAWQ's reading: column c of a packed int32 sits in nibble AWQ_ORDER.index(c % 8)
    kk, nn = torch.meshgrid(torch.arange(k), torch.arange(n), indexing="ij")
    pos = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])[nn % 8]
    q = (qweight[kk, nn // 8] >> (4 * pos)) & 0xF
    z = (qzeros[kk // 32, nn // 8] >> (4 * pos)) & 0xF
    ref = ((q - z).float() * scales[kk // 32, nn].float()).t()
    torch.testing.assert_close(dequantize(back), ref, rtol=0, atol=0)


def test_gptq_layout_round_trip_and_independent_reading():
    qt = _int4(group=64)
    qweight, qzeros, scales, g_idx = quant_to_gptq(qt)
    n, k = qt.shape
    assert qweight.shape == (k // 8, n) and qzeros.shape == (k // 64, n // 8) and g_idx.shape == (k,)
    back = gptq_to_quant(qweight, qzeros, scales, g_idx)
    torch.testing.assert_close(dequantize(back), dequantize(qt), rtol=0, atol=0)
    # GPTQ v1's reading: k = 8r + i in nibble i of row r; zeros stored minus one, columns in order
    kk, nn = torch.meshgrid(torch.arange(k), torch.arange(n), indexing="ij")
    q = (qweight[kk // 8, nn] >> (4 * (kk % 8))) & 0xF
    z = ((qzeros[g_idx[kk].long(), nn // 8] >> (4 * (nn % 8))) & 0xF) + 1
    ref = ((q - z).float() * scales[g_idx[kk].long(), nn].float()).t()
    torch.testing.assert_close(dequantize(back), ref, rtol=0, atol=0)


def test_gptq_act_order_is_refused_with_a_clear_error():
    qweight, qzeros, scales, g_idx = quant_to_gptq(_int4(group=32))
    shuffled = g_idx[torch.randperm(g_idx.numel(), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(UnsupportedModelError, match="act-order"):
        gptq_to_quant(qweight, qzeros, scales, shuffled, name="model.layers.0.mlp.up_proj")


def test_fp8_checkpoint_scales_per_tensor_and_per_channel():
    w = torch.randn(16, 32)
    q8 = (w * 10).clamp(-448, 448).to(torch.float8_e4m3fn)
    per_tensor = fp8_to_quant(q8, torch.tensor(0.1))
    torch.testing.assert_close(per_tensor.dequantize(), q8.float() * 0.1)
    s = torch.rand(16, 1) + 0.5
    torch.testing.assert_close(fp8_to_quant(q8, s).dequantize(), q8.float() * s)
    with pytest.raises(UnsupportedModelError, match="block-wise"):
        fp8_to_quant(q8, torch.ones(2, 2))


def test_concatenated_shards_keep_their_own_scales():
    parts = [quantize(torch.randn(8, 64) * s, "int8") for s in (0.01, 1.0, 100.0)]
    merged = QuantTensor.cat(parts)
    torch.testing.assert_close(merged.dequantize(), torch.cat([p.dequantize() for p in parts]))
    idx = torch.tensor([20, 3, 9])
    torch.testing.assert_close(merged.rows(idx).dequantize(), merged.dequantize()[idx])
    mixed = QuantParts([parts[0], quantize(torch.randn(4, 64), "q4_0"), torch.randn(2, 64)])
    assert mixed.shape == (14, 64) and mixed.dequantize().shape == (14, 64)
    with pytest.raises(ValueError, match="cannot concatenate"):
        QuantTensor.cat([parts[0], quantize(torch.randn(8, 64), "fp8")])


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="K divisible by its group size"):
        quantize(torch.randn(4, 48), "int4", 64)
    with pytest.raises(ValueError, match="needs data of shape"):
        QuantTensor("q4_0", (4, 64), torch.zeros(4, 35, dtype=torch.uint8))


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", *GGUF_BLOCKS])
def test_random_quant_is_finite_and_small(fmt):
    w = random_quant(fmt, 4, 512, group_size=128).dequantize()
    assert torch.isfinite(w).all() and w.abs().max() < 1


@pytest.mark.parametrize("fmt,rel_err", [("q4_k", 0.09), ("q5_k", 0.045), ("q6_k", 0.025)])
def test_k_quant_quantizer_writes_blocks_ggml_reads(fmt, rel_err):
    """fdpp writes Q4_K / Q5_K / Q6_K blocks itself (the gguf package cannot): the gguf package must read them
    back to exactly what fdpp's dequantizer gives, and that must be close to the float weight. An all-positive
    super-block and an all-zero row are included (the min clamps to 0; zero scales stay finite)."""
    gguf = pytest.importorskip("gguf")
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 512, generator=g) * 0.05
    w[1, :256] = w[1, :256].abs() + 0.1
    w[3] = 0.0
    qt = quantize(w, fmt)
    ours = dequantize(qt)
    theirs = gguf.quants.dequantize(qt.data.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
    torch.testing.assert_close(ours, torch.from_numpy(np.ascontiguousarray(theirs)).reshape(5, 512), rtol=0, atol=0)
    assert torch.isfinite(ours).all() and (ours[3] == 0).all()
    assert ((ours - w).norm() / w.norm()).item() < rel_err
    with pytest.raises(ValueError, match="divisible by 256"):
        quantize(torch.randn(4, 320), fmt)


def test_k_quant_online_format_falls_back_for_short_rows():
    from fdpp.quant.formats import online_format

    assert online_format("q4_k", 4096) == "q4_k" and online_format("q4_k", 576) == "q4_1"
    assert online_format("q6_k", 576) == "q8_0" and online_format("int4", 576) == "int4"


def test_cpu_memoization_stays_under_the_dense_size():
    """The reference path memoizes dequantized weights only while packed + memoized bytes stay under the
    budget (a fraction of the dense weights' bytes); memoized or not, the matmul's weight is the same."""
    from torch import nn

    from fdpp.quant.cpu_cache import plan_cpu_memoization

    g = torch.Generator().manual_seed(8)
    model = nn.Module()
    model.a, model.b, model.c = (nn.Linear(256, 32, bias=False) for _ in range(3))
    for lin in (model.a, model.b, model.c):
        lin.weight.quant = quantize(torch.randn(32, 256, generator=g), "q6_k")
    model.d = nn.Linear(256, 32, bias=False)
    model.d.weight.quant = model.a.weight.quant  # tied: counted once
    stats = plan_cpu_memoization(model, fraction=0.6)
    assert stats["num_weights"] == 3 and stats["dense_bytes"] == 3 * 32 * 256 * 4
    assert stats["packed_bytes"] + stats["memoized_bytes"] <= 0.6 * stats["dense_bytes"]
    assert stats["num_memoized"] == 1 and model.a.weight.quant.memoize and not model.c.weight.quant.memoize
    q = model.a.weight.quant
    first = q.dense_for_matmul(torch.float32)
    assert q.dense_for_matmul(torch.float32) is first and torch.equal(first, q.dequantize())
    assert model.c.weight.quant.dense_for_matmul(torch.float32) is not model.c.weight.quant.dense_for_matmul(
        torch.float32)
    assert plan_cpu_memoization(model, fraction=0.0)["num_memoized"] == 0


def test_cpu_memoization_default_memoizes_a_small_model_whole(monkeypatch):
    """No fraction given: everything is memoized when packed + dense fit in RAM_SHARE of the available
    memory; with too little memory, as much as the 0.9x-dense and the RAM caps allow; memory unknown: the
    0.9x-dense rule."""
    from torch import nn

    from fdpp.quant import cpu_cache

    monkeypatch.delenv(cpu_cache.ENV_FRACTION, raising=False)
    g = torch.Generator().manual_seed(9)
    model = nn.Module()
    model.a, model.b, model.c = (nn.Linear(256, 32, bias=False) for _ in range(3))
    for lin in (model.a, model.b, model.c):
        lin.weight.quant = quantize(torch.randn(32, 256, generator=g), "q6_k")
    dense = 3 * 32 * 256 * 4
    whole = cpu_cache.plan_cpu_memoization(model, ram_bytes=100 * dense)
    assert whole["num_memoized"] == 3 and whole["memoized_bytes"] == dense
    packed = whole["packed_bytes"]
    tight = cpu_cache.plan_cpu_memoization(model, ram_bytes=(packed + dense // 2) / cpu_cache.RAM_SHARE)
    assert tight["num_memoized"] == 1 and packed + tight["memoized_bytes"] <= cpu_cache.RAM_SHARE * (
        packed + dense // 2) / cpu_cache.RAM_SHARE
    unknown = cpu_cache.plan_cpu_memoization(model, ram_bytes=None)
    assert packed + unknown["memoized_bytes"] <= 0.9 * dense and unknown["num_memoized"] == 2
    assert cpu_cache.available_ram_bytes() is None or cpu_cache.available_ram_bytes() > 0


def test_warm_cpu_memoization_dequantizes_the_marked_weights_once():
    """At load (after the plan): every marked weight is dequantized in its parameter's dtype, once for tied
    ones; the matmul then reads that copy; unmarked weights stay packed only."""
    from torch import nn

    from fdpp.quant.cpu_cache import plan_cpu_memoization, warm_cpu_memoization

    g = torch.Generator().manual_seed(10)
    model = nn.Module()
    model.a, model.b = (nn.Linear(256, 32, bias=False) for _ in range(2))
    for lin in (model.a, model.b):
        lin.weight.quant = quantize(torch.randn(32, 256, generator=g), "q6_k")
    model.t = nn.Linear(256, 32, bias=False)
    model.t.weight.quant = model.a.weight.quant  # tied
    plan_cpu_memoization(model, fraction=0.8)  # room for one of the two
    assert warm_cpu_memoization(model) == 1
    q = model.a.weight.quant
    memo = q._dense[torch.float32]
    assert q.dense_for_matmul(torch.float32) is memo and torch.equal(memo, q.dequantize())
    assert not model.b.weight.quant._dense
