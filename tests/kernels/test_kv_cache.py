"""store_kv (Triton) vs the reference scatter, and the attention op's dispatch/statistics."""
import pytest
import torch

from fdpp.kernels.kv_cache import store_kv as store_kv_triton
from fdpp.ops import attention as attn_ops
from fdpp.ops.attention import AttentionMetadata, attention, observe_scores, store_kv_reference
from fdpp.ops.backend import use_backends
from tests.kernels.paged_utils import make_paged_kv, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,num_kv_heads,head_dim", [(torch.float16, 2, 32), (torch.bfloat16, 3, 24)])
def test_store_kv_matches_reference(dtype, num_kv_heads, head_dim):
    num_blocks, block_size, num_tokens = 6, 4, 9
    k = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1  # graph padding: skipped
    slots = slots.to(DEVICE)
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype).to(DEVICE) for _ in range(2)]
    kc_ref, vc_ref = caches[0].clone(), caches[1].clone()
    store_kv_reference(k, v, kc_ref, vc_ref, slots)
    store_kv_triton(k, v, caches[0], caches[1], slots)
    assert torch.equal(caches[0], kc_ref) and torch.equal(caches[1], vc_ref)


def test_store_kv_rejects_bad_input():
    kc = torch.zeros(2, 4, 2, 16, dtype=torch.float16)
    k = torch.zeros(3, 2, 8, dtype=torch.float16)
    with pytest.raises(ValueError):
        store_kv_triton(k, k, kc, kc, torch.zeros(3, dtype=torch.int64))


def test_attention_op_dispatch_stats_and_observer():
    """attention(): triton (unified phi) == triton-sync == reference; fallback counted per layer;
    the observer sees the reference path's masked scores."""
    dtype = torch.float16
    context_lens = [5, 19]
    kc, vc, bt = make_paged_kv(context_lens, 2, 32, 8, dtype, DEVICE, torch.Generator().manual_seed(0))
    q = torch.randn(2, 4, 32).to(dtype).to(DEVICE)
    meta = AttentionMetadata(is_prefill=False, context_lens=torch.tensor(context_lens, dtype=torch.int32,
                             device=DEVICE), block_tables=bt, max_context_len=19)
    scale = 32 ** -0.5
    seen = []
    with use_backends(attention="reference"), observe_scores(lambda layer, s: seen.append((layer, s.shape))):
        ref = attention(q, kc, vc, meta, scale=scale, layer_idx=3)
    assert seen == [(3, (4, 1, 5)), (3, (4, 1, 19))]
    attn_ops.reset_fallback_stats()
    with use_backends(attention="triton"):
        fast = attention(q, kc, vc, meta, scale=scale, layer_idx=3, phi=0.0)
        forced = attention(q, kc, vc, meta, scale=scale, layer_idx=4, phi=-40.0)  # all rows fall back
    with use_backends(attention="triton-sync"):
        sync = attention(q, kc, vc, meta, scale=scale, layer_idx=5, phi=0.0)
    for out in (fast, forced, sync):
        assert rel_err(out, ref) < 5e-3
    stats = attn_ops.fallback_stats()
    assert stats["per_layer"][4] == {"checked": 8, "fallback": 8}
    assert 5 not in stats["per_layer"]  # the synchronized backend checks nothing
    assert stats["rows_checked"] == 16 and stats["rows_fallback"] >= 8
    attn_ops.reset_fallback_stats()
    assert attn_ops.fallback_stats()["rows_checked"] == 0


def test_reference_decode_ignores_garbage_past_each_sequence():
    """The batched reference decode gathers whole blocks: slots past a sequence's end (here NaN)
    must not leak into its output."""
    import torch

    from fdpp.ops import attention as A

    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(6, 8, 3, 64, generator=g)
    v_cache = torch.randn(6, 8, 3, 64, generator=g)
    k_cache[0, 6:] = float("nan")
    v_cache[0, 6:] = float("nan")
    q = torch.randn(2, 9, 64, generator=g)
    meta = A.AttentionMetadata(is_prefill=False, context_lens=torch.tensor([6, 13], dtype=torch.int32),
                               block_tables=torch.tensor([[0, 0], [2, 3]], dtype=torch.int32))
    out = A.attention_reference(q, k_cache, v_cache, meta, scale=0.125)
    assert torch.isfinite(out).all()
    with A.observe_scores(lambda *a: None):  # the per-sequence path, which gathers only valid tokens
        ref = A.attention_reference(q, k_cache, v_cache, meta, scale=0.125)
    assert torch.allclose(out, ref, atol=1e-5)
