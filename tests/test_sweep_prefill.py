"""bench/sweep_prefill.py's targets and report from synthetic rows (no kernel runs)."""
import pytest

from tests.helpers import load_bench


@pytest.fixture(scope="module")
def sweep():
    return load_bench("sweep_prefill")


def _row(seq, us, kv=32):
    return dict(dtype="float16", batch=16384 // seq, seq_len=seq, num_heads=32, num_kv_heads=kv, us=us,
                tflops={k: 1.0 for k in us}, err={}, flagged={}, status={k: "ok" for k in us})


def test_targets_pick_the_best_single_shippable_variant(sweep):
    a, b = "tma_128x128_w8_s2", "tma_128x64_w8_s3"
    rows = [
        _row(1024, {a: 100.0, b: 95.0, a + "_sync": 110.0, b + "_sync": 100.0, "cudnn": 90.0, "flash": 150.0,
                    "paged_unified": 160.0, "tma_128x128_w8_s2_nofb": 98.0,
                    "tma_128x128_w8_s2_massoff_nofb": 50.0}),  # not shippable: must not win
        _row(16384, {a: 1000.0, b: 1200.0, a + "_sync": 1100.0, b + "_sync": 1250.0, "cudnn": 1050.0,
                     "flash": 1500.0, "paged_unified": 1700.0, "tma_128x128_w8_s2_nofb": 990.0,
                     "tma_128x128_w8_s2_massoff_nofb": 500.0}, kv=8),
    ]
    out, summary = sweep.targets(rows)
    t = {x["name"]: x for x in out}
    assert set(summary) == {a, b}  # variants without a time at every point are not ranked
    assert t["attention.prefill_vs_cudnn_min"]["variant"] == a  # min(0.90, 1.05) beats min(0.947, 0.875)
    assert t["attention.prefill_vs_cudnn_min"]["value"] == pytest.approx(0.9)
    assert t["attention.prefill_vs_cudnn_min"]["met"] is True
    assert t["attention.prefill_vs_cudnn_min_8k_plus"]["value"] == pytest.approx(1.05)
    assert t["attention.prefill_unified_vs_sync_min"]["value"] == pytest.approx(1.1)
    assert t["attention.prefill_unified_vs_sync_min"]["met"] is True
    assert t["attention.prefill_fallback_launch_cost_max"]["value"] == pytest.approx(0.02)
    assert all(set(x) >= {"name", "value", "goal", "met"} for x in out)
    md = sweep.markdown(dict(gpu="X", date="d", command="c", torch="t", triton="3.6", wall_s=1.0,
                             skipped_points=[], rows=rows, targets=out, summary=summary))
    assert "| attention.prefill_vs_cudnn_min | 0.900 |" in md


def test_no_full_coverage_is_a_missed_target(sweep):
    out, summary = sweep.targets([_row(1024, {"tma_128x128_w8_s2": 1.0})])  # no cuDNN time
    assert summary == {} and out[0]["met"] is False
