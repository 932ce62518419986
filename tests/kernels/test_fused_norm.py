"""RMSNorm fused into the GEMV / flat-GEMM prologue against a float64 reference (norm, then matmul,
then the epilogue), and a decoder whose norms and residual adds run inside its projections against
the same decoder with separate norms. Triton's interpreter on the CPU; tiny shapes."""
import pytest
import torch

from fdpp.kernels.flat_gemm import flat_gemm
from fdpp.kernels.gemv import gemv, gemv_reference
from fdpp.ops.backend import use_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}

# (kernel, M, N, K, act, residual, config): split-K (the default config splits these small grids) and
# 4-row programs included
CASES = [
    (gemv, 1, 37, 100, None, False, {"BLOCK_N": 16, "BLOCK_K": 32}),
    (gemv, 3, 24, 70, "silu_and_mul", True, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 16, "SPLIT_K": 2}),
    (gemv, 2, 30, 90, "silu_and_mul", False, {"BLOCK_N": 8, "BLOCK_K": 32, "PREFETCH": False}),
    # one split: the K loop sums x^2 itself (NORM_IN_LOOP), with and without the register prefetch
    (gemv, 1, 37, 100, None, True, {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}),
    (gemv, 3, 24, 70, "silu_and_mul", False, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 16, "SPLIT_K": 1,
                                              "PREFETCH": False}),
    (gemv, 2, 16, 64, None, False, {"BLOCK_M": 2, "BLOCK_N": 8, "BLOCK_K": 16, "SPLIT_K": 1}),
    (flat_gemm, 20, 40, 72, None, True, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),
    (flat_gemm, 17, 48, 64, "silu_and_mul", False, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 2}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel, m, n, k, act, has_res, config", CASES)
def test_norm_prologue_matches_norm_then_matmul(kernel, m, n, k, act, has_res, config, dtype):
    g = torch.Generator().manual_seed(1)
    x = (3.0 * torch.randn(m, k, generator=g)).to(dtype).to(DEVICE)  # rms far from 1: rstd matters
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    nw = (1.0 + 0.5 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    n_out = n // 2 if act else n
    r = torch.randn(m, n_out, generator=g).to(dtype).to(DEVICE) if has_res else None
    y = kernel(x, w, residual=r, act=act, config=config, norm_weight=nw, norm_eps=1e-5)
    ref = gemv_reference(x, w, residual=r, act=act, norm_weight=nw, norm_eps=1e-5)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], err
    plain = gemv_reference(x, w, residual=r, act=act)
    assert ((plain - ref).norm() / ref.norm()).item() > 0.1  # the norm changes the result


def test_norm_weight_of_the_wrong_size_is_refused():
    x, w = torch.randn(1, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="norm_weight must be a contiguous \\[32\\]"):
        gemv(x, w, norm_weight=torch.ones(16, device=DEVICE))


@pytest.mark.parametrize("backend", ["reference", "flat"])
def test_fused_decoder_matches_separate_norms(tiny_llm, backend):
    """Same logits with the norms and residual adds inside the projections (Triton GEMV under the
    flat GEMM under the interpreter, or the reference path) as with separate RMSNorm ops."""
    model = tiny_llm.engine.model
    ids = torch.tensor([5, 9, 13, 40], device=DEVICE)
    pos = torch.arange(len(ids), device=DEVICE)
    from fdpp.layers.context import forward_context
    from fdpp.ops.attention import AttentionMetadata

    def logits():
        n = len(ids)
        meta = AttentionMetadata(is_prefill=True, cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                                 max_seqlen_q=n, context_lens=torch.tensor([n], dtype=torch.int32),
                                 block_tables=torch.tensor([[60]], dtype=torch.int32),
                                 slot_mapping=torch.arange(60 * 16, 60 * 16 + n), max_context_len=n)
        with torch.inference_mode(), forward_context(meta):
            return model.compute_logits(model(ids, pos))

    try:
        with use_backends(linear=backend):
            separate = logits()
            model.set_fuse_norm(True)
            fused = logits()
    finally:
        model.set_fuse_norm(False)
    torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-4)
    assert fused.argmax(-1).tolist() == separate.argmax(-1).tolist()


@pytest.mark.parametrize("impl, m, fused", [("gemv", 1, True), ("gemv", 8, True), ("flat", 2, False),
                                            ("flat", 64, False), ("cublas", 1, False)])
def test_linear_fuses_the_norm_only_where_the_rule_says(monkeypatch, impl, m, fused):
    """``linear`` hands norm_weight to the kernel's prologue only where ``fuses_norm`` says so (the GEMV; the
    flat GEMM is slower fused at every M, measured on an H200); elsewhere the norm op runs first and the
    kernel gets the normed x. Same values either way."""
    import fdpp.kernels.flat_gemm as flat_mod
    import fdpp.kernels.gemv as gemv_mod
    import fdpp.ops.linear as lin

    assert lin.fuses_norm(impl) is fused
    seen = []
    for mod, name in ((gemv_mod, "gemv"), (flat_mod, "flat_gemm")):
        real = getattr(mod, name)

        def spy(*a, real=real, **kw):
            seen.append(kw.get("norm_weight") is not None)
            return real(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    monkeypatch.setattr(lin, "choose_impl", lambda *a, **k: (impl, None))
    torch.manual_seed(0)
    x, w, g = torch.randn(m, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE), torch.rand(32, device=DEVICE) + 0.5
    with use_backends(linear="table"):
        y = lin.linear(x, w, norm_weight=g, norm_eps=1e-6)
    assert seen == ([] if impl == "cublas" else [fused])
    ref = gemv_reference(x, w, norm_weight=g, norm_eps=1e-6)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_a_table_entry_can_keep_the_norm_separate(monkeypatch):
    """``"separate_norm": true`` in a GEMV range's config (bench_fused_norm.py --update-table) makes ``linear``
    run the norm op first and hand the GEMV the normed x; same values."""
    import fdpp.kernels.gemv as gemv_mod
    import fdpp.ops.linear as lin

    assert lin.fuses_norm("gemv", {"BLOCK_N": 4}) and not lin.fuses_norm("gemv", {"separate_norm": True})
    seen = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: seen.append(kw.get("norm_weight") is not None) or real(*a, **kw))
    monkeypatch.setattr(lin, "choose_impl", lambda *a, **k: ("gemv", {"BLOCK_N": 8, "BLOCK_K": 32, "separate_norm": True}))
    torch.manual_seed(1)
    x, w, g = torch.randn(1, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE), torch.rand(32, device=DEVICE) + 0.5
    with use_backends(linear="table"):
        y = lin.linear(x, w, norm_weight=g, norm_eps=1e-6)
    assert seen == [False]
    ref = gemv_reference(x, w, norm_weight=g, norm_eps=1e-6)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_update_table_records_the_faster_side(tmp_path):
    """bench_fused_norm.py --update-table: a GEMV point measured > 2% faster separate gets separate_norm, one
    within 2% (or faster fused) loses it; flat-GEMM points and shapes without an entry are left alone."""
    from fdpp.dataflow.table import DispatchTable, MRange, ShapeEntry
    from tests.helpers import load_bench

    cfg = {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 2}
    table = DispatchTable("NVIDIA H200", [
        ShapeEntry("float16", 6144, 4096, [MRange(1, 1, "gemv", dict(cfg)), MRange(2, 64, "flat", {"BLOCK_M": 16})]),
        ShapeEntry("bfloat16", 6144, 4096, [MRange(1, 1, "gemv", {**cfg, "separate_norm": True}),
                                            MRange(2, 64, "flat", {"BLOCK_M": 16})]),
    ])
    path = table.save(tmp_path / "t.json")
    row = dict(model="llama-3-8b", layer="qkv", n=6144, k=4096, m=1, impl="gemv")
    rows = [dict(row, dtype="float16", fused_us=18.5, separate_us=17.6),  # 1.05x: separate
            dict(row, dtype="bfloat16", fused_us=17.8, separate_us=17.6),  # within 2%: fused
            dict(row, dtype="float16", m=2, impl="flat", fused_us=40.0, separate_us=18.0),
            dict(row, dtype="float16", n=4096, fused_us=30.0, separate_us=10.0)]  # no entry
    changed = load_bench("bench_fused_norm").update_table(str(path), rows)
    assert len(changed) == 2
    t = DispatchTable.load(path)
    assert t.lookup("float16", 6144, 4096, 1)[1].get("separate_norm") is True
    assert "separate_norm" not in t.lookup("bfloat16", 6144, 4096, 1)[1]
    assert t.lookup("float16", 6144, 4096, 2)[1] == {"BLOCK_M": 16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, act, config", [
    (12288, 4096, None, {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4}),  # one split: x^2 in the loop
    (28672, 4096, "silu_and_mul", {"BLOCK_N": 4, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 2}),
    (4096, 4096, None, {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4}),  # split-K: the 2nd pass
])
def test_gpu_gemv_norm_prologue_real_sizes(dtype, n, k, act, config):
    """The GEMV's RMSNorm prologue compiled for the GPU at real shapes, the one-pass (one split) and the
    split-K variants, against float64."""
    g = torch.Generator(device="cuda").manual_seed(n)
    x = (3.0 * torch.randn(1, k, device="cuda", generator=g)).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    nw = (torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype)
    y = gemv(x, w, act=act, config=config, norm_weight=nw, norm_eps=1e-5)
    ref = gemv_reference(x, w, act=act, norm_weight=nw, norm_eps=1e-5)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < (3e-3 if dtype == torch.float16 else 2e-2), err
