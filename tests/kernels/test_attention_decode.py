"""Paged decode attention (unified max + fallback, synchronized) vs a float64 reference.

Runs in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1): tiny shapes.
"""
import pytest
import torch

from fdpp.kernels.attention_decode import choose_num_splits, paged_decode_attention
from fdpp.ops.attention import AttentionMetadata, safe_window
from tests.kernels.paged_utils import TOL, make_paged_kv, reference, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, k_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype,
                                                   DEVICE, gen, k_scale)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    meta = AttentionMetadata(is_prefill=False,
                             context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
                             block_tables=block_tables, max_context_len=max(context_lens))
    return q, k_cache, v_cache, meta


def _run(q, k_cache, v_cache, meta, scale, **kw):
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale=scale,
                                  max_context_len=meta.max_context_len, **kw)


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,splits", [
    (torch.float16, 4, 4, 64, 3),     # MHA (query row padded to 16 for the dot)
    (torch.bfloat16, 8, 2, 64, 2),    # GQA 4, dot path
    (torch.float16, 8, 1, 32, 1),     # MQA / GQA 8, single split
    (torch.float32, 2, 2, 48, 2),     # non-power-of-2 head_dim, fp32
])
@pytest.mark.parametrize("mode", ["unified", "sync"])
def test_decode_matches_reference(dtype, num_heads, num_kv_heads, head_dim, splits, mode):
    context_lens = [1, 37, 16, 70]  # 1 token, non-multiples of the block size, several blocks
    q, kc, vc, meta = _case(context_lens, num_heads, num_kv_heads, head_dim, 16, dtype)
    scale = head_dim ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    flags = []
    phi = 1.0 if mode == "unified" else None
    out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), num_splits=splits,
               stats=stats, flags_out=flags)
    assert rel_err(out, ref) < TOL[dtype]
    if mode == "unified":
        assert int(stats[0]) == len(context_lens) * num_heads
        assert int(stats[1]) == int(flags[0].sum())


@pytest.mark.parametrize("phi,expect", [(-30.0, "overflow"), (40.0, "underflow")])
def test_decode_out_of_window_falls_back(phi, expect):
    """phi far too low makes e^{s-phi} overflow fp16; far too high underflows: all rows must be
    flagged, recomputed by the synchronized kernel, and still match."""
    dtype = torch.float16
    context_lens = [5, 33, 20]
    q, kc, vc, meta = _case(context_lens, 8, 2, 32, 8, dtype, seed=1)
    scale = 32 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    flags = []
    out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), num_splits=2, stats=stats,
               flags_out=flags)
    assert flags[0].all(), expect
    assert int(stats[0]) == int(stats[1]) == 3 * 8
    assert rel_err(out, ref) < TOL[dtype]
    # Without the fallback launch the flagged rows are wrong (proves the fallback did the work).
    bad = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), num_splits=2, fallback=False)
    assert not torch.isfinite(bad).all() or rel_err(bad, ref) > 1e-2


def test_decode_partial_fallback_only_flags_outliers():
    """One sequence with huge scores (keys scaled up) falls back; the others stay on the fast path."""
    dtype = torch.float16
    context_lens = [9, 24]
    q, kc, vc, meta = _case(context_lens, 4, 4, 32, 8, dtype, seed=2)
    # Make sequence 1's first key huge along q's direction -> score far above phi + hi.
    blk = int(meta.block_tables[1, 0])
    kc[blk, 0] = (q[1] * 8).to(dtype)
    scale = 32 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    flags = []
    out = _run(q, kc, vc, meta, scale, phi=0.0, window=safe_window(dtype), num_splits=2, flags_out=flags)
    assert flags[0][0].sum() == 0 and flags[0][1].all()
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_sliding_window_and_fused_vs_separate_reduce():
    dtype = torch.bfloat16
    context_lens = [3, 45, 29]
    q, kc, vc, meta = _case(context_lens, 4, 2, 32, 8, dtype, seed=3)
    scale = 32 ** -0.5
    ref = reference(q, kc, vc, meta, scale, sliding_window=10)
    for fused, use_dot in ((True, True), (False, True), (True, False)):
        out = _run(q, kc, vc, meta, scale, phi=0.5, window=safe_window(dtype), sliding_window=10,
                   num_splits=2, fused_reduce=fused, use_dot=use_dot)
        assert rel_err(out, ref) < TOL[dtype]


def test_choose_num_splits():
    assert choose_num_splits(64, 32, 4096, 132) == 1          # plenty of (seq, head) groups
    assert choose_num_splits(1, 8, 32768, 132) > 8             # one long GQA sequence: split a lot
    assert choose_num_splits(1, 32, 100, 132) == 1             # too short to split
    assert choose_num_splits(1, 32, 1024, 132) <= 1024 // 128
    # batch-1 GQA 32/8 on an H200: at least one program per SM from 4k on (8 KV heads x splits)
    for kv_len in (4096, 16384, 32768):
        assert 8 * choose_num_splits(1, 8, kv_len, 132) >= 132


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_gpu_real_sizes(num_heads, num_kv_heads, dtype):
    context_lens = [1, 1000, 4097, 300, 16384, 77]
    q, kc, vc, meta = _case(context_lens, num_heads, num_kv_heads, 128, 16, dtype, seed=4)
    scale = 128 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    for phi in (None, 2.0, -40.0):
        out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype))
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("phi", [2.0, -40.0])
def test_decode_cuda_graph_replay(phi):
    """The unified kernel + always-launched fallback capture into a CUDA graph and replay correctly
    with new inputs (the split tickets reset themselves; flagged rows are recomputed in the graph)."""
    from fdpp.ops.attention import attention
    from fdpp.ops.backend import use_backends
    dtype = torch.float16
    context_lens = [1, 1000, 4097, 300]
    q, kc, vc, meta = _case(context_lens, 32, 8, 128, 16, dtype, seed=5)
    scale = 128 ** -0.5
    with use_backends(attention="triton"):
        attention(q, kc, vc, meta, scale=scale, layer_idx=0, phi=phi)  # warm-up: compile, workspaces
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention(q, kc, vc, meta, scale=scale, layer_idx=0, phi=phi)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        meta.context_lens.copy_(torch.tensor([c - step for c in [3, 1000, 4097, 300]], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(q, kc, vc, meta, scale)) < TOL[dtype]


def test_engine_greedy_tokens_same_with_triton_attention(tmp_path):
    """A tiny Llama through the whole engine (prefill + decode steps, paged cache): the same greedy
    tokens with the reference attention, the synchronized kernels, the unified kernels, and the unified
    kernels with a phi so wrong that every row falls back."""
    from fdpp import SamplingParams
    from fdpp.ops import attention as attn_ops
    from tests.helpers import write_tiny_llama
    from tests.models import load_llm, random_prompt

    write_tiny_llama(str(tmp_path / "m"))
    prompts = [random_prompt(n, 128, seed=s) for s, n in enumerate((21, 5, 13))]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    tokens = {}
    for name, backend, phi in (("reference", "reference", None), ("sync", "triton", None),
                               ("unified", "triton", 0.0), ("fallback", "triton", -60.0)):
        llm = load_llm(tmp_path / "m", attention_backend=backend)  # the backend is this engine's own
        for layer in llm.engine.model.attention_layers():
            layer.phi = phi
        attn_ops.reset_fallback_stats()
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[name] = [o.outputs[0].token_ids for o in outs]
        stats = attn_ops.fallback_stats()
        llm.close()
        if name == "unified":
            assert stats["rows_checked"] > 0 and stats["rate"] == 0.0
        if name == "fallback":
            assert stats["rows_checked"] > 0 and stats["rate"] == 1.0
    assert tokens["sync"] == tokens["reference"]
    assert tokens["unified"] == tokens["reference"]
    assert tokens["fallback"] == tokens["reference"]
