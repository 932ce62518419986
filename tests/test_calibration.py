"""Unified-max calibration: phi selection, per-model vs per-layer decision, synchronized verdict, cache."""
import pytest
import torch

from fdpp import calibration
from fdpp.calibration import CalibrationResult, calibrate, load_or_none, make_model_key
from fdpp.ops.attention import AttentionMetadata, attention, safe_window, store_kv

HEAD_DIM = 16


def toy_model(offsets, spreads, num_heads=2, seed=0):
    """A stack of attention layers whose scores are ~ offset + spread * N(0, 1).

    Every key carries +1 along a shared direction and every query +offset along it, so all of a layer's
    scores shift by `offset`; the remaining dimensions add noise of scale `spread`.
    """
    gen = torch.Generator().manual_seed(seed)

    def run(token_ids):
        n = len(token_ids)
        block_size = 8
        num_blocks = -(-n // block_size)
        meta = AttentionMetadata(
            is_prefill=True, context_lens=torch.tensor([n], dtype=torch.int32),
            block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
            slot_mapping=torch.arange(n), cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen_q=n, max_context_len=n)
        scale = 1.0  # scores are q.k directly
        for layer, (offset, spread) in enumerate(zip(offsets, spreads)):
            q = torch.randn(n, num_heads, HEAD_DIM, generator=gen) * (spread / HEAD_DIM ** 0.5) ** 0.5
            k = torch.randn(n, 1, HEAD_DIM, generator=gen) * (spread / HEAD_DIM ** 0.5) ** 0.5
            q[..., 0] = offset
            k[..., 0] = 1.0
            kc = torch.zeros(num_blocks, block_size, 1, HEAD_DIM)
            vc = torch.zeros_like(kc)
            store_kv(k, k, kc, vc, meta.slot_mapping)
            attention(q, kc, vc, meta, scale=scale, layer_idx=layer)
    return run


TOKENS = [list(range(40)), list(range(25))]


def test_calibrate_well_behaved_model_uses_one_phi(tmp_path, monkeypatch):
    monkeypatch.setenv("FDPP_CACHE_DIR", str(tmp_path))
    key = make_model_key("org/toy-model", {"layers": 3}, torch.float16)
    res = calibrate(toy_model([2.0, 2.5, 1.5], [1.0, 1.0, 1.0]), num_layers=3, dtype=torch.float16,
                    model_key=key, texts=TOKENS)
    assert res.mode == "unified" and res.use_model_phi
    assert res.predicted_fallback_rate < 0.01
    lo, hi = safe_window(torch.float16)
    for layer in res.layers:  # the chosen phi keeps the typical row max well inside the window
        assert lo < layer["rowmax_q50"] - res.model_phi < hi
    assert res.phi_for_layer(1) == res.model_phi
    assert res.num_tokens == 65
    loaded = load_or_none(key)
    assert loaded is not None and loaded == res
    assert str(tmp_path) in calibration.cache_path(key)


def test_calibrate_layers_far_apart_get_their_own_phi(tmp_path):
    # fp16 window is ~18 nats wide: layers with row maxima near -30 and +40 cannot share one phi.
    res = calibrate(toy_model([-30.0, 40.0], [1.0, 1.0]), num_layers=2, dtype=torch.float16, model_key="far",
                    texts=TOKENS, path=str(tmp_path / "far.json"))
    assert res.mode == "unified" and not res.use_model_phi
    assert res.phi_for_layer(0) < -20 < 30 < res.phi_for_layer(1)
    assert CalibrationResult.load(str(tmp_path / "far.json")) == res


def test_calibrate_wide_range_model_goes_synchronized(tmp_path):
    # OPT-like: scores spread over hundreds of nats in one layer.
    res = calibrate(toy_model([0.0], [300.0]), num_layers=1, dtype=torch.float16, model_key="wide",
                    texts=TOKENS, save=False)
    assert res.mode == "synchronized"
    assert res.phi_for_layer(0) is None
    assert res.score_range[1] - res.score_range[0] > 200
    assert "synchronized" in res.summary()


def test_calibrate_bf16_window_is_wide():
    res = calibrate(toy_model([-30.0, 40.0], [1.0, 1.0]), num_layers=2, dtype=torch.bfloat16, model_key="b",
                    texts=TOKENS, save=False)
    assert res.mode == "unified" and res.use_model_phi  # one phi covers both within +-50


def test_calibrate_needs_tokenizer_for_text():
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(toy_model([0.0], [1.0]), num_layers=1, dtype=torch.float16, model_key="x", save=False)

    class CharTokenizer:
        def encode(self, text):
            return [ord(c) % 100 for c in text[:60]]
    res = calibrate(toy_model([0.0], [1.0]), num_layers=1, dtype=torch.float16, model_key="x", save=False,
                    tokenizer=CharTokenizer())
    assert res.num_tokens == 60 * len(calibration.BUILTIN_TEXTS)


def test_load_or_none_missing_and_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("FDPP_CACHE_DIR", str(tmp_path))
    assert load_or_none("nothing-here") is None
    path = calibration.cache_path("stale")
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('{"version": -1}')
    assert load_or_none("stale") is None
