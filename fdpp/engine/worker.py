"""One tensor-parallel rank: its group, its shard of the model, its KV cache size, runner and CUDA graphs.

Rank 0's worker lives in the engine's process; the others run ``fdpp.distributed.launch.worker_loop``,
which calls the same methods with the arguments rank 0 broadcasts (``fdpp.engine.executor``). Methods a
worker lacks are its model runner's (``execute``, ``release``, ``capture_cuda_graphs``, ...).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from fdpp.config import EngineConfig
from fdpp.distributed.state import TPGroup, rank_model_config, tp_context


class Worker:
    """Owns one rank's model shard and ``ModelRunner``."""

    def __init__(self, config: EngineConfig, tp: TPGroup, device: torch.device) -> None:
        self.engine_config = config  # (not "config": that is the runner's ModelConfig, read through the proxy)
        self.tp = tp
        self.device = device
        self.runner: Any = None
        self.loaded: Any = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # this rank's op implementations, from the config; its runner enters them around every forward
        from fdpp.ops.backend import Backends

        self.backends = Backends.resolve(config, device)
        torch.manual_seed(config.seed)

    def load_model(self) -> Any:
        """Build this rank's shard (weights streamed in, or random weights drawn whole and sliced)."""
        from fdpp.models.loading import load_model

        with tp_context(self.tp):
            self.loaded = load_model(self.engine_config, self.device)
        return self.loaded

    def determine_num_blocks(self, block_size: int, max_num_batched_tokens: int, max_model_len: int) -> int:
        """KV blocks this rank can hold (memory left after weights and the largest step's activations), the
        minimum over all ranks: every rank's cache has the same number of blocks."""
        import torch.distributed as dist

        from fdpp.engine.llm_engine import _CPU_KV_BUDGET
        from fdpp.engine.model_runner import num_blocks_for_budget, profile_activation_bytes

        cc = self.engine_config.cache
        mc = rank_model_config(self.loaded.model_config, self.tp.size)
        if cc.num_blocks is not None:
            n = cc.num_blocks
        else:
            budget = cc.memory_budget_bytes
            if budget is None:
                if self.device.type == "cuda":
                    free, total = torch.cuda.mem_get_info(self.device)
                    peak = profile_activation_bytes(
                        self.loaded.model, mc, self.loaded.dtype, self.device, block_size, max_num_batched_tokens, max_model_len,
                        backends=self.backends)
                    budget = int(total * cc.gpu_memory_utilization - (total - free) - peak)
                else:
                    budget = _CPU_KV_BUDGET
            n = num_blocks_for_budget(mc, self.loaded.dtype, block_size, budget, max_model_len)
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.cpu_group)
        return int(t.item())

    def init_runner(self, block_size: int, num_blocks: int, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
        """This rank's ModelRunner: its KV cache holds its KV heads only."""
        from fdpp.engine.model_runner import ModelRunner

        lm = self.loaded
        self.runner = ModelRunner(lm.model, rank_model_config(lm.model_config, self.tp.size), lm.dtype,
                                  self.device, block_size, num_blocks, max_model_len, eos_token_ids,
                                  backends=self.backends)

    def set_phi(self, result: Any) -> None:
        """The unified max values of rank 0's calibration, on this rank's attention layers."""
        from fdpp.engine.loading import set_phi

        set_phi(self.loaded.model, result)

    def time_all_reduce(self, numel: int, dtype: str = "float16", iters: int = 64) -> float:
        """Microseconds of one all-reduce of ``numel`` elements on the forward pass's group, as a decode step
        issues it (CUDA-graph captured on GPUs; eager on the CPU). Benchmarks (bench/bench_tp.py)."""
        x = torch.ones(numel, dtype=getattr(torch, dtype), device=self.device)
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(iters):
                self.tp.all_reduce(x)
            return (time.perf_counter() - t0) / iters * 1e6
        for _ in range(3):
            self.tp.all_reduce(x)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                self.tp.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (5 * iters)

    def __getattr__(self, name: str) -> Any:
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(f"Worker has no attribute {name!r} (and no model runner yet)")
        return getattr(runner, name)
