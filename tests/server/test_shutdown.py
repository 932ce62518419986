"""`fdpp serve` as a real process stopped by SIGTERM: in-flight requests drain, the exit status is 0,
and a SIGTERM during a long engine step waits neither for the step nor for the rest of the work."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import _free_port

pytestmark = pytest.mark.slow

# Slow engine steps, injected: a step with a request whose prompt starts with [77, 76] takes 60 s
# more, with [66, 65] 20 ms more (a stream that is still running when the signal comes).
_SLOW_STEPS = """
import time
from fdpp.engine import llm_engine
_step = llm_engine.LLMEngine.step
def _slow_step(self):
    heads = {tuple(r.prompt_token_ids[:2]) for r in self.requests.values()}
    time.sleep(60 if (77, 76) in heads else 0.02 if (66, 65) in heads else 0)
    return _step(self)
llm_engine.LLMEngine.step = _slow_step
"""


@contextlib.contextmanager
def _serve(tiny_dir: str, *extra: str, prelude: str = ""):
    port = _free_port()
    code = prelude + "\nimport sys\nfrom fdpp.cli import main\nsys.exit(main())"
    cmd = [sys.executable, "-c", code, "serve", "--model", tiny_dir, "--device", "cpu", "--port", str(port),
           "--served-model-name", "tiny", "alias", "--calibration", "off", "--quiet", "--log-level", "warning",
           *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "fdpp serve did not come up"
            time.sleep(0.3)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_in_flight_and_exits_0(tiny_dir):
    """SIGTERM mid-stream (a 2 s stream): the stream runs to its end (finish_reason "length", then
    [DONE]) and the process exits with status 0 and no traceback."""
    with _serve(tiny_dir, "--timeout-graceful-shutdown", "30", prelude=_SLOW_STEPS) as (proc, base):
        models = httpx.get(base + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny", "alias"]
        r = httpx.post(base + "/v1/completions", json={"model": "alias", "prompt": [1, 2, 3], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "alias"
        lines = []
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json={"prompt": [66, 65, 3], "max_tokens": 100, "ignore_eos": True, "stream": True,
                                "logprobs": 0}) as resp:  # logprobs: one chunk per token (no tokenizer, no text)
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length", last  # drained, not aborted
        assert sum(len(json.loads(x[6:])["choices"][0]["logprobs"]["tokens"]) for x in lines[:-1]) == 100
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out, out


def test_sigterm_during_a_long_step_is_bounded(tiny_dir):
    """A step that would take 60 s is running when SIGTERM comes: after the drain time the rest is
    aborted and the process exits 0 within seconds, not after the step (nor a 30 s join)."""
    with _serve(tiny_dir, "--timeout-graceful-shutdown", "1", prelude=_SLOW_STEPS) as (proc, base):
        replies = []

        def slow_request():
            try:
                replies.append(httpx.post(base + "/v1/completions", timeout=60,
                                          json={"prompt": [77, 76, 5], "max_tokens": 4}))
            except httpx.TransportError as e:
                replies.append(e)

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(1.5)  # the step has started
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        elapsed = time.time() - t0
        print(f"exited {elapsed:.1f} s after SIGTERM")
        t.join(10)
        assert status == 0, proc.stdout.read()
        assert elapsed < 10, elapsed
        assert replies and not (isinstance(replies[0], httpx.Response) and replies[0].status_code == 200)


def test_stop_during_a_long_step_answers_readers():
    """AsyncEngine over a fake engine whose step takes 30 s: after a stop request readers get
    RequestAbortedError within ``stop_grace_s`` and shutdown returns after its timeout, not the step."""
    import asyncio

    from fdpp.sampling_params import SamplingParams
    from fdpp.server.async_engine import AsyncEngine, RequestAbortedError

    class SlowEngine:
        def __init__(self):
            self.reqs = {}

        def add_request(self, rid, ids, params):
            self.reqs[rid] = ids

        def abort_request(self, rid):
            self.reqs.pop(rid, None)

        def has_unfinished_requests(self):
            return bool(self.reqs)

        def step(self):
            time.sleep(30)
            return []

    aeng = AsyncEngine(SlowEngine(), idle_poll_s=0.01, stop_grace_s=0.3)
    aeng.start()

    async def main():
        group = aeng.submit([("r", [1], SamplingParams(max_tokens=4))])
        await asyncio.sleep(0.2)  # the step has started
        t0 = time.time()
        aeng.request_stop()
        with pytest.raises(RequestAbortedError, match="shutting down"):
            async for _ in group:
                pass
        return time.time() - t0

    waited = asyncio.run(main())
    assert waited < 2.0, waited
    t0 = time.time()
    aeng.shutdown(timeout=0.2)
    assert time.time() - t0 < 1.0
    assert not aeng.is_running
