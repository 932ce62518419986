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
