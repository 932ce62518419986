"""One real server per test session: the embedded default model, loaded once, served by uvicorn in a
background thread on 127.0.0.1 (a free port), shared by every server test module. Tests talk to it over HTTP (openai client, httpx) and may
run functions on the engine thread (``run_in_engine``) while no HTTP request is in flight."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    llm: Any
    app: Any
    base_url: str  # http://127.0.0.1:PORT
    model: str

    @property
    def state(self) -> Any:
        return self.app.state.fdpp

    def run_in_engine(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(engine)`` on the engine thread, between steps (the engine is never touched elsewhere)."""
        return asyncio.run(self.state.async_engine.call(fn))

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Wait until the engine has no request left; returns its stats()."""
        deadline = time.time() + timeout
        while True:
            busy, stats = self.run_in_engine(lambda e: (e.has_unfinished_requests() or e.get_num_unfinished_requests() > 0, e.stats()))
            if not busy:
                return stats
            if time.time() > deadline:
                raise AssertionError(f"the engine is still busy after {timeout} s: {stats}")
            time.sleep(0.1)


@contextlib.contextmanager
def serve_in_thread(llm: Any, **app_kwargs: Any):
    """Serve ``llm`` with uvicorn in a background thread on 127.0.0.1 (a free port) until the block exits."""
    import uvicorn

    from fdpp.server.app import build_app

    app = build_app(llm, **app_kwargs)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield RunningServer(llm, app, f"http://127.0.0.1:{port}", app.state.fdpp.model_name)
    finally:
        srv.should_exit = True
        thread.join(30)
        assert not app.state.fdpp.async_engine.is_running


@pytest.fixture(scope="session")
def server():
    """The embedded default model (loaded once per session), served on 127.0.0.1."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from fdpp.llm import LLM

    llm = LLM(show_progress=False)
    with serve_in_thread(llm, max_body_bytes=1 << 20, max_n=8) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random-weight Llama checkpoint (no tokenizer: prompts are token ids), written once."""
    from tests.helpers import write_tiny_llama

    path = str(tmp_path_factory.mktemp("tiny-llama"))
    write_tiny_llama(path)
    return path


def tiny_llm(path: str, **kw: Any) -> Any:
    """The tiny checkpoint at ``path`` loaded on the CPU (fast: well under a second)."""
    from fdpp.llm import LLM

    return LLM(model=path, device="cpu", dtype="float32", show_progress=False, calibration="off", **kw)
