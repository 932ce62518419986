"""Fresh-prompt prefill with TMA descriptors (fdpp.kernels.attention_prefill_tma) vs float64.

Interpreter on the CPU with tiny shapes (the TMA descriptor path runs there too, with zero fill past
the tensor); GPU-marked tests at real sizes compare with torch SDPA and go through the ops dispatch.
"""
import pytest
import torch

from fdpp.kernels.attention_prefill_tma import prefill_attention_tma
from fdpp.ops.attention import AttentionMetadata, _stats_tensor, prefill_tma_dispatch, safe_window
from tests.kernels.paged_utils import TOL, make_paged_kv, reference, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=1) if DEVICE == "cpu" else {}


def _case(q_lens, num_heads, num_kv_heads, head_dim, dtype, context_lens=None, block_size=16, seed=0):
    """Paged cache in random block order holding every sequence's context; q and this step's k/v
    (the LAST q_len tokens of each context) as contiguous tensors; metadata with slot_mapping."""
    context_lens = context_lens or q_lens
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype,
                                                   "cpu", gen)
    cu, slots = [0], []
    for i, (n, c) in enumerate(zip(q_lens, context_lens, strict=True)):
        cu.append(cu[-1] + n)
        for p in range(c - n, c):
            slots.append(int(block_tables[i, p // block_size]) * block_size + p % block_size)
    slots = torch.tensor(slots, dtype=torch.int64)
    flat = (k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim))
    k, v = (x[slots].contiguous() for x in flat)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(is_prefill=True, context_lens=torch.tensor(context_lens, dtype=torch.int32),
                             block_tables=block_tables, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                             max_seqlen_q=max(q_lens), max_context_len=max(context_lens), slot_mapping=slots,
                             fresh_prefill=list(context_lens) == list(q_lens))
    dev = [x.to(DEVICE) for x in (q, k, v, k_cache, v_cache)]
    for name in ("context_lens", "block_tables", "cu_seqlens_q", "slot_mapping"):
        setattr(meta, name, getattr(meta, name).to(DEVICE))
    return (*dev, meta)


def _run(q, k, v, k_cache, v_cache, meta, scale, **kw):
    kw = {**SMALL, **kw}
    return prefill_attention_tma(q, k, v, meta.cu_seqlens_q, meta.context_lens, scale=scale,
                                 max_seqlen_q=meta.max_seqlen_q, k_cache=k_cache, v_cache=v_cache,
                                 block_tables=meta.block_tables, window=safe_window(q.dtype), **kw)


def _valid_flags(flags, meta, block_m):
    """Flags of the query tiles that exist (the tensor has max_q_tiles per (seq, head))."""
    q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
    return [flags[i, :, :-(-n // block_m)] for i, n in enumerate(q_lens)]


@pytest.fixture(scope="module")
def varlen_gqa():
    """3 fresh sequences (lengths not multiples of the tile), GQA 4/2, head_dim 64, fp16."""
    return _case([37, 16, 50], 4, 2, 64, torch.float16)


@pytest.mark.parametrize("kw", [
    dict(phi=2.0),                                   # unified, TMA, RTZ mass check (the default)
    dict(phi=None),                                  # synchronized
    dict(phi=2.0, use_tma=False),                    # pointer loads
    dict(phi=2.0, overlap=True),                     # next tile's QK^T before this softmax
    dict(phi=None, overlap=True, use_tma=False),
    dict(phi=2.0, mass_mode="abs", split_causal=False),
    dict(phi=2.0, use_tma="host", window_on="sum"),  # host-built descriptors; window on l
])
def test_matches_float64(varlen_gqa, kw):
    q, k, v, kc, vc, meta = varlen_gqa
    scale = 64 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    flags = []
    out = _run(q, k, v, kc, vc, meta, scale, stats=stats, flags_out=flags, **kw)
    assert rel_err(out, ref) < TOL[q.dtype]
    tiles = _valid_flags(flags[0].cpu(), meta, SMALL.get("block_m", 128))
    assert all(int(t.sum()) == 0 for t in tiles), "a well-placed phi must keep every tile on the fast path"
    if kw["phi"] is not None:
        assert stats.tolist() == [q.shape[0] * q.shape[1], 0]


def test_bf16_mha():
    q, k, v, kc, vc, meta = _case([20, 33], 2, 2, 64, torch.bfloat16, seed=1)
    ref = reference(q, kc, vc, meta, 0.125)
    for kw in (dict(phi=3.0), dict(phi=None), dict(phi=3.0, window_on="sum")):
        assert rel_err(_run(q, k, v, kc, vc, meta, 0.125, **kw), ref) < TOL[torch.bfloat16]
    flags = []  # bf16, window on l: phi 60 puts l below e^-50 in every row
    out = _run(q, k, v, kc, vc, meta, 0.125, phi=60.0, window_on="sum", flags_out=flags)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert all(bool(t.all()) for t in _valid_flags(flags[0].cpu(), meta, SMALL.get("block_m", 128)))


def test_out_of_window_tiles_fall_back(varlen_gqa):
    """phi far above every score: every tile flagged, recomputed exactly by the paged fallback."""
    q, k, v, kc, vc, meta = varlen_gqa
    ref = reference(q, kc, vc, meta, 0.125)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    flags = []
    out = _run(q, k, v, kc, vc, meta, 0.125, phi=30.0, stats=stats, flags_out=flags)
    assert rel_err(out, ref) < TOL[q.dtype]
    assert all(bool(t.all()) for t in _valid_flags(flags[0].cpu(), meta, SMALL.get("block_m", 128)))
    assert stats.tolist() == [q.shape[0] * q.shape[1]] * 2


def test_lost_mass_is_flagged_only_where_it_is_lost():
    """fp16: one key at score -7.5 (V = 0, inside the window), the others at -17 (V = 1), phi 0.
    e^-17 is below fp16's subnormals: every such P is lost in the cast. Row i loses i e^-9.5 of its
    mass relative to the max key: rows with <= 26 such keys stay under MASS_TOL = 2^-9 (fast path),
    later rows exceed it and must be flagged and recomputed."""
    n, d = 64, 64
    q = torch.zeros(n, 1, d)
    q[:, 0, 0] = 1.0
    k = torch.zeros(n, 1, d)
    k[:, 0, 0] = -17.0
    k[0, 0, 0] = -7.5
    v = torch.ones(n, 1, d)
    v[0] = 0.0
    q, k, v = (x.half().to(DEVICE) for x in (q, k, v))
    kc, vc = k.view(n // 16, 16, 1, d), v.view(n // 16, 16, 1, d)
    meta = AttentionMetadata(is_prefill=True, context_lens=torch.tensor([n], dtype=torch.int32, device=DEVICE),
                             block_tables=torch.arange(n // 16, dtype=torch.int32, device=DEVICE)[None],
                             cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=DEVICE), max_seqlen_q=n)
    ref = reference(q, kc, vc, meta, 1.0)
    kw = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    flags = []
    out = _run(q, k, v, kc, vc, meta, 1.0, phi=0.0, flags_out=flags, **kw)
    assert flags[0].view(-1).tolist() == [0, 1, 1, 1]  # rows 0-15 keep the fast path; rows 27+ flagged
    flags_sum = []
    _run(q, k, v, kc, vc, meta, 1.0, phi=0.0, window_on="sum", flags_out=flags_sum, **kw)
    assert flags_sum[0].view(-1).tolist() == [0, 1, 1, 1]  # the mass test alone decides here
    # the guarantee: error <= MASS_TOL * max|v| on the fast path (rows 0-15 lose < 2^-9 of their mass
    # here), the synchronized result on recomputed tiles
    bound = 2.0 ** -9 + 1e-5
    assert float((out.double() - ref.double()).abs().max()) <= bound
    assert rel_err(out[16:], ref[16:]) < TOL[torch.float16]
    # "abs" (round to nearest): e^-17 rounds UP to fp16's smallest subnormal, so rows gain less than
    # 2^-9 of their mass until ~58 keys: only the last tile is flagged; the bound holds all the same
    flags = []
    out_abs = _run(q, k, v, kc, vc, meta, 1.0, phi=0.0, mass_mode="abs", flags_out=flags, **kw)
    assert flags[0].view(-1).tolist() == [0, 0, 0, 1]
    assert float((out_abs.double() - ref.double()).abs().max()) <= bound
    # without the check the cast goes unnoticed: the last row reads 0.0068 (every e^-17 rounded up to
    # the smallest subnormal) instead of 0.0047
    wrong = _run(q, k, v, kc, vc, meta, 1.0, phi=0.0, mass_mode="off", fallback=False, **kw)
    assert float((wrong[-1].double() - ref[-1].double()).abs().max()) > 1e-3


def test_nan_propagates_and_stays_in_its_sequence(varlen_gqa):
    """NaN in one key of sequence 1 makes its later rows NaN (never a finite wrong value), and NaN in
    the values of sequence 1's first rows (which sequence 0's last tile loads through TMA) does not
    leak into sequence 0 or 2."""
    q, k, v, kc, vc, meta = varlen_gqa
    k, v = k.clone(), v.clone()
    k[37 + 5, 0, 0] = float("nan")
    v[37, 1, 3] = float("nan")
    for phi in (2.0, None):
        out = _run(q, k, v, kc, vc, meta, 0.125, phi=phi, fallback=False)
        assert torch.isnan(out[37 + 5:53, 0:2]).all()  # kv head 0 serves q heads 0, 1
        assert torch.isfinite(out[:37]).all() and torch.isfinite(out[53:]).all()
        assert torch.isfinite(out[37:37 + 5, 0:2]).all()


def test_cached_prefix_goes_to_the_paged_kernel():
    """Sequence 1 has 20 cached tokens before its 12 new ones: its tiles are flagged and the paged
    fallback computes them over the cache; through the ops dispatch (k/v gathered via slot_mapping)."""
    q, k, v, kc, vc, meta = _case([24, 12], 2, 1, 64, torch.float16, context_lens=[24, 32], seed=2)
    ref = reference(q, kc, vc, meta, 0.125)
    stats = _stats_tensor(q.device)[0]
    for phi in (2.0, None):
        out = prefill_tma_dispatch(q, kc, vc, meta, scale=0.125, phi=phi, window=safe_window(q.dtype),
                                   sliding_window=None, stats=stats, force=True)
        assert rel_err(out, ref) < TOL[q.dtype]
    assert prefill_tma_dispatch(q, kc, vc, meta, scale=0.125, phi=2.0, window=(-8, 10.5), sliding_window=None,
                                stats=stats) is None or DEVICE == "cuda"  # default off


def test_bad_input_is_rejected(varlen_gqa):
    q, k, v, kc, vc, meta = varlen_gqa
    with pytest.raises(ValueError, match="head_dim"):
        _run(q[..., :32], k[..., :32], v[..., :32], kc, vc, meta, 0.125)
    with pytest.raises(ValueError, match="contiguous heads"):
        _run(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, kc, vc, meta, 0.125)
    with pytest.raises(ValueError, match="needs k_cache"):
        prefill_attention_tma(q, k, v, meta.cu_seqlens_q, meta.context_lens, scale=0.1, max_seqlen_q=50)
    with pytest.raises(ValueError, match="window_on"):
        _run(q, k, v, kc, vc, meta, 0.125, phi=1.0, window_on="min")
    with pytest.raises(ValueError, match="mass check"):
        _run(q, k, v, kc, vc, meta, 0.125, phi=1.0, mass_mode="off")


# ------------------------------------------------------------------------------------------------
# GPU (real sizes)
# ------------------------------------------------------------------------------------------------

def _sdpa_ref(q, k, v, lens):
    outs, r = [], 0
    g = q.shape[1] // k.shape[1]
    for n in lens:
        qs, ks, vs = (x[r:r + n].transpose(0, 1).float() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        r += n
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("kw", [dict(), dict(overlap=True), dict(use_tma=False), dict(block_n=64, num_stages=3),
                                dict(use_tma="host", block_n=64, num_stages=3, overlap=True, window_on="sum")])
def test_gpu_real_sizes(dtype, heads, kw):
    if torch.cuda.get_device_capability()[0] < 9 and kw.get("use_tma", True):
        pytest.skip("TMA descriptors need compute capability >= 9")
    lens = [2048, 1000, 3000]
    q, k, v, kc, vc, meta = _case(lens, heads[0], heads[1], 128, dtype, seed=3)
    ref = _sdpa_ref(q, k, v, lens)
    stats = torch.zeros(2, dtype=torch.int64, device="cuda")
    for phi in (4.0, None):
        out = _run(q, k, v, kc, vc, meta, 128 ** -0.5, phi=phi, stats=stats, **kw)
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < TOL[dtype], (phi, err)
    assert int(stats[1]) == 0 and int(stats[0]) == q.shape[0] * q.shape[1]
    out = _run(q, k, v, kc, vc, meta, 128 ** -0.5, phi=-40.0, **kw)  # every tile through the fallback
    assert float((out.float() - ref).norm() / ref.norm()) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_dispatch_env(monkeypatch):
    """By default (and with FDPP_PREFILL_TMA=1) a fresh fp16 prefill goes through the TMA kernel on
    sm_90+; FDPP_PREFILL_TMA=0 switches it off."""
    from fdpp.ops import attention as ops
    q, k, v, kc, vc, meta = _case([1024, 512], 32, 8, 128, torch.float16, seed=4)
    ref = _sdpa_ref(q, k, v, [1024, 512])
    monkeypatch.delenv("FDPP_PREFILL_TMA", raising=False)
    assert ops.prefill_tma_enabled(q) == (torch.cuda.get_device_capability()[0] >= 9)
    monkeypatch.setenv("FDPP_PREFILL_TMA", "1")
    assert ops.prefill_tma_enabled(q) == (torch.cuda.get_device_capability()[0] >= 9)
    out = ops.attention(q, kc, vc, meta, scale=128 ** -0.5, layer_idx=0, phi=4.0)
    assert float((out.float() - ref).norm() / ref.norm()) < TOL[torch.float16]
    monkeypatch.setenv("FDPP_PREFILL_TMA", "0")
    assert not ops.prefill_tma_enabled(q)
