"""The heuristic dataflow keyed by weight format: tuner entries per format (fake timer), table round trip,
dispatch of a quantized weight through its own entry with a rule fallback, ``fdpp tune --weight-format``."""
from __future__ import annotations

import argparse

import pytest
import torch

from fdpp.dataflow.table import (
    DispatchTable,
    MRange,
    ShapeEntry,
    choose_impl,
    rule_choice,
    use_dispatch_table,
)
from fdpp.dataflow.tuner import build_table, quant_candidate_configs, tunable_shapes
from fdpp.kernels.quant_gemv import sub_block
from fdpp.ops.backend import use_backends
from fdpp.ops.linear import linear
from fdpp.quant.formats import FORMATS, dequantize, quantize

CPU = torch.device("cpu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fake_quant_timer(impl, config, n, k, m, dtype):
    """gemv wins at M <= 3, flat to 100, then cublas; larger BLOCK_N configs are faster."""
    base = {"gemv": 4.0 * m, "flat": 10.0 + 0.1 * m, "cublas": 15.0 + 0.05 * m}[impl]
    return base + (0.0 if config is None else 1.0 / config["BLOCK_N"])


def test_tuner_writes_entries_keyed_by_weight_format(tmp_path):
    shapes = {"qkv": (384, 256), "down": (256, 512)}
    ms = [1, 2, 4, 64, 128, 256]

    def candidates(impl, n, k, m):
        return quant_candidate_configs(impl, n, k, m, "q4_k", num_sms=8, quick=True)

    table = build_table(shapes, torch.float16, ms, _fake_quant_timer, gpu_name="Fake", candidates=candidates,
                        show_progress=False, weight_format="q4_k")
    table.add(ShapeEntry("float16", 384, 256, [MRange(1, 512, "cublas")]))  # a dense entry of the same shape
    path = table.save(tmp_path / "fake.json")
    loaded = DispatchTable.load(path)
    entry = loaded.get("float16", 384, 256, "q4_k")
    impls = [r.impl for r in entry.ranges]
    assert entry.weight_format == "q4_k" and sorted(set(impls), key=impls.index) == ["gemv", "flat", "cublas"]
    assert entry.choose(2)[0] == "gemv" and entry.choose(64)[0] == "flat" and entry.choose(256)[0] == "cublas"
    assert entry.ranges[0].config["BLOCK_N"] == 8  # the faster of the quick configs was kept
    assert loaded.get("float16", 384, 256).ranges[0].impl == "cublas"  # dense and q4_k entries coexist
    with use_dispatch_table(loaded):
        assert choose_impl(CPU, torch.float16, 384, 256, 1, "q4_k")[0] == "gemv"
        assert choose_impl(CPU, torch.float16, 384, 256, 1)[0] == "cublas"
        # no entry for this format / shape: the rule (flat up to M = 128 for packed weights)
        assert choose_impl(CPU, torch.float16, 384, 256, 100, "int4") == rule_choice(100, "int4") == ("flat", None)
        assert choose_impl(CPU, torch.float16, 999, 256, 200, "q4_k") == ("cublas", None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_candidates_fit_the_format(fmt):
    for impl in ("gemv", "flat"):
        for m in (1, 16):
            cfgs = quant_candidate_configs(impl, 4096, 4096, m, fmt, group_size=64)
            assert cfgs and all(c["BLOCK_K"] % sub_block(fmt, 64) == 0 for c in cfgs)
    assert quant_candidate_configs("gemv", 4096, 4096, 100, fmt) == []
    assert quant_candidate_configs("cublas", 4096, 4096, 100, fmt) == [None]
    assert tunable_shapes({"qkv": (1728, 576), "down": (576, 1536)}, fmt) == (
        {"down": (576, 1536)} if fmt in ("q4_k", "q5_k", "q6_k") else {"qkv": (1728, 576), "down": (576, 1536)})


def test_table_backend_runs_a_quantized_weight_through_its_entry():
    """The op looks up (dtype, N, K, format): a q8_0 entry sends M = 3 to the flat GEMM (interpreted)."""
    g = torch.Generator().manual_seed(0)
    qt = quantize(torch.randn(40, 64, generator=g) * 0.1, "q8_0").to(DEVICE)
    x = torch.randn(3, 64, generator=g).to(DEVICE)
    table = DispatchTable(DEVICE, [ShapeEntry("float32", 40, 64, [MRange(1, 512, "flat", {"BLOCK_N": 16})],
                                              weight_format="q8_0")])
    with use_dispatch_table(table), use_backends(linear="table"):
        y = linear(x, qt)
    torch.testing.assert_close(y.double(), x.double() @ dequantize(qt).double().t(), rtol=1e-5, atol=1e-5)


def test_tune_cli_weight_format_flag():
    from fdpp.cli import tune

    parser = argparse.ArgumentParser()
    tune.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["tune", "--weight-format", "int4", "--group-size", "64", "--quick"])
    assert args.weight_format == "int4" and args.group_size == 64
    bad = parser.parse_args(["tune", "--weight-format", "iq2_xs"])
    if not torch.cuda.is_available():
        assert tune.run(args) == 2  # no GPU: explained, exit 2
    assert tune.run(bad) == 2


@pytest.mark.gpu
def test_graph_timer_times_packed_weights_on_gpu():
    from fdpp.dataflow.tuner import GraphTimer

    timer = GraphTimer("cuda", weight_format="int4", rotate_bytes=50e6, replays=3)
    for impl, cfg in (("gemv", None), ("flat", None), ("cublas", None)):
        t = timer(impl, cfg, 4096, 4096, 1 if impl == "gemv" else 32, torch.float16)
        assert 0 < t < 1e4, (impl, t)
