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
