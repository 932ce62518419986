"""One engine loop in a background thread, driven by asyncio callers.

``AsyncEngine`` owns an ``LLMEngine`` and is the only code that touches it after start-up: a single
thread repeatedly applies queued commands (add, abort, call) and runs ``LLMEngine.step()`` while there is
work, so requests arriving from HTTP handlers join the running batch between steps (continuous
batching). Outputs travel back to the asyncio event loop with ``loop.call_soon_threadsafe`` into one
``asyncio.Queue`` per ``RequestGroup``.

A ``RequestGroup`` is what a handler iterates: one or more engine requests (a completion with several
prompts fans out into one engine request per prompt; ``n > 1`` uses ``SamplingParams.n``). Leaving the
iteration early (client disconnected, task cancelled) aborts every unfinished engine request of the
group, which frees its KV blocks. A full KV cache needs nothing here: the engine's scheduler keeps
requests waiting until blocks free up.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fdpp.outputs import RequestOutput
from fdpp.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or crashed); no request can be served."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown, or an engine failure)."""


@dataclass
class _Sub:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    finished: bool = False


class RequestGroup:
    """Outputs of one HTTP request's engine requests.

    The engine thread keeps only the latest output of each sub-request (outputs are cumulative), so a
    slow reader costs no memory, and wakes the reader with at most one pending callback."""

    def __init__(self, engine: AsyncEngine, subs: list[_Sub], loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.subs = subs
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: dict[int, RequestOutput] = {}
        self._error: BaseException | None = None
        self._wake_scheduled = False
        self._event = asyncio.Event()
        self._closed = False

    # -- engine thread --
    def _post(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        with self._lock:
            if isinstance(item, BaseException):
                self._error = item
            else:
                self._pending[item[0]] = item[1]
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # -- event loop --
    def _take(self) -> tuple[dict[int, RequestOutput], BaseException | None]:
        self._event.clear()
        with self._lock:
            items, self._pending = self._pending, {}
            self._wake_scheduled = False
            return items, self._error

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt_index, latest cumulative RequestOutput)`` until every sub-request finished.

        Raises the engine's exception if the requests failed (or ``EngineDeadError`` if the loop died)."""
        try:
            remaining = sum(not s.finished for s in self.subs)
            while remaining:
                items, error = self._take()
                if error is not None:
                    raise error
                if not items:
                    stopping = self.engine.is_stopping
                    try:
                        await asyncio.wait_for(self._event.wait(), timeout=0.1 if stopping else 2.0)
                    except asyncio.TimeoutError:
                        if self.engine.is_dead:
                            raise EngineDeadError(self.engine._dead_reason()) from None
                        if self.engine.stop_is_overdue:
                            # The loop aborts everything after its current step; a long step is not waited for.
                            raise RequestAbortedError(
                                "the server is shutting down; the request was aborted") from None
                    continue
                for idx in sorted(items):
                    out = items[idx]
                    sub = self.subs[idx]
                    if out.finished and not sub.finished:
                        sub.finished = True
                        remaining -= 1
                    yield idx, out
        finally:
            self.close()

    def close(self) -> None:
        """Abort every sub-request that has not finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for sub in self.subs:
            if not sub.finished:
                self.engine.abort(sub.request_id)


class AsyncEngine:
    """Runs ``engine`` (an ``LLMEngine``) in a background thread; see the module docstring."""

    def __init__(self, engine: Any, idle_poll_s: float = 0.5, stop_grace_s: float = 1.0) -> None:
        self.engine = engine
        self.stop_grace_s = stop_grace_s  # after a stop request, how long readers wait for the current step
        self._stop_time: float | None = None
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._groups: dict[str, tuple[RequestGroup, int]] = {}  # engine request id -> (group, index)
        self._thread: threading.Thread | None = None
        self._active = threading.Event()  # the loop thread runs
        self._stopping = threading.Event()
        self._idle_poll_s = idle_poll_s
        self.error: BaseException | None = None  # set if the loop crashed
        self.num_steps = 0
        self.peak_batch = 0  # most requests advanced by one step so far (continuous batching at work)
        self.last_step_time: float | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread."""
        if self._active.is_set():
            return
        self._stopping.clear()
        self._stop_time = None
        self._active.set()
        self._thread = threading.Thread(target=self._run, name="fdpp-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._active.is_set() and not self._stopping.is_set()

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def stop_is_overdue(self) -> bool:
        """A stop was requested more than ``stop_grace_s`` ago (the loop is still in a step)."""
        t = self._stop_time
        return t is not None and time.monotonic() - t > self.stop_grace_s

    @property
    def is_dead(self) -> bool:
        """The loop has exited (or was never started)."""
        return not self._active.is_set()

    def request_stop(self) -> None:
        """Ask the loop to abort every in-flight request and stop; returns at once (signal-safe). The loop
        stops after its current step; readers give up on their requests ``stop_grace_s`` from now."""
        if self._stop_time is None:
            self._stop_time = time.monotonic()
        self._stopping.set()
        self._cmds.put(("stop",))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every in-flight request (their streams end with ``RequestAbortedError``) and stop."""
        if self._thread is None or self._thread is threading.current_thread():
            self.request_stop()
            return
        self.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the engine thread did not stop within %.0f s (a step is still running)", timeout)

    # ---- API used by the HTTP layer (event loop thread) --------------------------------------------
    def submit(self, prompts: list[tuple[str, list[int], SamplingParams]]) -> RequestGroup:
        """Queue engine requests ``(request_id, prompt_token_ids, params)``; iterate the returned group."""
        if not self.is_running:
            raise EngineDeadError(self._dead_reason())
        loop = asyncio.get_running_loop()
        group = RequestGroup(self, [_Sub(i, rid, ids, p) for i, (rid, ids, p) in enumerate(prompts)], loop)
        self._cmds.put(("add", group))
        return group

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps; return its result."""
        if not self.is_running:
            raise EngineDeadError(self._dead_reason())
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._cmds.put(("call", fn, loop, fut))
        return await fut

    def _dead_reason(self) -> str:
        if self.error is not None:
            return f"the engine loop crashed: {type(self.error).__name__}: {self.error}"
        return "the engine is not running (the server is shutting down)"

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if not self._apply_commands(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:
            logger.exception("the engine loop crashed")
            self.error = e
            self._stopping.set()
            self._fail_all(RequestAbortedError(f"the engine loop crashed: {type(e).__name__}: {e}"))
        else:
            self._fail_all(RequestAbortedError("the server is shutting down; the request was aborted"))
        finally:
            self._active.clear()
            self._drain_after_stop()

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; False once a stop command was seen."""
        first = True
        while True:
            try:
                if block and first:
                    cmd = self._cmds.get(timeout=self._idle_poll_s)
                else:
                    cmd = self._cmds.get_nowait()
            except queue.Empty:
                return not self._stopping.is_set()
            first = False
            kind = cmd[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(cmd[1])
            elif kind == "abort":
                if self._groups.pop(cmd[1], None) is not None:
                    self.engine.abort_request(cmd[1])
            elif kind == "call":
                _, fn, loop, fut = cmd
                try:
                    res, exc = fn(self.engine), None
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    res, exc = None, e
                _resolve(loop, fut, res, exc)

    def _add(self, group: RequestGroup) -> None:
        added: list[str] = []
        for sub in group.subs:
            try:
                self.engine.add_request(sub.request_id, sub.prompt_token_ids, sub.params)
            except Exception as e:  # noqa: BLE001 - e.g. InvalidRequestError: handed to the handler
                for rid in added:
                    self._groups.pop(rid, None)
                    self.engine.abort_request(rid)
                for s in group.subs:
                    s.finished = True  # nothing left to abort
                group._post(e)
                return
            added.append(sub.request_id)
            self._groups[sub.request_id] = (group, sub.index)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; aborting the %d requests in flight", len(self._groups))
            self._fail_all(RequestAbortedError(f"the engine failed: {type(e).__name__}: {e}"))
            return
        self.num_steps += 1
        self.last_step_time = time.time()
        self.peak_batch = max(self.peak_batch, len(outputs))
        for out in outputs:
            entry = self._groups.get(out.request_id)
            if entry is None:
                continue  # aborted meanwhile
            group, idx = entry
            if out.finished:
                del self._groups[out.request_id]
            group._post((idx, out))

    def _fail_all(self, exc: BaseException) -> None:
        groups = {id(g): g for g, _ in self._groups.values()}
        for rid in list(self._groups):
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
        self._groups.clear()
        for g in groups.values():
            g._post(exc)

    def _drain_after_stop(self) -> None:
        """Answer commands that arrived after the loop stopped, so no caller waits forever."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                for s in cmd[1].subs:
                    s.finished = True
                cmd[1]._post(EngineDeadError(self._dead_reason()))
            elif cmd[0] == "call":
                _resolve(cmd[2], cmd[3], None, EngineDeadError(self._dead_reason()))


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, res: Any, exc: BaseException | None) -> None:
    def done() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(res)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:
        pass
