"""Starting the ranks, the per-step broadcast, and the watchdog that turns a dead rank into a clear error.

Two ways to get a group of ``tensor_parallel_size`` processes:
- spawned (default, one node): rank 0 is the engine's process; it spawns ranks 1.. with
  ``torch.multiprocessing`` (spawn) and they meet at a TCP store on 127.0.0.1;
- joined: under ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
  ``LOCAL_RANK``) every process runs the same command; rank 0 runs the engine and the others serve it
  in ``worker_loop`` (several nodes work the same way).

Two groups: the default one carries the forward pass's collectives (NCCL on GPUs, gloo on the CPU); a
gloo group with a long timeout carries rank 0's per-step message (the method name and its arguments,
pickled), so an idle engine does not time its workers out. The watchdog: every process bumps a
heartbeat counter in the store each second and watches the others'; a rank whose counter stops for
``HEARTBEAT_TIMEOUT_S`` (or a store that cannot be reached: rank 0 is gone) is declared dead. A worker
then exits with a message naming it; rank 0 raises ``TensorParallelError`` from the next call (on the CPU
the gloo collective in flight fails at once; on GPUs, where NCCL would wait, rank 0 exits).
"""
from __future__ import annotations

import datetime
import io
import logging
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fdpp.distributed.state import TPGroup
from fdpp.errors import FdppError

logger = logging.getLogger(__name__)

# NVLink multicast stays off in every process (NCCL's NVLS, PyTorch's symmetric memory, NVSHMEM).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
HEARTBEAT_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # a worker waits this long for the next step
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # one forward-pass collective
SHUTDOWN = "__shutdown__"


class TensorParallelError(FdppError):
    """A tensor-parallel rank died or its group broke; the engine cannot go on (restart it)."""


def set_no_multicast_env() -> None:
    os.environ.update(NO_MULTICAST_ENV)


def torchrun_env() -> dict[str, Any] | None:
    """The rendezvous torchrun (or a launcher like it) gave this process, or None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    world = int(env["WORLD_SIZE"])
    if world <= 1:
        return None
    return {"rank": int(env["RANK"]), "world": world, "local_rank": int(env.get("LOCAL_RANK", env["RANK"])),
            "addr": env["MASTER_ADDR"], "port": int(env["MASTER_PORT"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """The device of a rank: ``cuda:<local rank>`` on GPUs, the CPU otherwise."""
    if device.type != "cuda":
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise FdppError(f"tensor-parallel local rank {local_rank} needs GPU {local_rank} but this node has only "
                        f"{n} GPU(s); use at most {n} ranks per node (tensor_parallel_size={world})")
    return torch.device("cuda", local_rank)


@dataclass
class Group:
    """This process's membership: its TPGroup, device, the store for heartbeats, the watchdog."""

    tp: TPGroup
    device: torch.device
    addr: str
    port: int
    spawned: list = field(default_factory=list)  # rank 0 of a spawned group: the worker processes
    watchdog: Watchdog | None = None
    owns_group: bool = True  # destroy the process group at shutdown (not under torchrun: it is reused)


def init_group(rank: int, world: int, addr: str, port: int, device: torch.device, *, spawned_master: bool,
               store: Any = None) -> Group:
    """Join the process group (both groups) and start the watchdog."""
    import torch.distributed as dist

    set_no_multicast_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    reused = dist.is_initialized()
    if not reused:
        if store is None:
            # rank 0 hosts the store unless torchrun's agent does
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(addr, port, world, is_master=rank == 0 and (spawned_master or not agent_store),
                                  timeout=datetime.timedelta(seconds=120), wait_for_workers=False)
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT,
                                **kwargs)
        import atexit

        atexit.register(_destroy_at_exit)  # a torchrun group is kept for later engines: leave it at exit
    cpu_group = _cached_cpu_group(backend)
    tp = TPGroup(rank, world, device_group=None, cpu_group=cpu_group)
    return Group(tp, device, addr, port, owns_group=not reused)


_CPU_GROUP: Any = None


def _cached_cpu_group(backend: str) -> Any:
    """The gloo group of the per-step message (made once per process group; torchrun runs reuse it)."""
    import torch.distributed as dist

    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return _CPU_GROUP


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    global _CPU_GROUP
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    _CPU_GROUP = None


def destroy_group(group: Group) -> None:
    import torch.distributed as dist

    global _CPU_GROUP
    if group.watchdog is not None:
        group.watchdog.stop()
    if group.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        _CPU_GROUP = None


# ---- the per-step message ------------------------------------------------------------------------
class _StepPickler(pickle.Pickler):
    """Pickles a step's arguments for the other ranks: a sequence goes without its grammar matcher
    (rank 0 alone samples and applies it) and its pending forks."""

    def reducer_override(self, obj: Any) -> Any:
        from fdpp.engine.sequence import Sequence

        if type(obj) is Sequence:
            state = dict(obj.__dict__)
            state["grammar"] = None
            state["pending_forks"] = []
            return _restore_sequence, (state,)
        return NotImplemented


def _restore_sequence(state: dict) -> Any:
    from fdpp.engine.sequence import Sequence

    seq = Sequence.__new__(Sequence)
    seq.__dict__.update(state)
    return seq


def dumps_step(obj: Any) -> bytes:
    buf = io.BytesIO()
    _StepPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def broadcast_message(tp: TPGroup, message: Any = None) -> Any:
    """Rank 0 sends ``message`` to every rank; the others return what it sent."""
    import torch.distributed as dist

    box = [dumps_step(message) if tp.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=tp.cpu_group)
    return message if tp.rank == 0 else pickle.loads(box[0])


# ---- the watchdog --------------------------------------------------------------------------------
class Watchdog:
    """Heartbeats through the store; declares a rank dead when its counter stops or the store is gone."""

    def __init__(self, group: Group, on_dead: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.on_dead = on_dead
        self.dead: str | None = None
        self._stop = threading.Event()
        self._store = dist.TCPStore(group.addr, group.port, is_master=False,
                                    timeout=datetime.timedelta(seconds=HEARTBEAT_TIMEOUT_S))
        self._thread = threading.Thread(target=self._run, name=f"fdpp-tp-watchdog-{group.tp.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeats; waits for the thread, so no store call is in flight when the process exits."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=HEARTBEAT_TIMEOUT_S + 2)

    def _run(self) -> None:
        tp = self.group.tp
        last: dict[int, tuple[int, float]] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._store.add(f"fdpp/hb/{tp.rank}", 1)
                for r in range(tp.size):
                    if r == tp.rank:
                        continue
                    for i, proc in enumerate(self.group.spawned):
                        if i + 1 == r and not proc.is_alive():
                            return self._declare(f"tensor-parallel rank {r} (pid {proc.pid}) exited with code "
                                                 f"{proc.exitcode}")
                    count = self._store.add(f"fdpp/hb/{r}", 0)
                    prev = last.get(r)
                    if prev is None or prev[0] != count:
                        last[r] = (count, now)
                    elif now - prev[1] > HEARTBEAT_TIMEOUT_S:
                        return self._declare(f"tensor-parallel rank {r} stopped responding "
                                             f"(no heartbeat for {HEARTBEAT_TIMEOUT_S:.0f} s)")
            except Exception as e:  # noqa: BLE001 - the store lives with rank 0 (or torchrun's agent)
                if self._stop.is_set():
                    return
                return self._declare(f"tensor-parallel rank 0's store at {self.group.addr}:{self.group.port} "
                                     f"cannot be reached ({type(e).__name__}): rank 0 is gone")
            self._stop.wait(HEARTBEAT_S)

    def _declare(self, message: str) -> None:
        rank = message.split("rank ", 1)[1].split(" ", 1)[0] if "rank " in message else None
        try:  # the reason the rank left, if it could say
            key = f"fdpp/error/{rank}"
            if rank is not None and self._store.check([key]):
                message += ": " + self._store.get(key).decode(errors="replace")
        except Exception:  # noqa: BLE001
            pass
        self.dead = message
        if not self._stop.is_set():
            self.on_dead(message)


def exit_worker(message: str) -> None:
    """A worker's reaction to a dead peer: say which, and exit (never hang)."""
    print(f"fdpp: {message}; this rank exits", file=sys.stderr, flush=True)
    os._exit(1)


# ---- workers -------------------------------------------------------------------------------------
def worker_loop(group: Group) -> None:
    """Serve rank 0: build a Worker from the config it sends, then run each method it broadcasts with the
    same arguments, until it sends the shutdown message."""
    from fdpp.engine.worker import Worker

    tp = group.tp
    worker = None
    while True:
        try:
            name, args, kwargs = broadcast_message(tp)
        except Exception as e:  # noqa: BLE001 - rank 0 is gone or the group broke
            if group.watchdog is not None and group.watchdog.dead:
                exit_worker(group.watchdog.dead)
            exit_worker(f"tensor-parallel rank {tp.rank} lost rank 0 ({type(e).__name__}: {e})")
        if name == SHUTDOWN:
            return
        try:
            if name == "__init__":
                worker = Worker(args[0], tp, group.device)
            else:
                getattr(worker, name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            what = f"{name} raised {type(e).__name__}: {e}"
            if name == "__init__" or name in _SETUP_CALLS or name in vars(Worker):
                # a set-up step failed here alone: rank 0 would wait for this rank forever; say why, and go
                report_error(group, what)
                exit_worker(f"tensor-parallel rank {tp.rank}: {what}")
            # a step's failure: rank 0 runs the same call, fails the same way and reports it
            logger.warning("tensor-parallel rank %d: %s", tp.rank, what)


# runner calls that set a rank up (besides the Worker's own methods): a failure on one rank is fatal
_SETUP_CALLS = frozenset({"capture_cuda_graphs"})


def report_error(group: Group, message: str) -> None:
    """Leave a worker's fatal error in the store, where rank 0's watchdog reads it."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(group.addr, group.port, is_master=False, timeout=datetime.timedelta(seconds=5))
        store.set(f"fdpp/error/{group.tp.rank}", message[:2000])
    except Exception:  # noqa: BLE001 - the message is also on this rank's stderr
        pass


def _spawned_main(rank: int, world: int, port: int, device_type: str) -> None:
    """Entry point of a rank fdpp spawned (one node)."""
    torch.set_num_threads(int(os.environ.get("FDPP_TP_THREADS", "1")) if device_type == "cpu" else 1)
    device = rank_device(torch.device(device_type), rank, world)
    group = init_group(rank, world, "127.0.0.1", port, device, spawned_master=False)
    group.watchdog = Watchdog(group, exit_worker)
    worker_loop(group)
    destroy_group(group)


def spawn_group(world: int, device: torch.device) -> Group:
    """Rank 0 of a new single-node group: spawn ranks 1..world-1 and join them."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if device.type == "cuda" and world > torch.cuda.device_count():
        raise FdppError(f"tensor_parallel_size={world} needs {world} GPUs but only {torch.cuda.device_count()} "
                        "are visible; lower tensor_parallel_size (or set CUDA_VISIBLE_DEVICES)")
    if dist.is_initialized():
        raise FdppError("a torch.distributed process group already exists in this process: run one "
                        "tensor-parallel engine per process, or launch with torchrun")
    set_no_multicast_env()
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(1, world):
        p = ctx.Process(target=_spawned_main, args=(r, world, port, device.type), daemon=True,
                        name=f"fdpp-tp-rank-{r}")
        p.start()
        procs.append(p)
    try:
        group = init_group(0, world, "127.0.0.1", port, rank_device(device, 0, world), spawned_master=True,
                           store=store)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    group.spawned = procs
    group._store = store  # kept alive: the workers' heartbeats go through it
    return group
