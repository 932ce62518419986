"""The qkv GEMV with the rotary embedding and the KV-cache write in its epilogue (``fuse_rope``): the Llama
decoder and the engine give the unfused path's logits, cache and tokens, and the fused launch is taken
exactly where the qkv projection dispatches to the GEMV (Triton's interpreter on the CPU)."""
import pytest
import torch

import fdpp.kernels.gemv as gemv_mod
from fdpp import LLM, SamplingParams
from fdpp.layers.context import forward_context
from fdpp.ops.attention import AttentionMetadata
from fdpp.ops.backend import use_backends

QKV_ROWS = (4 + 2 * 2) * 16  # the tiny checkpoint's merged qkv projection: 4 + 2 x 2 heads of 16 dims


@pytest.fixture
def spy_fused(monkeypatch):
    """The dataflow table (``linear_backend="table"``) sends the qkv projection to the GEMV (a config with few
    programs: the interpreter runs them one by one) and every other linear to torch's matmul; returns the
    calls of the fused kernel's wrapper (their row counts)."""
    import fdpp.ops.linear as lin

    qkv_config = {"BLOCK_N": 32, "BLOCK_K": 64}

    def choose(device, dtype, n, k, m, **kw):
        return ("gemv", qkv_config) if n == QKV_ROWS else ("cublas", None)

    monkeypatch.setattr(lin, "choose_impl", choose)
    real = gemv_mod.gemv_rope_store

    def spy(x, *a, **kw):
        calls.append(x.shape[0])
        calls.norm_in_prologue.append(kw.get("norm_weight") is not None)
        return real(x, *a, **kw)

    monkeypatch.setattr(gemv_mod, "gemv_rope_store", spy)
    calls = _Calls()
    calls.qkv_config = qkv_config
    return calls


class _Calls(list):
    """Row counts of the fused launches; ``norm_in_prologue``: whether each took the RMSNorm in its prologue."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_in_prologue: list[bool] = []


def _meta(n: int, start: int, block: int = 60) -> AttentionMetadata:
    """n new tokens at positions start.. of one sequence in KV block ``block`` (16 slots)."""
    end = start + n
    return AttentionMetadata(
        is_prefill=start == 0 or n > 1, cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), max_seqlen_q=n,
        context_lens=torch.tensor([end], dtype=torch.int32), block_tables=torch.tensor([[block]], dtype=torch.int32),
        slot_mapping=torch.arange(block * 16 + start, block * 16 + end), max_context_len=end)


def test_fused_rope_decoder_matches_the_unfused_one(tiny_llm, spy_fused):
    """A 5-token prompt then one decode token, the qkv projection a GEMV: the fused epilogue gives the logits
    and the cache entries of rope_and_store_kv after the plain GEMV (one unfused run), with and without the
    fused norm, and with the norm kept separate by the shape's table range."""
    r = tiny_llm.engine.runner
    model = tiny_llm.engine.model
    saved = r.kv_cache.clone()
    ids = torch.tensor([5, 9, 13, 40, 77, 3])

    def run(fused: bool, fuse_norm: bool):
        r.kv_cache.zero_()
        model.set_fuse_rope(fused)
        model.set_fuse_norm(fuse_norm)
        out = []
        with torch.inference_mode(), use_backends(linear="table"):
            for sl, start in ((slice(0, 5), 0), (slice(5, 6), 5)):
                with forward_context(_meta(sl.stop - sl.start, start)):
                    out.append(model.compute_logits(model(ids[sl], torch.arange(sl.start, sl.stop))))
        return out, r.kv_cache.clone()

    try:
        plain, cache_plain = run(False, False)
        assert spy_fused == [] and cache_plain.abs().sum() > 0
        for fuse_norm in (False, True, "separate"):
            spy_fused.clear()
            spy_fused.norm_in_prologue.clear()
            if fuse_norm == "separate":
                spy_fused.qkv_config["separate_norm"] = True
            fused, cache_fused = run(True, bool(fuse_norm))
            assert spy_fused == [5, 5, 1, 1], fuse_norm  # 2 layers x (the prompt, the decode token)
            assert spy_fused.norm_in_prologue == [fuse_norm is True] * 4, fuse_norm
            for a, b in zip(fused, plain):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cache_fused, cache_plain, rtol=1e-5, atol=1e-5)
    finally:
        model.set_fuse_rope(False)
        model.set_fuse_norm(False)
        r.kv_cache.copy_(saved)


@pytest.mark.parametrize("backend, impl", [("reference", None), ("table", "flat"), ("table", "cublas")])
def test_fused_rope_falls_back_where_the_qkv_projection_is_no_gemv(tiny_llm, spy_fused, monkeypatch, backend, impl):
    """The reference linear backend, or a table that sends the qkv projection to the flat GEMM or cuBLAS:
    the unfused path."""
    import fdpp.ops.linear as lin

    monkeypatch.setattr(lin, "choose_impl", lambda *a, **k: (impl, None))
    model = tiny_llm.engine.model
    r = tiny_llm.engine.runner
    saved = r.kv_cache.clone()
    try:
        model.set_fuse_rope(True)
        with torch.inference_mode(), use_backends(linear=backend), forward_context(_meta(3, 0)):
            model(torch.tensor([4, 5, 6]), torch.arange(3))
    finally:
        model.set_fuse_rope(False)
        r.kv_cache.copy_(saved)
    assert spy_fused == []


def test_engine_fused_rope_tokens(tiny_llama_dir, spy_fused):
    """The engine end to end (a two-prompt prefill, then decode steps of two rows), the qkv projection a GEMV:
    fuse_rope on gives fuse_rope off's tokens."""
    prompts = [[5, 9, 13], [40, 77, 3, 8, 21, 2, 99]]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    runs = []
    for fuse in (False, True):
        llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", show_progress=False, calibration="off",
                  num_blocks=16, block_size=16, linear_backend="table", fuse_rope=fuse)
        try:
            assert llm.engine.fuse_rope is fuse
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.close()
        assert bool(spy_fused) is fuse
    assert runs[1] == runs[0]
