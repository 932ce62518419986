"""The reference ops' fast formulations (the CPU's decode path) against their spelled-out oracles: the batched
decode against the per-sequence loop, the memoized step plan against a fresh one, the KV store against a
token-by-token write, the RMSNorm against ``rms_norm_reference``."""
import pytest
import torch

from fdpp.layers.context import forward_context
from fdpp.ops import attention as A
from fdpp.ops.norm import rms_norm, rms_norm_reference
from tests.kernels.paged_utils import make_paged_kv


def _per_sequence(q, k_cache, v_cache, meta, scale, sliding_window=None):
    """The per-sequence loop of attention_reference (taken while a score observer is installed)."""
    with A.observe_scores(lambda *a: None):
        return A.attention_reference(q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window)


def _decode_case(context_lens, dtype, num_heads=6, num_kv_heads=2, head_dim=16, block_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, gen=g)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(dtype)
    meta = A.AttentionMetadata(is_prefill=False, context_lens=torch.tensor(context_lens, dtype=torch.int32),
                               block_tables=tables, max_context_len=max(context_lens))
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("context_lens,window", [
    ([13], None),  # one sequence: nothing hidden, no mask
    ([9, 9, 9], None),  # equal rows: no mask either
    ([5, 19, 1, 12], None),  # unequal rows: slots past each end hidden
    ([19], 6),  # the window hides the oldest tokens of the only row
    ([5, 19, 12], 7),
    ([0, 11, 0], None),  # graph padding rows: zeros
    ([0, 0], None),  # no context at all
])
def test_batched_decode_matches_the_per_sequence_loop(dtype, context_lens, window):
    q, k_cache, v_cache, meta = _decode_case(context_lens, dtype)
    ref = _per_sequence(q, k_cache, v_cache, meta, 0.25, window)
    out = A.attention_reference(q, k_cache, v_cache, meta, scale=0.25, sliding_window=window)
    with meta.forward_pass():  # the memoized plan: built by the first call, reused by the second
        A.attention_reference(q, k_cache, v_cache, meta, scale=0.25, sliding_window=window)
        memo = A.attention_reference(q, k_cache, v_cache, meta, scale=0.25, sliding_window=window)
        assert len(meta.memo) == 1
    assert meta.memo is None
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert torch.equal(memo, out)
    for i, n in enumerate(context_lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))


@pytest.mark.parametrize("window", [None, 4])
def test_batched_decode_never_reads_the_poisoned_slots(window):
    """Slots gathered but hidden (past a row's end, before its window, the unused tail of its last block,
    the blocks a shorter row's table pads with) hold NaN: no output may see them."""
    context_lens = [6, 13, 10]
    q, k_cache, v_cache, meta = _decode_case(context_lens, torch.float32, block_size=8)
    clean = (k_cache.clone(), v_cache.clone())
    for cache in (k_cache, v_cache):
        for row, n in enumerate(context_lens):
            blocks = meta.block_tables[row]
            last = int(blocks[(n - 1) // 8])
            cache[last, (n - 1) % 8 + 1:] = float("nan")
            if window is not None and n - window > 0:
                first = int(blocks[0])
                cache[first, :min(n - window, 8)] = float("nan")
    out = A.attention_reference(q, k_cache, v_cache, meta, scale=0.25, sliding_window=window)
    ref = _per_sequence(q, *clean, meta, 0.25, window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_the_step_plan_is_rebuilt_for_every_forward_pass():
    """A static step's metadata (CUDA-graph buffers) is reused with new contents: the plan memoized in one
    forward pass must not serve the next."""
    q, k_cache, v_cache, meta = _decode_case([7, 15], torch.float32)
    with forward_context(meta):
        first = A.attention_reference(q, k_cache, v_cache, meta, scale=0.25)
        assert meta.memo
    meta.context_lens.copy_(torch.tensor([3, 7], dtype=torch.int32))  # within each row's blocks
    with forward_context(meta):
        second = A.attention_reference(q, k_cache, v_cache, meta, scale=0.25)
    torch.testing.assert_close(second, _per_sequence(q, k_cache, v_cache, meta, 0.25), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(first, second)


def test_forward_context_memoizes_the_parts_of_a_mixed_step():
    q, k_cache, v_cache, meta = _decode_case([7, 15], torch.float32)
    part = A.AttentionMetadata(is_prefill=False, context_lens=meta.context_lens, block_tables=meta.block_tables)
    mixed = A.AttentionMetadata(is_prefill=True, context_lens=meta.context_lens, block_tables=meta.block_tables,
                                decode_part=part, prefill_part=meta)
    with forward_context(mixed):
        assert mixed.memo == {} and part.memo == {} and meta.memo == {}
    assert mixed.memo is None and part.memo is None and meta.memo is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("skip", [(), (1, 4)])
def test_store_kv_reference_writes_each_token_at_its_slot(dtype, skip):
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(4, 4, 2, 8, generator=g).to(dtype)
    v_cache = torch.randn(4, 4, 2, 8, generator=g).to(dtype)
    k, v = torch.randn(2, 5, 2, 8, generator=g).unbind(0)  # float32 tokens: cast on the way in
    slots = torch.tensor([3, 9, 0, 15, 6])
    slots[list(skip)] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 4, s % 4] = k[t].to(dtype)
            want_v[s // 4, s % 4] = v[t].to(dtype)
    A.store_kv_reference(k, v, k_cache, v_cache, slots.to(torch.int32))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_its_spelled_out_reference(dtype, weight_dtype, with_residual):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 96, generator=g) * 4).to(dtype)
    w = torch.randn(96, generator=g).to(weight_dtype)
    res = torch.randn(3, 96, generator=g).to(dtype) if with_residual else None
    out, ref = rms_norm(x, w, 1e-5, res), rms_norm_reference(x, w, 1e-5, res)
    if with_residual:
        assert torch.equal(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert out.dtype == ref.dtype
    tol = 2e-6 if ref.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def _rotary_oracle(x, positions, cache, rot, is_neox):
    """Hugging Face's formulation in float64: x * cos + rotate_half(x) * sin on the first ``rot`` dims."""
    cos, sin = cache.double()[positions].chunk(2, dim=-1)
    xr, rest = x[..., :rot].double(), x[..., rot:]
    if is_neox:
        x1, x2 = xr.chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        out = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        cos, sin = cos.repeat_interleave(2, -1)[:, None], sin.repeat_interleave(2, -1)[:, None]
        out = xr * cos + torch.stack([-x2, x1], dim=-1).flatten(-2) * sin
    return torch.cat([out.to(x.dtype), rest], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot", [32, 16])  # every dim, or the first half (partial rotary)
def test_apply_rotary_matches_the_rotate_half_formulation(dtype, is_neox, rot):
    from fdpp.ops.rotary import apply_rotary, build_cos_sin_cache

    g = torch.Generator().manual_seed(3)
    cache = build_cos_sin_cache(rot, 64, 10000.0, None, torch.device("cpu"))
    q, k = torch.randn(3, 4, 32, generator=g).to(dtype), torch.randn(3, 2, 32, generator=g).to(dtype)
    positions = torch.tensor([0, 17, 63])
    q_out, k_out = apply_rotary(q, k, positions, cache, is_neox)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for out, x in ((q_out, q), (k_out, k)):
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out, _rotary_oracle(x, positions, cache, rot, is_neox), rtol=tol, atol=tol)
        assert torch.equal(out[..., rot:], x[..., rot:])
