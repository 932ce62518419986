"""The engine's executor: where the model runs.

``UniProcExecutor`` (TP=1): the model and its runner live in the engine's process; the engine calls the
runner directly (no proxy, no copy: the numbers of a single device are unchanged).

``MultiprocExecutor`` (TP>1): one ``Worker`` per rank (``fdpp.engine.worker``); rank 0's is in this
process. ``runner`` is a proxy: any method called on it (``execute``, ``release``, ``capture_cuda_graphs``,
a method added later...) is broadcast with its arguments to every rank, then run on rank 0's worker,
whose result is returned; the other ranks run the same call and drop their result (rank 0 samples).
Attributes are rank 0's. Nothing here names a runner method, so new runner entry points need no edit.
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

from fdpp.config import EngineConfig
from fdpp.distributed import launch
from fdpp.distributed.launch import SHUTDOWN, TensorParallelError

logger = logging.getLogger(__name__)

# calls that still return (doing nothing) once the group broke: clean-up after the error
_SAFE_WHEN_BROKEN = frozenset({"release", "shutdown"})


class UniProcExecutor:
    """TP=1: everything in this process."""

    tensor_parallel_size = 1

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        from fdpp.ops.backend import Backends

        self.config = config
        self.device = device
        self.backends = Backends.resolve(config, device)  # this engine's op implementations

    def load_model_and_tokenizer(self) -> tuple[Any, Any]:
        from fdpp.engine.loading import load_model_and_tokenizer

        return load_model_and_tokenizer(self.config, self.device)

    def num_blocks(self, engine: Any, block_size: int) -> int:
        return engine._num_blocks(block_size)

    def make_runner(self, loaded: Any, block_size: int, num_blocks: int, max_model_len: int,
                    eos_token_ids: tuple[int, ...]) -> Any:
        from fdpp.engine.model_runner import ModelRunner

        return ModelRunner(loaded.model, loaded.model_config, loaded.dtype, self.device, block_size, num_blocks,
                           max_model_len, eos_token_ids, backends=self.backends)

    def set_calibration(self, result: Any) -> None:
        """Rank 0's calibration is already on the model (one rank)."""

    def shutdown(self) -> None:
        """Nothing to stop."""


class RunnerProxy:
    """Forwards every method call to all ranks (see the module docstring); attributes are rank 0's."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        object.__setattr__(self, "_executor", executor)

    def __getattr__(self, name: str) -> Any:
        ex = object.__getattribute__(self, "_executor")
        attr = getattr(ex.local, name)
        if inspect.ismethod(attr):
            def call(*args: Any, **kwargs: Any) -> Any:
                return ex.call(name, *args, **kwargs)

            call.__name__ = name
            return call
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        # rank 0's runner state (e.g. the structured-output backend: rank 0 alone samples)
        setattr(object.__getattribute__(self, "_executor").local.runner, name, value)


class MultiprocExecutor:
    """TP>1: ranks spawned by fdpp on this node, or joined from a torchrun rendezvous (rank 0 here)."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        from fdpp.engine.worker import Worker

        self.config = config
        self.tensor_parallel_size = tp = config.tensor_parallel_size
        if device.type == "cuda" and device.index not in (None, 0):
            from fdpp.errors import FdppError

            raise FdppError(f"device={config.device!r}: with tensor_parallel_size={tp} give device='cuda' "
                            "(rank r runs on cuda:<local rank>; pick GPUs with CUDA_VISIBLE_DEVICES)")
        env = launch.torchrun_env()
        if env is not None:
            if env["world"] != tp:
                from fdpp.errors import FdppError

                raise FdppError(f"torchrun started {env['world']} processes but tensor_parallel_size={tp}; "
                                "make them equal (--nnodes x --nproc-per-node)")
            if env["rank"] != 0:
                raise RuntimeError("MultiprocExecutor runs on rank 0 only (ranks > 0 run the worker loop)")
            dev = launch.rank_device(device, env["local_rank"], tp)
            self.group = launch.init_group(0, tp, env["addr"], env["port"], dev, spawned_master=False)
            self.group.owns_group = False  # torchrun's group outlives this engine (a later one reuses it)
        else:
            self.group = launch.spawn_group(tp, device)
        self.device = self.group.device
        self.broken: str | None = None
        self.group.watchdog = launch.Watchdog(self.group, self._on_dead)
        self._closed = False
        try:
            launch.broadcast_message(self.group.tp, ("__init__", (config,), {}))
            self.local = Worker(config, self.group.tp, self.device)
        except BaseException:
            self._teardown()
            raise
        self.backends = self.local.backends  # rank 0's (every rank resolves the same from the config)
        self.runner = RunnerProxy(self)
        import atexit

        atexit.register(self.shutdown)  # a program that never closes its LLM still stops its ranks cleanly

    # ---- the engine's set-up ------------------------------------------------------------------------
    def load_model_and_tokenizer(self) -> tuple[Any, Any]:
        from fdpp.engine.loading import load_tokenizer

        loaded = self.call("load_model")
        return loaded, load_tokenizer(self.config, loaded)

    def num_blocks(self, engine: Any, block_size: int) -> int:
        return self.call("determine_num_blocks", block_size, engine.max_num_batched_tokens, engine.max_model_len)

    def make_runner(self, loaded: Any, block_size: int, num_blocks: int, max_model_len: int,
                    eos_token_ids: tuple[int, ...]) -> RunnerProxy:
        self.call("init_runner", block_size, num_blocks, max_model_len, eos_token_ids)
        return self.runner

    def set_calibration(self, result: Any) -> None:
        """Give every rank rank 0's unified max values."""
        self.call("set_phi", result)

    # ---- calls --------------------------------------------------------------------------------------
    def _on_dead(self, message: str) -> None:
        self.broken = message
        logger.error("%s", message)
        if self.device.type == "cuda":
            # NCCL waits for a dead peer instead of failing: give a call in flight a moment, then exit
            time.sleep(5.0)
            if not self._closed:
                launch.exit_worker(message + " (rank 0, the engine)")

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``name`` on every rank with these arguments; return rank 0's result."""
        if self.broken is not None or self._closed:
            if name in _SAFE_WHEN_BROKEN:
                return None
            raise TensorParallelError(f"{self.broken or 'the tensor-parallel group is shut down'}; "
                                      "the engine cannot continue: restart it")
        try:
            launch.broadcast_message(self.group.tp, (name, args, kwargs))
            return getattr(self.local, name)(*args, **kwargs)
        except TensorParallelError:
            raise
        except RuntimeError as e:
            if not _is_comm_error(e):
                raise
            deadline = time.monotonic() + launch.HEARTBEAT_TIMEOUT_S + 2 * launch.HEARTBEAT_S
            while self.broken is None and time.monotonic() < deadline:  # name the rank that died
                time.sleep(0.1)
            self.broken = self.broken or f"the tensor-parallel group failed ({e})"
            raise TensorParallelError(f"{self.broken}; the engine cannot continue: restart it") from e

    def shutdown(self) -> None:
        """Stop every rank (they leave their loop) and leave the process group."""
        if self._closed:
            return
        if self.broken is None:
            try:
                launch.broadcast_message(self.group.tp, (SHUTDOWN, (), {}))
            except RuntimeError as e:
                logger.warning("tensor-parallel shutdown message failed: %s", e)
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        for p in self.group.spawned:
            p.join(timeout=10 if self.broken is None else 0.1)
            if p.is_alive():
                p.kill()
        launch.destroy_group(self.group)

    def worker_pids(self) -> list[int]:
        """The process ids of the ranks this executor spawned (ranks 1..; empty under torchrun)."""
        return [p.pid for p in self.group.spawned]


def _is_comm_error(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "connection", "nccl", "timed out", "timeout", "peer", "broken pipe",
                                   "closed", "distributed"))


def create_executor(config: EngineConfig, device: torch.device) -> UniProcExecutor | MultiprocExecutor:
    """UniProcExecutor for tensor_parallel_size 1, MultiprocExecutor above. Under torchrun, a rank other
    than 0 serves rank 0 here and exits when it shuts down (``SystemExit(0)``)."""
    tp = config.tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        from fdpp.errors import InvalidRequestError

        raise InvalidRequestError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return UniProcExecutor(config, device)
    env = launch.torchrun_env()
    if env is not None and env["rank"] != 0:
        run_worker(device)
        raise SystemExit(0)
    return MultiprocExecutor(config, device)


def run_worker(device: torch.device | str = "auto") -> None:
    """Under torchrun, on a rank other than 0: serve rank 0's engine until it shuts down.

    ``device``: "cuda" / "cpu" / "auto" (the rank uses cuda:<LOCAL_RANK> or the CPU)."""
    from fdpp.config import resolve_device

    env = launch.torchrun_env()
    if env is None or env["rank"] == 0:
        raise RuntimeError("run_worker needs a torchrun environment (RANK > 0, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    device = resolve_device(device) if isinstance(device, str) else device
    dev = launch.rank_device(device, env["local_rank"], env["world"])
    group = launch.init_group(env["rank"], env["world"], env["addr"], env["port"], dev, spawned_master=False)
    group.owns_group = False
    group.watchdog = launch.Watchdog(group, launch.exit_worker)
    try:
        launch.worker_loop(group)
    finally:
        group.watchdog.stop()
