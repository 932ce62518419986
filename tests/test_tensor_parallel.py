"""Tensor parallelism on the CPU with gloo: every family at TP 2 (two "nodes" through torchrun's
rendezvous on localhost) and TP 4 (one torchrun node) equals TP 1; fdpp-spawned ranks; a killed rank ends
the engine with a clear error; the set-up errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.tp_models import FAMILIES, NUM_TOKENS, greedy_and_logits, write_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (checkpoint folder, TP=1 logits, TP=1 greedy tokens)}."""
    base = tmp_path_factory.mktemp("tp-models")
    out = {}
    for name in FAMILIES:
        path = write_family(name, str(base / name))
        ref = greedy_and_logits(path)
        out[name] = (path, ref["logits"], ref["tokens"])
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _free_port() -> int:
    from fdpp.distributed.launch import free_port

    return free_port()


def _torchrun(nnodes: int, node_rank: int, nproc: int, port: int, out: str, models: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
           f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=0",
           os.path.join(ROOT, "tests", "tp_script.py"), "--out", out, *models]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_every_family_tp2_two_nodes_and_tp4_match_tp1(checkpoints, tmp_path):
    names = list(checkpoints)
    models = [checkpoints[n][0] for n in names]
    out2, out4 = str(tmp_path / "tp2.json"), str(tmp_path / "tp4.json")
    p2, p4 = _free_port(), _free_port()
    procs = [_torchrun(2, 0, 1, p2, out2, models), _torchrun(2, 1, 1, p2, out2, models),  # two "nodes"
             _torchrun(1, 0, 4, p4, out4, models)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    for tp, out in ((2, out2), (4, out4)):
        results = json.load(open(out))["results"]
        for name in names:
            path, ref_logits, ref_tokens = checkpoints[name]
            got = results[path]
            err = _rel_err(torch.tensor(got["logits"]), ref_logits)
            assert err <= REL_TOL, f"{name} TP={tp}: logits differ from TP=1 by {err:.2e} (relative)"
            assert got["tokens"] == ref_tokens, f"{name} TP={tp}: greedy tokens {got['tokens']} != {ref_tokens}"
            assert len(ref_tokens) == NUM_TOKENS


def test_spawned_ranks_match_tp1_and_a_killed_rank_fails_clearly(checkpoints):
    from fdpp import LLM, SamplingParams
    from fdpp.distributed.launch import TensorParallelError

    path, ref_logits, ref_tokens = checkpoints["qwen2"]  # QKV bias, tied embeddings
    torch.set_num_threads(1)
    llm = LLM(path, dtype="float32", device="cpu", show_progress=False, calibration="off", num_blocks=32,
              block_size=4, tensor_parallel_size=2)
    try:
        from tests.tp_models import PROMPT

        assert _rel_err(llm.engine.prompt_logits(PROMPT), ref_logits) <= REL_TOL
        out = llm.generate([PROMPT], SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].token_ids == ref_tokens
        # rank 0's runner attributes through the proxy: its KV cache holds its half of the KV heads
        assert llm.engine.runner.config.num_key_value_heads == 1
        assert llm.engine.stats()["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 4
        (pid,) = llm.engine.executor.worker_pids()
        killer = threading.Timer(0.2, os.kill, (pid, signal.SIGKILL))  # mid-run: while steps are running
        start = time.monotonic()
        killer.start()
        with pytest.raises(TensorParallelError, match=r"rank 1 .*(exited|responding)"):
            while time.monotonic() - start < 30:
                llm.generate([PROMPT] * 4, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 30
        with pytest.raises(TensorParallelError, match="restart"):  # and stays failed, without hanging
            llm.engine.prompt_logits(PROMPT)
    finally:
        llm.close()


def test_tp1_runs_the_runner_in_process(checkpoints):
    from fdpp import LLM
    from fdpp.engine.executor import UniProcExecutor
    from fdpp.engine.model_runner import ModelRunner

    llm = LLM(checkpoints["llama"][0], dtype="float32", device="cpu", show_progress=False, calibration="off",
              num_blocks=8, block_size=4)
    try:
        assert isinstance(llm.engine.executor, UniProcExecutor)
        assert type(llm.engine.runner) is ModelRunner  # no proxy between the engine and the runner at TP=1
    finally:
        llm.close()


def test_a_rank_failing_at_set_up_names_itself_and_its_error():
    """A preset registered in this process only: the spawned rank 1 cannot find it and exits; the engine
    reports which rank and why, instead of waiting for it."""
    from fdpp import LLM
    from fdpp.distributed.launch import TensorParallelError
    from fdpp.models.presets import PRESETS, register_preset

    register_preset("tp-test-only-here", dict(FAMILIES["llama"]))
    start = time.monotonic()
    try:
        with pytest.raises(TensorParallelError, match=r"rank 1 .*load_model raised ModelLoadError"):
            LLM("tp-test-only-here", dtype="float32", device="cpu", show_progress=False, calibration="off",
                num_blocks=8, block_size=4, tensor_parallel_size=2)
    finally:
        PRESETS.pop("tp-test-only-here")
    assert time.monotonic() - start < 30


def test_heads_and_devices_are_checked(monkeypatch):
    from fdpp.distributed.launch import rank_device
    from fdpp.distributed.state import check_heads, kv_heads_per_rank
    from fdpp.errors import FdppError, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="does not divide the 4 attention heads"):
        check_heads(4, 2, 3)
    with pytest.raises(UnsupportedModelError, match="KV heads"):
        check_heads(12, 3, 2)
    check_heads(8, 2, 4)
    check_heads(8, 1, 8)  # MQA: the KV head is replicated
    assert kv_heads_per_rank(8, 4) == (2, 1) and kv_heads_per_rank(2, 8) == (1, 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(FdppError, match="only 2 GPU"):
        rank_device(torch.device("cuda"), 3, 4)


def test_bad_tensor_parallel_size():
    from fdpp.config import EngineConfig
    from fdpp.engine.executor import create_executor
    from fdpp.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
        create_executor(EngineConfig(tensor_parallel_size=0), torch.device("cpu"))


def test_rank_shapes_are_the_shards_weights():
    """What `fdpp tune -tp N` profiles is what each rank's layers hold (their table lookups)."""
    from fdpp.config import ModelConfig
    from fdpp.distributed.shapes import rank_linear_shapes
    from fdpp.distributed.state import TPGroup, tp_context
    from fdpp.models.registry import get_model_class

    mc = ModelConfig.from_hf_dict(FAMILIES["llama"])
    for tp in (2, 4):
        with tp_context(TPGroup(rank=1, size=tp)), torch.device("meta"):
            model = get_model_class(mc)(mc)
        layer = model.model.layers[0]
        got = {"qkv": layer.self_attn.qkv_proj.weight.shape, "o": layer.self_attn.o_proj.weight.shape,
               "gate_up": layer.mlp.gate_up_proj.weight.shape, "down": layer.mlp.down_proj.weight.shape,
               "lm_head": model.lm_head.weight.shape}
        assert {k: tuple(v) for k, v in got.items()} == rank_linear_shapes(mc, tp)


@pytest.mark.gpu
def test_gpu_tp2_with_cuda_graphs_matches_tp1(checkpoints):
    """NCCL all-reduces inside the captured decode graphs: greedy tokens equal TP=1's (needs 2 GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from fdpp import LLM, SamplingParams
    from tests.tp_models import PROMPT

    path = checkpoints["llama"][0]
    outs, logits = [], []
    for tp in (1, 2):
        llm = LLM(path, dtype="float16", device="cuda", show_progress=False, calibration="off", num_blocks=32,
                  block_size=16, max_num_seqs=4, tensor_parallel_size=tp)
        try:
            assert llm.engine.runner.graphs, "decode graphs were not captured"
            logits.append(llm.engine.prompt_logits(PROMPT).cpu())
            outs.append(llm.generate([PROMPT], SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True),
                                     use_tqdm=False)[0].outputs[0].token_ids)
        finally:
            llm.close()
    assert _rel_err(logits[1], logits[0]) <= 2e-3
    assert outs[1] == outs[0]


def test_quantized_weights_are_refused_at_tp_above_1():
    from fdpp.config import ModelConfig
    from fdpp.distributed.layers import QKVParallelLinear, RowParallelLinear
    from fdpp.distributed.state import TPGroup, tp_context
    from fdpp.models.loader import build_model

    tp = TPGroup(rank=0, size=2)
    qkv = QKVParallelLinear(8, 4, 2, 2, False, tp)
    qkv.weight.quant_mode = "int8"
    with pytest.raises(NotImplementedError, match="quantized weights cannot be sharded"):
        qkv.weight.weight_loader(qkv.weight, torch.zeros(16, 8), "q_proj.weight", "q")
    row = RowParallelLinear(8, 4, False, tp)
    row.weight.quant_mode = "int8"
    with pytest.raises(NotImplementedError, match="quantization='none'"):
        row.weight.weight_loader(row.weight, torch.zeros(4, 8), "o_proj.weight")

    class Plan:
        is_quantized = True

    with tp_context(tp), pytest.raises(NotImplementedError, match="tensor_parallel_size=1"):
        build_model(ModelConfig.from_hf_dict(FAMILIES["llama"]), torch.float32, torch.device("cpu"), None, quant=Plan())
