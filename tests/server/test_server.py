"""The OpenAI-compatible server (fdpp serve).

* Against the real embedded model (CPU), one server for the module: the official openai client, greedy
  equality with LLM.generate / LLM.chat, 64 concurrent clients, bad input, disconnects, metrics.
* A tiny random-weight Llama (fast to load, no tokenizer: token-id prompts): a KV cache far too small for
  the load, the API key, and `fdpp serve` as a real process stopped by SIGTERM.
* The AsyncEngine loop over a fake engine: batching, aborts, engine failures, shutdown.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from fdpp.errors import InvalidRequestError
from fdpp.outputs import CompletionOutput, RequestOutput
from fdpp.sampling_params import SamplingParams
from tests.server.conftest import serve_in_thread

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


def _client(server, **kw):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def _greedy(server, prompts, max_tokens, chat=False):
    """Reference outputs through LLM.generate / LLM.chat on the same engine, run on the engine thread
    while the server is idle."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if chat:
        return server.run_in_engine(lambda e: server.llm.chat(prompts, sp, use_tqdm=False))
    return server.run_in_engine(lambda e: server.llm.generate(prompts, sp, use_tqdm=False))


def test_models_and_health(server):
    client = _client(server)
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_tokenize_detokenize(server):
    tok = server.llm.get_tokenizer()
    r = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == list(tok.encode(PROMPT)) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.state.max_model_len
    assert httpx.post(server.base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith(PROMPT)
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == server.llm.apply_chat_template(CHAT)
    _check_error(httpx.post(server.base_url + "/detokenize", json={"tokens": [-1]}), 400, "tokens")
    _check_error(httpx.post(server.base_url + "/tokenize", json={"prompt": "x", "messages": CHAT}), 400)
    _check_error(httpx.post(server.base_url + "/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")


def test_completion_greedy_matches_generate(server):
    ref = _greedy(server, [PROMPT], 12)[0]
    client = _client(server)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.text == ref.outputs[0].text
    assert c.finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == server.model

    # streaming: the concatenated deltas are the same text; the usage chunk comes last
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == ref.outputs[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [ref.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_chat_greedy_matches_chat(server):
    ref = _greedy(server, CHAT, 10, chat=True)[0]
    client = _client(server)
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)

    stream = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.outputs[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        ref.outputs[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)

    # vLLM's continuous usage stats: every chunk carries the running usage
    chunks = list(client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [ch.usage.completion_tokens for ch in chunks[1:] if ch.usage]
    assert counts == sorted(counts) and counts[-1] == len(ref.outputs[0].token_ids)


def test_stop_n_seed_logprobs(server):
    client = _client(server)
    ref = _greedy(server, [PROMPT], 12)[0].outputs[0].text
    words = ref.split()
    assert len(words) >= 3, ref
    stop = " " + words[2]
    expected = ref[: ref.index(stop)]
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == expected  # a stop string split over tokens is never streamed

    # echo: the prompt comes first
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + ref

    # n with a seed: n choices, reproducible
    kw = {"model": server.model, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "n": 3, "seed": 7,
              "extra_body": {"top_k": 50}}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)
    assert a.usage.completion_tokens >= 3

    # completions logprobs: one entry per token, top-2 alternatives
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(t <= 0 for t in lp.token_logprobs) and all(2 <= len(d) <= 3 for d in lp.top_logprobs)

    # chat logprobs
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_64_concurrent_clients(server):
    """Mixed prompt lengths and max_tokens, streaming and not, chat and completions, all at once: each
    client gets its own greedy answer, with the right finish_reason and usage."""
    subjects = ["cats", "the sea", "rain", "a red car", "mountains", "bread", "music", "the moon"]
    prompts, max_toks = [], []
    for i in range(64):
        filler = " Please be brief." * (i % 5) * 2  # mixed lengths
        prompts.append(f"Request {i}: write one sentence about {subjects[i % 8]}.{filler}\nAnswer:")
        max_toks.append(3 + (i % 4) * 2)  # 3, 5, 7, 9
    refs = {}
    for mt in sorted(set(max_toks)):
        idx = [i for i in range(64) if max_toks[i] == mt]
        for i, out in zip(idx, _greedy(server, [prompts[i] for i in idx], mt)):
            refs[i] = out

    async def one(client, i):
        kw = {"model": server.model, "prompt": prompts[i], "max_tokens": max_toks[i], "temperature": 0}
        if i % 2:
            stream = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
            text, finish, usage = "", None, None
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].text
                    finish = ch.choices[0].finish_reason or finish
                if ch.usage:
                    usage = ch.usage
            return i, text, finish, usage
        r = await client.completions.create(**kw)
        return i, r.choices[0].text, r.choices[0].finish_reason, r.usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                    timeout=300, http_client=httpx.AsyncClient(
                                        limits=httpx.Limits(max_connections=100), timeout=300))
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    t0 = time.time()
    results = asyncio.run(main())
    elapsed = time.time() - t0
    assert sorted(r[0] for r in results) == list(range(64))
    for i, text, finish, usage in results:
        ref = refs[i].outputs[0]
        assert finish == ref.finish_reason, (i, finish, ref.finish_reason)
        assert finish in ("stop", "length")
        assert usage.prompt_tokens == len(refs[i].prompt_token_ids), i
        assert usage.completion_tokens == len(ref.token_ids), i
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert text == ref.text, (i, text, ref.text)
    stats = server.wait_idle()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert server.state.async_engine.peak_batch >= 16  # the clients were batched together
    print(f"64 concurrent clients: {elapsed:.1f} s, peak batch {server.state.async_engine.peak_batch}")


BAD_INPUTS = [
    # (endpoint, raw body, status, param or None)
    ("completions", b'{"prompt": "hi", "max_tokens": 5', 400, None),  # malformed JSON
    ("completions", b"[1, 2]", 400, None),  # not an object
    ("completions", b"", 400, None),
    ("completions", b'{"prompt": "hi", "max_tokens": "5"}', 400, "max_tokens"),  # wrong types
    ("completions", b'{"prompt": 5}', 400, "prompt"),
    ("completions", b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
    ("chat/completions", b'{"messages": "hello"}', 400, "messages"),
    ("chat/completions", b'{"messages": [{"content": "hi"}]}', 400, None),
    ("completions", b'{"prompt": "hi", "model": "gpt-4"}', 404, "model"),  # unknown model
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "nope"}', 404, "model"),
    ("completions", b'{"prompt": ""}', 400, "prompt"),  # empty prompt / messages
    ("completions", b'{"prompt": []}', 400, "prompt"),
    ("completions", b'{"prompt": ["a", ""]}', 400, "prompt"),
    ("chat/completions", b'{"messages": []}', 400, "messages"),
    ("completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),  # max_tokens
    ("completions", b'{"prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ("completions", b'{"prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9000}',
     400, "max_completion_tokens"),
    ("completions", b'{"prompt": "hi", "temperature": 2.5}', 400, "temperature"),  # ranges
    ("completions", b'{"prompt": "hi", "temperature": -0.1}', 400, "temperature"),
    ("completions", b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    ("completions", b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 2}', 400, "top_p"),
    ("completions", b'{"prompt": "hi", "n": 1000}', 400, "n"),  # n too large
    ("completions", b'{"prompt": "hi", "n": 0}', 400, "n"),
    ("completions", b'{"prompt": "hi", "logprobs": 99}', 400, "logprobs"),
    ("completions", b'{"prompt": "hi", "presence_penalty": 3}', 400, "presence_penalty"),
    ("completions", b'{"prompt": [1, 99999999]}', 400, None),  # token id outside the vocabulary
    ("completions", b'{"prompt": "\xff\xfe bad"}', 400, None),  # invalid UTF-8
    ("completions", b'{"prompt": "\\ud800"}', 400, None),  # lone surrogate
    ("chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
    ("completions", b'{"prompt": "hi", "max_tokens": 1e10}', 400, "max_tokens"),
    ("completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("completions", b'{"prompt": "hi", "seed": 1180591620717411303424}', 400, "seed"),
    ("completions", b'{"prompt": "hi", "stop": ["a", 5]}', 400, "stop"),
    ("completions", b'{"prompt": "hi", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    ("completions", b'{"prompt": "hi", "echo": true, "logprobs": 1}', 400, "echo"),
    ("completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),
    ("chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, None),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400,
     "top_logprobs"),
]


def _check_error(resp, status, param=None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, body


@pytest.mark.parametrize("endpoint,body,status,param", BAD_INPUTS,
                         ids=[f"{i}-{b[:30]!r}" for i, (_, b, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input(server, endpoint, body, status, param):
    resp = httpx.post(f"{server.base_url}/v1/{endpoint}", content=body,
                      headers={"Content-Type": "application/json"}, timeout=60)
    _check_error(resp, status, param)


def test_bad_input_large_and_health(server):
    # a prompt longer than the context
    long_prompt = "hello " * (server.state.max_model_len + 10)
    resp = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}, timeout=60)
    _check_error(resp, 400, "prompt")
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    # an oversized body (the test server allows 1 MiB)
    resp = httpx.post(f"{server.base_url}/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    _check_error(resp, 413)
    # the same, sent chunked (no Content-Length)
    resp = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                      content=iter([b'{"prompt": "', b"a" * (2 << 20), b'"}']))
    _check_error(resp, 413)
    # unknown route and method
    _check_error(httpx.get(f"{server.base_url}/v1/nothing"), 404)
    _check_error(httpx.get(f"{server.base_url}/v1/completions"), 405)
    # the official client surfaces these as typed errors
    client = _client(server)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[], max_tokens=2)
    # still healthy, still serving
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_disconnect_mid_stream_frees_blocks(server):
    """10 clients drop their streams after the first tokens: their requests are aborted, the block
    manager is consistent and every block is free once idle; the server keeps serving."""

    async def drop(i):
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 400, "ignore_eos": True,
                "temperature": 0.7, "seed": i, "stream": True}
        if i % 2:
            url, body = "chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                             "messages": [{"role": "user", "content": body["prompt"]}]}
        else:
            url = "completions"
        async with httpx.AsyncClient(timeout=120) as client, \
                client.stream("POST", f"{server.base_url}/v1/{url}", json=body) as resp:
            assert resp.status_code == 200
            n = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    n += 1
                    if n >= 3:
                        break  # leaving the block closes the connection mid-stream
        return n

    async def main():
        return await asyncio.gather(*(drop(i) for i in range(10)))

    assert asyncio.run(main()) == [3] * 10
    stats = server.wait_idle(timeout=60)
    assert stats["running"] == 0 and stats["waiting"] == 0
    server.run_in_engine(lambda e: e.check_integrity())
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
    # far fewer tokens were generated than the 10 x 400 asked for
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "fdpp:kv_cache_usage_perc" in metrics
    aborted = [float(line.rpartition(" ")[2]) for line in metrics.splitlines()
               if line.startswith("fdpp:request_success_total") and 'finished_reason="abort"' in line]
    assert aborted and aborted[0] >= 10
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_disconnect_non_streaming(server):
    """A non-streaming client that times out is aborted too."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", timeout=1.5,
                   json={"prompt": "Write a long essay.", "max_tokens": 2000, "ignore_eos": True})
    stats = server.wait_idle(timeout=30)
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats


def test_metrics(server):
    assert httpx.post(f"{server.base_url}/v1/completions", json={"prompt": ""}).status_code == 400
    ok = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200
    text = httpx.get(server.base_url + "/metrics").text
    for name in ["fdpp:http_requests_total", "fdpp:prompt_tokens_total", "fdpp:generation_tokens_total",
                 "fdpp:time_to_first_token_seconds_bucket", "fdpp:inter_token_latency_seconds_bucket",
                 "fdpp:num_requests_running", "fdpp:num_requests_waiting", "fdpp:kv_cache_usage_perc",
                 "fdpp:attention_fallback_rate"]:
        assert name in text, name
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    gen = [v for k, v in samples.items() if k.startswith("fdpp:generation_tokens_total")]
    assert gen and gen[0] > 0
    assert any(k.startswith('fdpp:http_requests_total{endpoint="/v1/completions",method="POST",status="400"')
               for k in samples)


# ---- a tiny random-weight model ------------------------------------------------------------------
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
            cached = usage.pop("prompt_tokens_details")["cached_tokens"]
            assert usage == {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}
            assert 0 <= cached < 20  # at least the last prompt token is computed
            assert len(tokens) == 30
        # a request that could never fit the cache is refused up front, not failed mid-flight
        r = httpx.post(srv.base_url + "/v1/completions", headers=headers,
                       json={"prompt": [5] * 20, "max_tokens": 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_cache_too_small"
        stats = srv.wait_idle()
        assert stats["num_preemptions"] > 0  # the cache really was full
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        srv.run_in_engine(lambda e: e.check_integrity())


# ---- AsyncEngine over a fake engine ----------------------------------------------------------------
class FakeEngine:
    """LLMEngine's request API in plain Python: each step appends one token to every request."""

    def __init__(self):
        self.reqs = {}
        self.peak = 0
        self.fail_next_step = False
        self.thread_ids = set()

    def add_request(self, rid, ids, params):
        self.thread_ids.add(threading.get_ident())
        if rid in self.reqs:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        self.reqs[rid] = (list(ids), params, [])

    def abort_request(self, rid):
        self.thread_ids.add(threading.get_ident())
        return self.reqs.pop(rid, None) is not None

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        time.sleep(0.002)
        self.peak = max(self.peak, len(self.reqs))
        outs = []
        for rid, (ids, p, gen) in list(self.reqs.items()):
            gen.append(len(gen))
            fin = len(gen) >= p.max_tokens
            c = CompletionOutput(0, "t" * len(gen), list(gen), finish_reason="length" if fin else None)
            outs.append(RequestOutput(rid, None, ids, [c], fin))
            if fin:
                del self.reqs[rid]
        return outs


def _drive(fake, coro_fn):
    from fdpp.server.async_engine import AsyncEngine

    aeng = AsyncEngine(fake, idle_poll_s=0.01)
    aeng.start()
    try:
        return asyncio.run(coro_fn(aeng))
    finally:
        aeng.shutdown()


def test_async_engine_batches_and_aborts():
    fake = FakeEngine()

    async def main(aeng):
        async def run(i, n_tokens):
            group = aeng.submit([(f"r{i}", [1, 2], SamplingParams(max_tokens=n_tokens))])
            last = None
            async for _, out in group:
                last = out
            return i, last.outputs[0].token_ids, last.finished

        results = await asyncio.gather(*(run(i, 5 + i % 7) for i in range(40)))
        for i, ids, fin in results:
            assert fin and ids == list(range(5 + i % 7))

        # leaving early aborts; a slow reader sees only the latest output
        group = aeng.submit([("slow", [1], SamplingParams(max_tokens=10_000))])
        async for _, out in group:
            await asyncio.sleep(0.05)
            if len(out.outputs[0].token_ids) > 20:  # several steps happened during one read
                break
        await asyncio.sleep(0.05)
        assert await aeng.call(lambda e: "slow" not in e.reqs)

        # a duplicate id fails that request only
        g1 = aeng.submit([("dup", [1], SamplingParams(max_tokens=50))])
        g2 = aeng.submit([("dup", [1], SamplingParams(max_tokens=50))])
        with pytest.raises(InvalidRequestError):
            async for _ in g2:
                pass
        assert [o.finished async for _, o in g1][-1]

    _drive(fake, main)
    assert fake.peak >= 20  # continuous batching
    assert len(fake.thread_ids) == 1  # the engine is touched from one thread only
    assert not fake.reqs


def test_async_engine_step_failure_and_shutdown():
    from fdpp.server.async_engine import AsyncEngine, EngineDeadError, RequestAbortedError

    fake = FakeEngine()

    async def main(aeng):
        group = aeng.submit([("a", [1], SamplingParams(max_tokens=10_000)), ("b", [1], SamplingParams(max_tokens=3))])
        await asyncio.sleep(0.02)
        fake.fail_next_step = True
        with pytest.raises(RequestAbortedError, match="boom"):
            async for _ in group:
                pass
        assert not fake.reqs  # every request in flight was aborted
        # the loop keeps serving
        outs = [o async for _, o in aeng.submit([("c", [1], SamplingParams(max_tokens=2))])]
        assert outs[-1].finished

    _drive(fake, main)

    aeng = AsyncEngine(FakeEngine(), idle_poll_s=0.01)
    aeng.start()

    async def shutdown_midway():
        group = aeng.submit([("long", [1], SamplingParams(max_tokens=10_000))])
        n = 0
        with pytest.raises(RequestAbortedError, match="shutting down"):
            async for _ in group:
                n += 1
                if n == 3:
                    await asyncio.to_thread(aeng.shutdown)
        with pytest.raises(EngineDeadError):
            aeng.submit([("late", [1], SamplingParams(max_tokens=1))])

    asyncio.run(shutdown_midway())
    assert not aeng.is_running and not aeng.engine.reqs
