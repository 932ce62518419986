"""Server behaviour that needs a special engine: a tiny random-weight Llama (fast to load, no tokenizer:
token-id prompts) with a KV cache far too small for the load, the API key, and `fdpp serve` as a real
process stopped by SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import write_tiny_llama
from tests.server.conftest import _free_port, serve_in_thread


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    write_tiny_llama(path)
    return path


def test_full_kv_cache_queues_requests(tiny_dir):
    """6 blocks x 16 tokens = 96 tokens of KV cache; 12 concurrent requests of 50 tokens each need
    600: they wait (or are preempted and recomputed) and every one completes in full."""
    from fdpp.llm import LLM

    llm = LLM(model=tiny_dir, device="cpu", dtype="float32", show_progress=False, block_size=16, num_blocks=6,
              calibration="off")
    with serve_in_thread(llm, api_key="sekret") as srv:
        headers = {"Authorization": "Bearer sekret"}
        assert httpx.post(srv.base_url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}
                          ).status_code == 401
        assert httpx.get(srv.base_url + "/health").status_code == 200  # no key needed

        async def one(client, i):
            body = {"prompt": [(i * 7 + j) % 120 + 3 for j in range(20)], "max_tokens": 30, "ignore_eos": True,
                    "temperature": 0, "logprobs": 1, "stream": bool(i % 2)}
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            if not body["stream"]:
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                d = r.json()
                return d["choices"][0]["finish_reason"], d["usage"], d["choices"][0]["logprobs"]["tokens"]
            finish, usage, tokens = None, None, []
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    assert "error" not in d, d
                    for ch in d["choices"]:
                        finish = ch["finish_reason"] or finish
                        tokens += ch["logprobs"]["tokens"] if ch["logprobs"] else []
                    usage = d["usage"] or usage
            return finish, usage, tokens

        async def main():
            async with httpx.AsyncClient(base_url=srv.base_url, headers=headers, timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(12)))

        results = asyncio.run(main())
        for finish, usage, tokens in results:
            assert finish == "length"
            assert usage == {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}
            assert len(tokens) == 30
        # a request that could never fit the cache is refused up front, not failed mid-flight
        r = httpx.post(srv.base_url + "/v1/completions", headers=headers,
                       json={"prompt": [5] * 20, "max_tokens": 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_cache_too_small"
        stats = srv.wait_idle()
        assert stats["num_preemptions"] > 0  # the cache really was full
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        srv.run_in_engine(lambda e: e.check_integrity())


def test_fdpp_serve_sigterm(tiny_dir):
    """`fdpp serve` answers, then SIGTERM aborts the open stream and the process exits cleanly."""
    port = _free_port()
    cmd = [sys.executable, "-c", "import sys; from fdpp.cli import main; sys.exit(main())", "serve",
           "--model", tiny_dir, "--device", "cpu", "--port", str(port), "--served-model-name", "tiny", "alias",
           "--calibration", "off", "--quiet", "--log-level", "warning"]
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
        models = httpx.get(base + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny", "alias"]
        r = httpx.post(base + "/v1/completions", json={"model": "alias", "prompt": [1, 2, 3], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "alias"
        lines = []
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json={"prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"  # the stream ends properly (aborted, or finished first)
        # the engine loop stops, uvicorn finishes its graceful shutdown, the process exits 0
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
