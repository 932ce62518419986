"""The heuristic dataflow: shapes, the table builder with a deterministic fake timer, save/load, the
O(1) dispatcher and the linear op under every backend (Triton paths in the CPU interpreter)."""
import json
import math

import pytest
import torch

from fdpp.dataflow import shapes as shapes_mod
from fdpp.dataflow.table import (
    DispatchTable,
    MRange,
    ShapeEntry,
    choose_impl,
    gpu_slug,
    load_table_for_gpu,
    rule_choice,
    use_dispatch_table,
)
from fdpp.dataflow.tuner import (
    build_table,
    candidate_configs,
    default_m_grid,
    ranges_from_choices,
    tune_shape,
)
from fdpp.ops.backend import use_backends
from fdpp.ops.linear import linear

CPU = torch.device("cpu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fake_timer(impl, config, n, k, m, dtype):
    """Deterministic times: gemv wins for M <= 2, flat for 3..44, cuBLAS from 45 (at the best configs).
    Configs with a larger BLOCK_N are faster, so the tuner must also pick the config."""
    base = {"gemv": 10.0 + 5.0 * m, "flat": 20.0 + 0.5 * m, "cublas": 40.0 + 0.05 * m}[impl]
    if config is not None:
        base += 1.0 / config["BLOCK_N"] + 0.01 * config.get("SPLIT_K", 1)
    return base * (n * k) / (4096 * 4096)


def test_linear_shapes_llama_like_and_opt():
    from fdpp.config import ModelConfig

    llama = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128)
    assert shapes_mod.linear_shapes(llama) == shapes_mod.PRESET_SHAPES["llama-3-8b"]
    opt = ModelConfig(architecture="OPTForCausalLM", model_type="opt", vocab_size=50272, hidden_size=4096,
                      intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128)
    assert shapes_mod.linear_shapes(opt) == shapes_mod.PRESET_SHAPES["opt-6.7b"]
    glm = shapes_mod.preset_shapes("THUDM/chatglm2-6b", with_lm_head=False)
    assert glm == {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
    assert shapes_mod.preset_shapes("Llama-2-7b-hf")["gate_up"] == (22016, 4096)
    with pytest.raises(KeyError, match="known presets"):
        shapes_mod.preset_shapes("gpt-5")


def test_ranges_from_choices_merges_and_rounds_up():
    ms = [1, 2, 4, 8, 16]
    ch = [("gemv", {"a": 1}), ("gemv", {"a": 1}), ("flat", None), ("flat", None), ("cublas", None)]
    r = ranges_from_choices(ms, ch)
    assert [(x.m_min, x.m_max, x.impl) for x in r] == [(1, 2, "gemv"), (3, 8, "flat"), (9, 16, "cublas")]


def test_tuner_finds_inflection_points_with_fake_timer():
    ms = default_m_grid(64)
    entry = tune_shape(4096, 4096, torch.float16, ms, fake_timer, name="o")
    # gemv < flat iff 10 + 5m < 20 + 0.5m  <=>  m <= 2; flat < cuBLAS iff m <= 44. The grid point 48 is
    # the first won by cuBLAS and covers (32, 48], so M2 = 33.
    assert entry.m1 == 3
    assert entry.m2 == 33
    assert entry.choose(1)[0] == "gemv" and entry.choose(2)[0] == "gemv"
    assert entry.choose(3)[0] == "flat" and entry.choose(32)[0] == "flat"
    assert entry.choose(33)[0] == "cublas" and entry.choose(10_000)[0] == "cublas"
    # The best config (largest BLOCK_N, no split) is the one kept.
    _impl, cfg = entry.choose(1)
    best = min(candidate_configs("gemv", 4096, 4096, 1), key=lambda c: fake_timer("gemv", c, 4096, 4096, 1, None))
    assert cfg == best
    assert entry.timings["m"] == ms and len(entry.timings["us"]["flat"]) == len(ms)


def test_tuner_keeps_a_winner_whose_confirmation_timings_are_declined():
    # bench_gemm's timer, past its sweep budget, answers inf for a (impl, shape, M) it has timed once:
    # the confirmation re-timings of the winner must not turn every implementation into a failure.
    seen = set()

    def budget_timer(impl, cfg, n, k, m, dt):
        key = (impl, n, k, m)
        if key in seen:
            return math.inf
        seen.add(key)
        return fake_timer(impl, cfg, n, k, m, dt)

    entry = tune_shape(4096, 4096, torch.float16, [1, 256], budget_timer, confirm=2)
    assert entry.choose(256)[0] == "cublas"
    assert math.isfinite(entry.timings["us"]["cublas"][1])


def test_build_table_save_load_roundtrip(tmp_path):
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "o_again": (4096, 4096)}
    table = build_table(shapes, torch.float16, default_m_grid(128, quick=True), fake_timer,
                        gpu_name="Fake GPU 80GB", show_progress=False)
    assert len(table.entries) == 2  # duplicate shapes are tuned once
    assert table.get(torch.float16, 4096, 4096).name == "o,o_again"
    path = table.save(tmp_path / "t.json")
    loaded = DispatchTable.load(path)
    assert loaded.gpu == "Fake GPU 80GB"
    assert json.loads(path.read_text())["format"] == "fdpp-dataflow/1"
    for key, e in table.entries.items():
        le = loaded.entries[key]
        assert [r.to_dict() for r in le.ranges] == [r.to_dict() for r in e.ranges]
        for m in (1, 2, 3, 7, 33, 64, 100, 128, 999):
            assert le.choose(m) == e.choose(m)
    assert loaded.lookup(torch.float16, 4096, 4096, 1)[0] == "gemv"
    assert loaded.lookup(torch.bfloat16, 4096, 4096, 1) is None  # other dtype: no entry


def test_table_files_found_by_gpu_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FDPP_CACHE_DIR", str(tmp_path))
    e = ShapeEntry("float16", 64, 32, [MRange(1, 8, "flat", {"BLOCK_N": 16})])
    DispatchTable("Fake GPU", [e]).save(tmp_path / "dataflow" / f"{gpu_slug('Fake GPU')}.json")
    t = load_table_for_gpu("Fake GPU")
    assert t is not None and t.lookup("float16", 64, 32, 5) == ("flat", {"BLOCK_N": 16})
    assert load_table_for_gpu("Other GPU") is None
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_bad_tables_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="without gaps"):
        ShapeEntry("float16", 8, 8, [MRange(1, 4, "gemv"), MRange(6, 9, "flat")])
    with pytest.raises(ValueError, match="unknown impl"):
        ShapeEntry("float16", 8, 8, [MRange(1, 4, "magic")])
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="fdpp tune"):
        DispatchTable.load(p)
    with pytest.raises(FileNotFoundError, match="fdpp tune"):
        DispatchTable.load(tmp_path / "missing.json")


def test_dispatch_without_table_uses_rule():
    with use_dispatch_table(None):
        for m in (1, 4, 5, 64, 65, 512):
            assert choose_impl(CPU, torch.float16, 4096, 4096, m) == rule_choice(m)
    assert rule_choice(1)[0] == "gemv" and rule_choice(32)[0] == "flat" and rule_choice(100)[0] == "cublas"


def test_dispatch_lookup_is_cheap():
    e = ShapeEntry("float16", 4096, 4096, [MRange(1, 2, "gemv"), MRange(3, 64, "flat"), MRange(65, 512, "cublas")])
    table = DispatchTable("Fake", [e])
    import time

    with use_dispatch_table(table):
        t0 = time.perf_counter()
        for _ in range(20000):
            choose_impl(CPU, torch.float16, 4096, 4096, 33)
        per_call = (time.perf_counter() - t0) / 20000
    assert per_call < 20e-6  # a few dict lookups, no device work
    with use_dispatch_table(table):
        assert choose_impl(CPU, torch.float16, 4096, 4096, 2) == ("gemv", None)
        assert choose_impl(CPU, torch.float16, 4096, 4096, 700) == ("cublas", None)
        assert choose_impl(CPU, torch.float16, 1000, 4096, 2) == rule_choice(2)  # unknown shape


@pytest.mark.parametrize("backend", ["reference", "cublas", "gemv", "flat", "table"])
def test_linear_op_backends(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=g).to(torch.float16)  # leading dims flatten to M = 6
    w = (torch.randn(2 * 18, 40, generator=g) / 40**0.5).to(torch.float16)
    b = torch.randn(36, generator=g).to(torch.float16)
    r = torch.randn(2, 3, 18, generator=g).to(torch.float16)
    x, w, b, r = (t.to(DEVICE) for t in (x, w, b, r))
    table = DispatchTable("Fake", [ShapeEntry("float16", 36, 40, [
        MRange(1, 4, "gemv", {"BLOCK_N": 8, "BLOCK_K": 16}),
        MRange(5, 8, "flat", {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}),
        MRange(9, 512, "cublas"),
    ])])
    with use_backends(linear=backend), use_dispatch_table(table):
        y = linear(x, w, b, residual=r, act="silu_and_mul")
        y_plain = linear(x[0, :1], w)
    # NOTE: written out in float64 here, not fdpp's linear_reference: the "reference" and "cublas"
    # backends *are* linear_reference, which must not be its own yardstick.
    xd, wd, bd, rd = (t.double().cpu() for t in (x, w, b, r))
    fused = xd @ wd.T + bd  # [2, 3, 36]: [gate; up]
    gate, up = fused[..., :18], fused[..., 18:]
    ref = gate * torch.sigmoid(gate) * up + rd
    assert y.shape == (2, 3, 18) and y.dtype == torch.float16
    err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < 5e-3
    ref_plain = xd[0, :1] @ wd.T
    assert ((y_plain.double().cpu() - ref_plain).norm() / ref_plain.norm()).item() < 5e-3


def test_linear_op_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="do not match"):
        linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="even N"):
        linear(x, torch.randn(5, 8), act="silu_and_mul")
    with pytest.raises(ValueError, match="act="):
        linear(x, torch.randn(4, 8), act="relu")
    with pytest.raises(ValueError, match="residual"):
        linear(x, torch.randn(4, 8), residual=torch.randn(3, 5))


def test_candidate_configs_are_sane():
    for m in (1, 2, 3, 8, 16, 64):
        for c in candidate_configs("gemv", 4096, 4096, m):
            assert c["BLOCK_M"] <= 16 and c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] <= 16384
    assert candidate_configs("gemv", 4096, 4096, 65) == []
    for c in candidate_configs("flat", 4096, 4096, 1):
        assert c["num_stages"] >= 2 and c["BLOCK_M"] == 16
    assert candidate_configs("cublas", 1, 1, 1) == [None]
    assert all(math.log2(c["SPLIT_K"]).is_integer() for c in candidate_configs("flat", 4096, 4096, 1))


def test_quick_candidates_keep_every_gemv_tile_at_m1():
    """--quick (and bench_gemm.py's extra-dtype pass) keeps all GEMV tiles at M = 1: the 2026-11-26 H200
    table's bf16 pass tried 2 of 7 and missed (4, 512, 2), the fp16 winner of 10 of 15 shapes."""
    def tiles(m, quick):
        return {(c["BLOCK_N"], c["BLOCK_K"], c["num_warps"]) for c in candidate_configs("gemv", 4096, 4096, m,
                                                                                       quick=quick)}
    assert tiles(1, True) == tiles(1, False) and (4, 512, 2) in tiles(1, True)
    assert len(tiles(2, True)) < len(tiles(2, False))


def test_tune_cli_parser():
    import argparse

    from fdpp.cli import tune

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    tune.add_parser(sub)
    args = parser.parse_args(["tune", "--model", "opt-6.7b", "--dtype", "bfloat16", "--max-m", "64", "--quick"])
    assert args.model == "opt-6.7b" and args.max_m == 64 and args.quick and args.func is tune.run
    assert tune.resolve_shapes("opt-6.7b", with_lm_head=False)["fc1"] == (16384, 4096)
    for action in sub.choices["tune"]._actions:
        assert action.help, f"flag {action.option_strings} has no help text"
    if not torch.cuda.is_available():
        assert tune.run(args) == 2  # explains that a GPU is needed
