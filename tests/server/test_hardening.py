"""Issue 10's server defects, each pinned by a test: strict inputs (chat roles, tool_choice, content
type, error codes and params), the API key (scheme, which endpoints), 503s from the catch-all (status
counted, logged once, the keep-alive socket usable) and a request the engine ends with an error."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import httpx
import pytest

from tests.server.conftest import serve_in_thread, tiny_llm

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "hi"}]


def _error(resp, status, param=None, code=None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- strict inputs (defect 4) ----------------------------------------------------------------------
def test_unknown_chat_role_is_rejected(server):
    for endpoint in ("/v1/chat/completions", "/tokenize"):
        body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "wizard", "content": "hi"}]}
        err = _error(httpx.post(server.base_url + endpoint, json=body, timeout=60), 400, "messages")
        assert "wizard" in err["message"] and "messages[1].role" in err["message"], err
    # every OpenAI role still works
    for role in ("system", "developer", "user"):
        r = httpx.post(server.base_url + "/tokenize", json={"messages": [{"role": role, "content": "x"}]})
        assert r.status_code == 200, (role, r.text)


def test_tool_choice_needs_tools(server):
    for choice in ("auto", "none", {"type": "function", "function": {"name": "f"}}):
        body = {"messages": CHAT, "max_tokens": 1, "tool_choice": choice}
        err = _error(httpx.post(server.base_url + "/v1/chat/completions", json=body), 400, "tool_choice")
        assert "tools" in err["message"]


def test_non_json_content_type_is_rejected(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        resp = httpx.post(server.base_url + "/v1/completions", content=body, headers={"Content-Type": ctype})
        err = _error(resp, 415, code="unsupported_media_type")
        assert "application/json" in err["message"] and ctype.split(";")[0] in err["message"]
    # JSON content types (any charset, +json) and a missing header are accepted
    for ctype in ("application/json; charset=utf-8", "application/vnd.api+json", None):
        headers = {"Content-Type": ctype} if ctype else {}
        resp = httpx.post(server.base_url + "/v1/completions", content=body, headers=headers, timeout=60)
        assert resp.status_code == 200, (ctype, resp.text)


def test_error_codes_and_params(server):
    err = _error(httpx.post(server.base_url + "/v1/completions", json={"prompt": ["a"] * 257}), 400, "prompt")
    assert err["code"] == "too_many_prompts"
    # a conversation longer than the context names messages, whichever max-tokens field is used
    long_chat = [{"role": "user", "content": "hello " * (server.state.max_model_len + 10)}]
    for extra in ({}, {"max_tokens": 5}, {"max_completion_tokens": 5}):
        resp = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": long_chat, **extra}, timeout=60)
        _error(resp, 400, "messages", "context_length_exceeded")


# ---- the API key (defect 5) ------------------------------------------------------------------------
def test_api_key_scheme_and_endpoints(tiny_dir):
    with serve_in_thread(tiny_llm(tiny_dir), api_key="sekret") as srv:
        base = srv.base_url
        body = {"prompt": [1, 2], "max_tokens": 2}
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"{scheme} sekret"})
            assert r.status_code == 200, (scheme, r.text)
        for auth in (None, "Bearer wrong", "Basic sekret", "sekret", "Bearer"):
            headers = {"Authorization": auth} if auth else {}
            r = httpx.post(base + "/v1/completions", json=body, headers=headers)
            _error(r, 401, code="invalid_api_key")
            assert r.headers["www-authenticate"].lower().startswith("bearer")
        # /tokenize and /detokenize take multi-MB bodies: they need the key too
        for path, payload in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
            _error(httpx.post(base + path, json=payload), 401, code="invalid_api_key")
            r = httpx.post(base + path, json=payload, headers={"Authorization": "bearer sekret"})
            assert r.status_code != 401, r.text  # (this model has no tokenizer: a 400 that says so)
        _error(httpx.get(base + "/v1/models"), 401)
        for path in ("/health", "/ping", "/version", "/metrics"):  # open: probes and scrapers
            assert httpx.get(base + path).status_code == 200, path


def test_serve_help_says_which_endpoints_are_open(capsys):
    from fdpp.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--api-key" in text
    for path in ("/health", "/ping", "/version", "/metrics", "/tokenize", "/detokenize"):
        assert path in text, path


# ---- 503 from the catch-all (defect 3) -------------------------------------------------------------
def test_engine_unavailable_503(tiny_dir, caplog):
    """The engine has stopped but HTTP is up: a generation request gets one 503, counted as 503,
    logged once with no traceback, sent with ``Connection: close``; the client's next request works."""
    with serve_in_thread(tiny_llm(tiny_dir)) as srv:
        srv.state.async_engine.shutdown()
        caplog.clear()
        with caplog.at_level(logging.INFO), httpx.Client(base_url=srv.base_url, timeout=30) as client:
            for path, body in (("/v1/completions", {"prompt": [1, 2], "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "stream": True})):
                resp = client.post(path, json=body)
                if path.endswith("chat/completions"):
                    _error(resp, 400, "messages")  # no tokenizer: refused before the engine is asked
                    continue
                _error(resp, 503, code="engine_unavailable")
                assert resp.headers["connection"] == "close"
                assert client.get("/version").status_code == 200  # the next request gets a real reply
            metrics = client.get("/metrics").text
        assert 'endpoint="/v1/completions",method="POST",status="503"} 1.0' in metrics, metrics
        assert 'status="500"' not in metrics
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert records[0].exc_info is None and "/v1/completions" in records[0].getMessage()


# ---- one request failing in the engine -------------------------------------------------------------
POISON = [99, 98, 97]  # a prompt that the patched engine fails (as it fails one request whose step raised)


def _poison_engine(engine) -> None:
    """Make ``engine.step`` end requests whose prompt starts with POISON with finish_reason "error"
    (the engine's contract for a failure attributable to one request), leaving the others alone."""
    step = engine.step

    def failing_step():
        outs = []
        for out in step():
            if out.prompt_token_ids[:3] == POISON:
                if not out.finished:
                    engine.abort_request(out.request_id)
                outs.append(dataclasses.replace(
                    out, finished=True,
                    outputs=[dataclasses.replace(c, finish_reason="error") for c in out.outputs]))
                outs[-1].error = "ValueError: Overflow when unpacking long long"
            else:
                outs.append(out)
        return outs

    engine.step = failing_step


def test_request_failed_in_engine_ends_alone(tiny_dir):
    with serve_in_thread(tiny_llm(tiny_dir)) as srv:
        srv.run_in_engine(_poison_engine)

        async def main():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                good = [client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 40,
                                                             "ignore_eos": True}) for _ in range(3)]
                bad = client.post("/v1/completions", json={"prompt": POISON + [1], "max_tokens": 40})
                stream_lines = []

                async def bad_stream():
                    async with client.stream("POST", "/v1/completions",
                                             json={"prompt": POISON + [2], "max_tokens": 40, "stream": True}) as r:
                        assert r.status_code == 200
                        stream_lines.extend([ln async for ln in r.aiter_lines() if ln.startswith("data: ")])

                results = await asyncio.gather(*good, bad, bad_stream())
                return results, stream_lines

        (*goods, bad, _), lines = asyncio.run(main())
        for r in goods:
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40, r.text
        err = _error(bad, 500, code="request_failed")
        assert "Overflow when unpacking long long" in err["message"]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_failed"
        stats = srv.wait_idle()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        assert httpx.post(srv.base_url + "/v1/completions", json={"prompt": [5], "max_tokens": 2}).status_code == 200
