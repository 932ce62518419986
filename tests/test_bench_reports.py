"""The stored benchmark reports are what their JSON says: targets are recomputed from the rows and the
Markdown is re-rendered from the JSON (bench/bench_gemm.py --render), so a report cannot drift from its data."""
import json
import pathlib

import pytest

from tests.helpers import load_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_gemm():
    return load_bench("bench_gemm")


def test_gemm_h200_report_matches_its_json(bench_gemm):
    from fdpp.dataflow.table import load_table_for_gpu

    result = json.loads((ROOT / "bench/results/gemm_h200.json").read_text())
    targets = result["targets"]
    assert all(set(t) == {"name", "value", "goal", "met"} and t["name"].startswith("gemm.") for t in targets)
    recomputed, _ = bench_gemm.compute_targets(result)
    assert [(t["name"], t["met"]) for t in recomputed] == [(t["name"], t["met"]) for t in targets]
    # judged against the eager copy bandwidth, not the graph-captured copy that understated it
    assert result["copy_tbps"] >= 4.2 and result["copy_tbps_measured"] < 3.0
    md = bench_gemm.render_markdown(result, load_table_for_gpu(result["gpu"]))
    assert md == (ROOT / "bench/results/gemm_h200.md").read_text()


def test_e2e_latency_targets_compare_the_prefill_graphs():
    """e2e_latency's targets read the shipped settings' rows (prefill graphs on, or rows that predate the
    flag) and add the eager-prefill TTFT ratio only where --compare-prefill-graphs measured it."""
    e2e = load_bench("e2e_latency")
    row = dict(model="llama-2-7b", dtype="float16", batch_size=1, input_len=1024, async_scheduling=True,
               fuse_norm=True, pdl=False, wall_decode_tokens_per_s=250.0, wall_ttft_ms=20.0,
               weight_bytes=13.5e9, kv_bytes_per_step=0.5e9)
    result = {"copy_bandwidth_gbs": 4200.0, "pdl_default": False,
              "fdpp": [dict(row, prefill_graphs=True), dict(row, prefill_graphs=False, wall_ttft_ms=25.0)]}
    targets = {t["name"]: t for t in e2e.compute_targets(result)}
    assert targets["e2e.llama-2-7b.b1_in1024.ttft_ms"]["value"] == 20.0
    ratio = targets["e2e.llama-2-7b.b1_in1024.ttft_eager_over_prefill_graphs"]
    assert ratio["value"] == pytest.approx(1.25) and ratio["met"]
    old = {t["name"] for t in e2e.compute_targets({**result, "fdpp": [row]})}  # a row without the flag
    assert "e2e.llama-2-7b.b1_in1024.ttft_ms" in old and not any("prefill_graphs" in n for n in old)


def test_table_override_splits_the_range_of_m():
    from fdpp.dataflow.table import DispatchTable, MRange, ShapeEntry

    mod = load_bench("table_override")
    base = DispatchTable("NVIDIA H200", [ShapeEntry("bfloat16", 6144, 4096, [MRange(1, 512, "cublas", None)])])
    cfg = {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024, "SPLIT_K": 1, "num_warps": 4}
    t = mod.override(base, "bfloat16", 6144, 4096, 1, "gemv", cfg)
    assert t.lookup("bfloat16", 6144, 4096, 1) == ("gemv", cfg)
    assert t.lookup("bfloat16", 6144, 4096, 2) == ("cublas", None) and t.lookup("bfloat16", 6144, 4096, 512)[0] == "cublas"
    mid = mod.override(base, "bfloat16", 6144, 4096, 8, "flat", {"BLOCK_M": 16})
    assert [(r.m_min, r.m_max, r.impl) for r in mid.get("bfloat16", 6144, 4096).ranges] == [
        (1, 7, "cublas"), (8, 8, "flat"), (9, 512, "cublas")]
    new = mod.override(None, "float16", 100, 64, 1, "gemv", cfg)  # no entry to start from
    assert new.lookup("float16", 100, 64, 1) == ("gemv", cfg)
