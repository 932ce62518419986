"""Split-KV paged prefill (num_splits > 1: partials + combine, check on the combined rows) vs the
unsplit kernel and a float64 reference. Runs in Triton's interpreter on the CPU: tiny shapes."""
import pytest
import torch

from fdpp.kernels.attention_prefill import choose_prefill_splits
from fdpp.ops.attention import safe_window
from tests.kernels.paged_utils import TOL, prefill_case, reference, rel_err, run_paged_prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, q_scale=1.0):
    return prefill_case(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, DEVICE,
                        seed, q_scale)


_run = run_paged_prefill


# (q_len, context_len): full prompt, chunk after a cached prefix (q_len < context), one token, a
# context shorter than the splits (16-key tiles on the CPU: 17 keys = 2 tiles for up to 5 splits).
Q_LENS, CTX_LENS = [20, 6, 1, 3], [20, 50, 9, 17]
_SHARED: dict = {}


def _shared(mode):
    """The GQA-2 fp16 case, its float64 reference and the unsplit run of `mode` (computed once)."""
    if mode not in _SHARED:
        dtype = torch.float16
        if "case" not in _SHARED:
            case = _case(Q_LENS, CTX_LENS, 4, 2, 16, 8, dtype)
            _SHARED["case"] = case, reference(*case[:3], case[3], 16 ** -0.5)
        (q, kc, vc, meta), _ = _SHARED["case"]
        phi = 0.5 if mode == "unified" else None
        stats, flags = torch.zeros(2, dtype=torch.int64, device=DEVICE), []
        base = _run(q, kc, vc, meta, 16 ** -0.5, phi=phi, window=safe_window(dtype), stats=stats, flags_out=flags)
        _SHARED[mode] = base, stats, flags
    return _SHARED["case"], _SHARED[mode]


@pytest.mark.parametrize("mode,num_splits", [("unified", 1), ("unified", 2), ("unified", 3), ("unified", 5),
                                             ("sync", 2), ("sync", 5)])
def test_split_matches_unsplit_and_reference(num_splits, mode):
    dtype = torch.float16
    ((q, kc, vc, meta), ref), (base, stats1, f1) = _shared(mode)
    phi = 0.5 if mode == "unified" else None
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    fs = []
    out = _run(q, kc, vc, meta, 16 ** -0.5, phi=phi, window=safe_window(dtype), stats=stats, flags_out=fs,
               num_splits=num_splits)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, base) < TOL[dtype]
    if mode == "unified":
        # Random scores sit well inside the window: the combined rows pass exactly as unsplit ones.
        assert int(stats[0]) == sum(Q_LENS) * 4
        assert int(stats[1]) == int(stats1[1]) == 0
        # flags of real tiles (16-row tiles on the CPU; tiles past a sequence's q_len are never written)
        for i, n in enumerate(Q_LENS):
            nt = -(-n // 16)
            assert torch.equal(fs[0][i, :, :nt], f1[0][i, :, :nt]) and not fs[0][i, :, :nt].any()


def test_split_sliding_window_bf16():
    dtype = torch.bfloat16
    q_lens, ctx = [19, 6], [19, 53]
    q, kc, vc, meta = _case(q_lens, ctx, 4, 1, 16, 4, dtype, seed=2)  # GQA 4
    scale = 16 ** -0.5
    ref = reference(q, kc, vc, meta, scale, sliding_window=21)
    for phi in (0.5, None):
        out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), sliding_window=21, num_splits=3)
        assert rel_err(out, ref) < TOL[dtype]


def test_split_fp32():
    dtype = torch.float32
    q, kc, vc, meta = _case([5, 9], [40, 9], 2, 1, 24, 8, dtype, seed=3)  # head_dim not a power of 2
    scale = 24 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    out = _run(q, kc, vc, meta, scale, phi=0.0, window=safe_window(dtype), num_splits=2)
    assert rel_err(out, ref) < TOL[dtype]


def test_split_flags_issue11_style_recomputed():
    # Issue-11 style: large scores put a row's max far above phi (out of the window) in ONE split only:
    # the combined check must flag that tile and the fallback recompute it exactly.
    dtype = torch.float16
    q, kc, vc, meta = _case([4], [64], 2, 1, 16, 8, dtype, seed=4)
    # one key (in the first split's range) aligned with every query of head 0: s - phi >> hi
    blk, off = int(meta.block_tables[0, 0]), 1
    kc[blk, off, 0] = q[:, 0].float().mean(0).to(dtype) * 12
    scale = 16 ** -0.5
    ref = reference(q, kc, vc, meta, scale)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    flags = []
    out = _run(q, kc, vc, meta, scale, phi=0.0, window=safe_window(dtype), stats=stats, flags_out=flags,
               num_splits=4)
    assert rel_err(out, ref) < TOL[dtype]
    assert int(stats[0]) == 4 * 2
    assert int(flags[0][0, 0, 0]) == 1 and int(stats[1]) >= 4
    bad = _run(q, kc, vc, meta, scale, phi=0.0, window=safe_window(dtype), fallback=False, num_splits=4)
    assert not torch.isfinite(bad).all() or rel_err(bad, ref) > 1e-2


def test_split_nan_in_q_gives_nan():
    dtype = torch.float16
    q, kc, vc, meta = _case([5], [40], 2, 2, 16, 8, dtype, seed=5)
    q[2, 1, 3] = float("nan")
    scale = 16 ** -0.5
    for phi in (0.5, None):
        out = _run(q, kc, vc, meta, scale, phi=phi, window=safe_window(dtype), num_splits=3)
        assert torch.isnan(out[2, 1]).all()
        assert torch.isfinite(out[:2]).all() and torch.isfinite(out[2, 0]).all()


def test_split_bad_num_splits():
    dtype = torch.float16
    q, kc, vc, meta = _case([2], [4], 2, 2, 16, 8, dtype)
    with pytest.raises(ValueError, match="num_splits"):
        _run(q, kc, vc, meta, 0.25, phi=0.0, num_splits=0)


def test_choose_prefill_splits():
    # the issue-13 case: a 256-token chunk (2 tiles) x 32 heads at 16k context on 132 SMs
    assert choose_prefill_splits(2, 32, 1, 16384, 132) == 2          # the H200's best at these points
    assert choose_prefill_splits(1, 32, 1, 16384, 132) == 4
    assert choose_prefill_splits(1, 32, 1, 4096, 132) == 4
    assert choose_prefill_splits(1, 8, 1, 65536, 132) == 16          # capped
    assert choose_prefill_splits(1, 32, 1, 1024, 132) == 1           # short context: no split
    assert choose_prefill_splits(1, 32, 1, 2500, 132) == 2
    assert choose_prefill_splits(32, 32, 1, 16384, 132) == 1         # grid already fills the GPU
    assert choose_prefill_splits(2, 32, 4, 16384, 132) == 1
    with pytest.raises(ValueError, match="num_sms"):
        choose_prefill_splits(1, 1, 1, 100, 0)


@pytest.mark.gpu
def test_split_real_size_gpu():
    """16k context, 256-token chunk (the last one of a 16k prompt), 32 heads, head_dim 128, fp16."""
    dtype = torch.float16
    q, kc, vc, meta = _case([256], [16384], 32, 32, 128, 16, dtype, seed=6)
    scale = 128 ** -0.5
    base = _run(q, kc, vc, meta, scale, phi=0.0, window=safe_window(dtype))
    # float64 reference on a slice of heads (the full one is 16k x 16k x 32 doubles)
    for splits in (2, 4, 8, 16):
        stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        out = _run(q, kc, vc, meta, scale, phi=0.0, window=safe_window(dtype), num_splits=splits, stats=stats)
        assert rel_err(out, base) < TOL[dtype]
        assert int(stats[0]) == 256 * 32
    sync = _run(q, kc, vc, meta, scale, phi=None, num_splits=8)
    assert rel_err(sync, base) < TOL[dtype]
    ref = reference(q[:, :2].contiguous(), kc[:, :, :2].contiguous(), vc[:, :, :2].contiguous(), meta, scale)
    assert rel_err(out[:, :2], ref) < TOL[dtype]


def test_prefill_splits_env_and_cpu_default(monkeypatch):
    from fdpp.ops.attention import prefill_splits

    q, kc, vc, meta = _case([2], [4], 2, 2, 16, 8, torch.float16)
    monkeypatch.delenv("FDPP_PREFILL_SPLITS", raising=False)
    assert prefill_splits(q.cpu(), kc, meta) == 1  # off the GPU: no split unless forced
    monkeypatch.setenv("FDPP_PREFILL_SPLITS", "3")
    assert prefill_splits(q, kc, meta) == 3
    for bad in ("0", "four"):
        monkeypatch.setenv("FDPP_PREFILL_SPLITS", bad)
        with pytest.raises(ValueError, match="FDPP_PREFILL_SPLITS"):
            prefill_splits(q, kc, meta)
