"""The stored quantization reports are what their JSON says: bench_quant's targets are recomputed from its
rows and its markdown re-rendered from the JSON; the perplexity report's targets from its perplexities."""
from __future__ import annotations

import json
import pathlib

from tests.helpers import load_bench

ROOT = pathlib.Path(__file__).resolve().parents[2]
H200 = ROOT / "bench/results/quant_NVIDIA_H200_2026-12-03_quick"


def _bench_quant():
    return load_bench("bench_quant")  # bench_quant imports bench_gemm's copy-bandwidth probe


def test_h200_quant_report_matches_its_json():
    bq = _bench_quant()
    result = json.loads(H200.with_suffix(".json").read_text())
    assert result["gpu"] == "NVIDIA H200" and result["torch"] and result["triton"]
    assert all(set(t) == {"name", "value", "goal", "met"} and t["name"].startswith("quant.") for t in result["targets"])
    assert bq.compute_targets(result) == result["targets"]
    # the stored markdown starts with the rendering of the JSON (notes may follow)
    assert H200.with_suffix(".md").read_text().startswith(bq.render_markdown(result))


def test_perplexity_report_targets_match_its_rows():
    from fdpp.quant.perplexity import markdown, targets

    path = ROOT / "bench/results/quant_perplexity_cpu_smollm2"
    result = json.loads(path.with_suffix(".json").read_text())
    assert targets(result["results"]) == result["targets"]
    assert {t["name"] for t in result["targets"]} == {"quant.perplexity.fp8", "quant.perplexity.int8",
                                                      "quant.perplexity.int4"}
    assert path.with_suffix(".md").read_text().startswith(markdown(result["results"], result["model"]))
