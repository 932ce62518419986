"""The OpenAI-compatible HTTP API (FastAPI) over one ``AsyncEngine``.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streaming over SSE and not),
GET /v1/models, GET /health, GET /version, GET /metrics (Prometheus).

``build_app(llm)`` takes an ``fdpp.LLM`` (or an ``LLMEngine``) that is already loaded, so a process (or
a test) can serve the model it holds. From then on only the engine thread touches the engine.

Errors are OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status; a
bad request never affects the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fdpp.errors import InvalidRequestError
from fdpp.outputs import RequestOutput
from fdpp.sampling_params import SamplingParams
from fdpp.server.async_engine import AsyncEngine, EngineDeadError, RequestAbortedError
from fdpp.server.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    UsageInfo,
    random_id,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_N = 16
MAX_LOGPROBS = 20
MAX_PROMPTS = 256
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - 1024

_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version",
              "/tokenize", "/detokenize")


# ---- errors ----------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    t = type or ("invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=t, param=param, code=code)).model_dump()


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- metrics ---------------------------------------------------------------------------------------
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (several apps may live in one process)."""

    def __init__(self, model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        lbl = ["model_name"]
        self.model_name = model_name
        self.requests = Counter("fdpp:http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.request_success = Counter("fdpp:request_success", "finished generation requests by finish reason",
                                       lbl + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("fdpp:prompt_tokens", "prompt tokens admitted", lbl, registry=r)
        self.generation_tokens = Counter("fdpp:generation_tokens", "tokens generated", lbl, registry=r)
        self.ttft = Histogram("fdpp:time_to_first_token_seconds", "time from arrival to the first generated token",
                              lbl, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fdpp:inter_token_latency_seconds", "time between generated tokens of a sequence",
                             lbl, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fdpp:e2e_request_latency_seconds", "time from arrival to the last token",
                             lbl, buckets=_E2E_BUCKETS, registry=r)
        self.running = Gauge("fdpp:num_requests_running", "sequences in the running batch", lbl, registry=r)
        self.waiting = Gauge("fdpp:num_requests_waiting", "sequences waiting for KV blocks or a batch slot",
                             lbl, registry=r)
        self.kv_usage = Gauge("fdpp:kv_cache_usage_perc", "fraction of KV cache blocks in use (0..1)", lbl,
                              registry=r)
        self.free_blocks = Gauge("fdpp:kv_cache_free_blocks", "free KV cache blocks", lbl, registry=r)
        self.total_blocks = Gauge("fdpp:kv_cache_total_blocks", "KV cache blocks", lbl, registry=r)
        self.preemptions = Gauge("fdpp:num_preemptions", "sequences preempted so far (KV cache full)", lbl,
                                 registry=r)
        self.fallback_rate = Gauge("fdpp:attention_fallback_rate",
                                   "fraction of attention rows recomputed by the unified-max fallback", lbl,
                                   registry=r)
        self.fallback_checked = Gauge("fdpp:attention_rows_checked",
                                      "attention rows checked by the unified-max kernels", lbl, registry=r)
        self.fallback_rows = Gauge("fdpp:attention_rows_fallback",
                                   "attention rows recomputed by the synchronized fallback", lbl, registry=r)
        self.engine_up = Gauge("fdpp:engine_up", "1 while the engine loop runs", lbl, registry=r)
        # prefix cache, in tokens as vLLM's (exposed as ..._total); incremented by the engine's deltas
        self.prefix_queries = Counter("fdpp:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                      lbl, registry=r)
        self.prefix_hits = Counter("fdpp:prefix_cache_hits", "prompt tokens found in the prefix cache", lbl,
                                   registry=r)
        self._prefix_seen = (0, 0)

    def set_engine(self, stats: dict[str, Any] | None, fb: dict[str, Any] | None, up: bool) -> None:
        m = self.model_name
        self.engine_up.labels(m).set(1 if up else 0)
        if stats:
            self.running.labels(m).set(stats.get("running", 0))
            self.waiting.labels(m).set(stats.get("waiting", 0))
            self.kv_usage.labels(m).set(stats.get("kv_usage", 0.0))
            self.free_blocks.labels(m).set(stats.get("num_free_blocks", 0))
            self.total_blocks.labels(m).set(stats.get("num_total_blocks", 0))
            self.preemptions.labels(m).set(stats.get("num_preemptions", 0))
            q, h = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
            self.prefix_queries.labels(m).inc(max(0, q - self._prefix_seen[0]))
            self.prefix_hits.labels(m).inc(max(0, h - self._prefix_seen[1]))
            self._prefix_seen = (q, h)
        if fb:
            self.fallback_rate.labels(m).set(fb.get("rate", 0.0))
            self.fallback_checked.labels(m).set(fb.get("rows_checked", 0))
            self.fallback_rows.labels(m).set(fb.get("rows_fallback", 0))


def _engine_snapshot(engine: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    stats = engine.stats()
    try:
        from fdpp.ops.attention import fallback_stats

        fb = fallback_stats()
    except Exception:  # noqa: BLE001 - metrics must not fail the scrape
        fb = None
    return stats, fb


# ---- ASGI guard: body size limit, API key, request counting ----------------------------------------
class _Guard:
    """Pure ASGI middleware: rejects bodies over ``max_body_bytes`` (413) before the app sees them,
    checks the API key, and counts every response by endpoint and status."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        method = scope.get("method", "GET")
        status_box = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counting_send)
        finally:
            self.state.metrics.requests.labels(endpoint, method, str(status_box[0])).inc()

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        st = self.state
        if st.api_key and scope.get("path", "").startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {st.api_key}":
                resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                      code="invalid_api_key")
                return await resp(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = st.max_body_bytes
        too_big = error_response(
            413, f"the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)",
            code="request_too_large")
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return await too_big(scope, receive, send)
                except ValueError:
                    return await error_response(400, "invalid Content-Length header")(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await too_big(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- server state ----------------------------------------------------------------------------------
@dataclass
class ServerState:
    async_engine: AsyncEngine
    engine: Any  # the LLMEngine: read-only attributes (tokenizer, max_model_len, model_config) only
    served_model_names: list[str]
    max_body_bytes: int
    max_n: int
    api_key: str | None
    metrics: ServerMetrics
    root: str
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def kv_capacity_tokens(self) -> int:
        bm = self.engine.block_manager  # sizes only: fixed at start-up
        return int(bm.num_blocks) * int(bm.block_size)

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = t
        return t


# ---- request parsing and validation ----------------------------------------------------------------
async def _parse(request: Request, model_cls: type[BaseModel]) -> Any:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the request body is not valid UTF-8 (invalid byte at offset {e.start})",
                   code="invalid_utf8") from None
    if not text.strip():
        raise _bad("the request body is empty; send a JSON object", code="invalid_json")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                   code="invalid_json") from None
    except RecursionError:
        raise _bad("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise _bad(f"the request body must be a JSON object, not {type(obj).__name__}", code="invalid_json")
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if not _is_union_tag(x))
        inp = repr(err.get("input"))
        if len(inp) > 60:
            inp = inp[:57] + "..."
        msg = f"{loc}: {err.get('msg')} (got {inp})" if loc else f"{err.get('msg')}"
        if err.get("type") == "missing":
            msg = f"{loc}: this field is required"
        code = "invalid_type" if err.get("type") != "missing" else "missing_field"
        raise _bad(msg, param=loc or None, code=code) from None


def _is_union_tag(x: Any) -> bool:
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict"))


def _check_text(s: str, param: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{param} is not valid UTF-8 (it holds an unpaired surrogate)", param=param,
                   code="invalid_utf8") from None


def _check_model(st: ServerState, model: str | None) -> str:
    if model is None:
        return st.model_name
    if model not in st.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist. Served models: {', '.join(st.served_model_names)}",
                       param="model", code="model_not_found")
    return model


def _range(value: Any, lo: float, hi: float, name: str, *, lo_open: bool = False) -> None:
    ok = value is not None and not (isinstance(value, float) and math.isnan(value))
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _bad(f"{name} must be in {interval}, got {value}", param=name, code="invalid_value")


def _sampling_params(st: ServerState, req: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    _range(temperature, 0.0, 2.0, "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    _range(top_p, 0.0, 1.0, "top_p", lo_open=True)
    top_k = -1 if req.top_k is None or req.top_k == 0 else req.top_k
    if top_k < -1:
        raise _bad(f"top_k must be -1 or 0 (off) or >= 1, got {req.top_k}", param="top_k", code="invalid_value")
    min_p = 0.0 if req.min_p is None else req.min_p
    _range(min_p, 0.0, 1.0, "min_p")
    pp = req.presence_penalty or 0.0
    fp = req.frequency_penalty or 0.0
    _range(pp, -2.0, 2.0, "presence_penalty")
    _range(fp, -2.0, 2.0, "frequency_penalty")
    rp = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if not rp > 0 or math.isinf(rp):
        raise _bad(f"repetition_penalty must be > 0, got {rp}", param="repetition_penalty", code="invalid_value")
    if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
        raise _bad(f"seed must be a 64-bit integer, got {req.seed}", param="seed", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    for i, s in enumerate(stops):
        if not s:
            raise _bad("stop strings must be non-empty", param="stop", code="invalid_value")
        _check_text(s, f"stop[{i}]" if not isinstance(req.stop, str) else "stop")
    vocab = st.engine.model_config.vocab_size
    for t in req.stop_token_ids or []:
        if not 0 <= t < vocab:
            raise _bad(f"stop_token_ids: {t} is outside the vocabulary (0..{vocab - 1})", param="stop_token_ids",
                       code="invalid_value")
    min_tokens = req.min_tokens or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise _bad(f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}", param="min_tokens",
                   code="invalid_value")
    try:
        return SamplingParams(
            n=req.n if req.n is not None else 1,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=rp,
            presence_penalty=pp,
            frequency_penalty=fp,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=stops or None,
            stop_token_ids=list(req.stop_token_ids or []),
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            ignore_eos=bool(req.ignore_eos),
            seed=req.seed,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens is not False,
        )
    except InvalidRequestError as e:
        raise _bad(str(e), code="invalid_value") from None


def _check_common(st: ServerState, req: Any) -> int:
    """Checks that need no prompt; returns n."""
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options is only allowed when stream is true", param="stream_options",
                   code="invalid_value")
    n = 1 if req.n is None else req.n
    if n < 1:
        raise _bad(f"n must be at least 1, got {n}", param="n", code="invalid_value")
    if n > st.max_n:
        raise _bad(f"n must be at most {st.max_n} on this server, got {n}", param="n", code="invalid_value")
    if req.best_of is not None and req.best_of != n:
        raise _bad("best_of is not supported (leave it out or set it equal to n)", param="best_of",
                   code="unsupported_parameter")
    if req.logit_bias:
        raise _bad("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    return n


def _check_max_tokens(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise _bad(f"{name} must be at least 1, got {value}", param=name, code="invalid_value")


def _resolve_max_tokens(st: ServerState, requested: int | None, prompt_len: int, name: str) -> int:
    ctx = st.max_model_len
    if prompt_len >= ctx:
        raise _bad(
            f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_len} tokens "
            "(the prompt plus at least one generated token must fit). Please reduce the length of the prompt.",
            param="messages" if name == "max_completion_tokens" else "prompt", code="context_length_exceeded")
    if requested is None:
        requested = ctx - prompt_len
        cap = st.kv_capacity_tokens
        if prompt_len + requested > cap:  # a small KV cache: fill what one sequence can hold
            requested = max(1, cap - prompt_len)
    elif prompt_len + requested > ctx:
        raise _bad(
            f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + requested} "
            f"tokens ({prompt_len} in the prompt, {requested} for the completion). Please reduce the length of "
            f"the prompt or {name}.", param=name, code="context_length_exceeded")
    cap = st.kv_capacity_tokens
    if prompt_len + requested > cap:
        # One sequence larger than the whole KV cache could never be scheduled (the engine would fail).
        raise _bad(
            f"the prompt ({prompt_len} tokens) plus {name}={requested} needs {prompt_len + requested} tokens of KV "
            f"cache but this server's cache holds {cap}; lower {name} or restart the server with a larger cache",
            param=name, code="kv_cache_too_small")
    return requested


async def _encode(st: ServerState, text: str) -> list[int]:
    if st.tokenizer is None:
        raise _bad("this model has no tokenizer: send the prompt as token ids", param="prompt")
    if len(text) > 20_000:  # keep the event loop responsive for long prompts
        return list(await asyncio.to_thread(st.tokenizer.encode, text))
    return list(st.tokenizer.encode(text))


def _check_ids(st: ServerState, ids: list[int], param: str) -> None:
    vocab = st.engine.model_config.vocab_size
    for t in ids:
        if not 0 <= t < vocab:
            raise _bad(f"{param}: token id {t} is outside the vocabulary (0..{vocab - 1})", param=param,
                       code="invalid_value")


async def _completion_prompts(st: ServerState, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) for each prompt of a completion request."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise _bad("prompt must not be empty", param="prompt", code="empty_prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > MAX_PROMPTS:
        raise _bad(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    out: list[tuple[str | None, list[int]]] = []
    for i, p in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise _bad(f"{param} must not be empty", param="prompt", code="empty_prompt")
            _check_text(p, param)
            ids = await _encode(st, p)
            if not ids:
                raise _bad(f"{param} encodes to no tokens", param="prompt", code="empty_prompt")
            out.append((p, ids))
        else:
            if not p:
                raise _bad(f"{param} must not be empty", param="prompt", code="empty_prompt")
            ids = list(p)
            _check_ids(st, ids, param)
            out.append((None, ids))
    return out


def _chat_conversation(req: Any) -> list[dict[str, Any]]:
    if not req.messages:
        raise _bad("messages must not be empty", param="messages", code="empty_messages")
    conv = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise _bad(f"messages[{i}].content[{j}]: only text content parts are supported, got type "
                               f"{part.type!r}", param=f"messages[{i}].content", code="unsupported_content")
                parts.append(part.text)
            content = "\n".join(parts)
        else:
            content = m.content or ""
        _check_text(content, f"messages[{i}].content")
        _check_text(m.role, f"messages[{i}].role")
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        conv.append(msg)
    return conv


# ---- logprobs conversion ---------------------------------------------------------------------------
def _sorted_top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def _completion_logprobs(st: ServerState, token_ids: list[int], entries: list[dict[int, float]], k: int,
                         offset: int) -> CompletionLogProbs:
    lp = CompletionLogProbs()
    for tid, entry in zip(token_ids, entries):
        text = st.token_text(tid)
        lp.tokens.append(text)
        lp.token_logprobs.append(entry.get(tid))
        top = {st.token_text(t): v for t, v in _sorted_top(entry, k)}
        top.setdefault(text, entry.get(tid, float("-inf")))
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def _chat_logprobs(st: ServerState, token_ids: list[int], entries: list[dict[int, float]],
                   k: int) -> ChatCompletionLogProbs:
    content = []
    for tid, entry in zip(token_ids, entries):
        text = st.token_text(tid)
        top = [TopLogprob(token=st.token_text(t), logprob=v, bytes=list(st.token_text(t).encode("utf-8", "replace")))
               for t, v in _sorted_top(entry, k)]
        content.append(ChatCompletionLogProb(token=text, logprob=entry.get(tid, float("-inf")),
                                             bytes=list(text.encode("utf-8", "replace")), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)


# ---- driving a request group -----------------------------------------------------------------------
@dataclass
class _Tracker:
    """Per-request metrics: TTFT (arrival to the request's first token), inter-token latency (per
    sequence: a request with n choices or several prompts has several), token counters, finish reasons."""

    st: ServerState
    arrival: float
    num_seqs: int = 1
    counts: dict[tuple[int, int], int] = field(default_factory=dict)
    last: dict[tuple[int, int], float] = field(default_factory=dict)
    first: bool = True
    finished: set = field(default_factory=set)

    def update(self, idx: int, out: RequestOutput) -> None:
        m = self.st.metrics
        name = m.model_name
        now = time.time()
        total_new = 0
        for c in out.outputs:
            key = (idx, c.index)
            n_prev = self.counts.get(key, 0)
            new = len(c.token_ids) - n_prev
            if new > 0:
                total_new += new
                self.counts[key] = n_prev + new
                if key in self.last:
                    gap = (now - self.last[key]) / new
                    for _ in range(new):
                        m.itl.labels(name).observe(gap)
                self.last[key] = now
            if c.finish_reason is not None and key not in self.finished:
                self.finished.add(key)
                m.request_success.labels(name, c.finish_reason).inc()
        if total_new:
            m.generation_tokens.labels(name).inc(total_new)
            if self.first:
                self.first = False
                m.ttft.labels(name).observe(now - self.arrival)

    def done(self) -> None:
        self.st.metrics.e2e.labels(self.st.metrics.model_name).observe(time.time() - self.arrival)

    def close(self) -> None:
        """Count the sequences that never finished (client gone, shutdown) as aborted; idempotent."""
        aborted = self.num_seqs - len(self.finished)
        if aborted > 0:
            self.st.metrics.request_success.labels(self.st.metrics.model_name, "abort").inc(aborted)
            self.finished.update(("abort", i) for i in range(aborted))


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _collect(group: Any, tracker: _Tracker, num_prompts: int) -> list[RequestOutput]:
    final: dict[int, RequestOutput] = {}
    try:
        async for idx, out in group:
            tracker.update(idx, out)
            final[idx] = out
    finally:
        group.close()
        tracker.close()
    tracker.done()
    return [final[i] for i in range(num_prompts)]


async def _collect_or_disconnect(request: Request, group: Any, tracker: _Tracker,
                                 num_prompts: int) -> list[RequestOutput] | None:
    """Collect the final outputs; None if the client went away first (the requests are aborted)."""
    task = asyncio.ensure_future(_collect(group, tracker, num_prompts))
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        group.close()
        raise
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    group.close()
    return None


def _usage(prompt_lens: list[int], outs: list[RequestOutput]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(o.token_ids) for r in outs for o in r.outputs)
    cached = [r.num_cached_tokens for r in outs if r.num_cached_tokens is not None]
    details = PromptTokensDetails(cached_tokens=sum(cached)) if cached else None
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=details)


def _sse(obj: BaseModel | dict) -> str:
    if isinstance(obj, BaseModel):
        data = obj.model_dump_json(exclude_unset=False)
    else:
        data = json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def _exc_to_error(e: BaseException) -> tuple[int, dict[str, Any]]:
    if isinstance(e, APIError):
        return e.status, error_body(e.status, e.message, param=e.param, code=e.code, type=e.type)
    if isinstance(e, InvalidRequestError):
        return 400, error_body(400, str(e), code="invalid_request")
    if isinstance(e, EngineDeadError):
        return 503, error_body(503, str(e), code="engine_unavailable", type="service_unavailable")
    if isinstance(e, RequestAbortedError):
        return 503, error_body(503, str(e), code="request_aborted", type="service_unavailable")
    return 500, error_body(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


@dataclass
class _ChoiceState:
    sent_chars: int = 0
    sent_tokens: int = 0
    finished: bool = False
    started: bool = False


def _stream_deltas(out_choice: Any, cs: _ChoiceState, holdback: int) -> tuple[str, list[int], int, bool]:
    """New text (holding back a possible stop-string prefix), new token ids, their start, finished."""
    finished = out_choice.finish_reason is not None
    text = out_choice.text
    limit = len(text) if finished else max(cs.sent_chars, len(text) - holdback)
    delta = text[cs.sent_chars:limit] if limit > cs.sent_chars else ""
    start = cs.sent_tokens
    new_ids = list(out_choice.token_ids[start:])
    return delta, new_ids, start, finished


# ---- the app ---------------------------------------------------------------------------------------
def build_app(llm: Any, *, served_model_names: list[str] | str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_n: int = DEFAULT_MAX_N,
              api_key: str | None = None, async_engine: AsyncEngine | None = None) -> FastAPI:
    """A FastAPI app serving ``llm`` (an ``fdpp.LLM`` or ``LLMEngine``).

    The engine loop starts in a background thread with the app (lifespan start-up) and stops at
    shutdown, aborting what is in flight. ``app.state.fdpp`` is the ``ServerState`` (``.async_engine``).

    Why a background thread and not the main one (the thread that loaded the model): on a small CPU
    box torch's OpenMP pool is about 2x faster for the thread that created it while nothing else runs,
    but with the HTTP thread competing for the cores its spinning workers stall steps for seconds
    (measured on 2 cores: 16 sequences x 12 tokens 2.2 s alone, 30 s next to a lightly busy Python
    thread). A pool created by a later thread waits passively: steady, if slower.
    """
    engine = getattr(llm, "engine", llm)
    if isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    root = getattr(engine.config, "model", None) or "SmolLM2-135M-Instruct"
    names = list(served_model_names or []) or [_default_model_name(engine)]
    aeng = async_engine or AsyncEngine(engine)
    st = ServerState(aeng, engine, names, int(max_body_bytes), int(max_n), api_key, ServerMetrics(names[0]),
                     str(root))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aeng.start()
        try:
            yield
        finally:
            await asyncio.to_thread(aeng.shutdown)

    app = FastAPI(title="fdpp OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.fdpp = st

    # -- error handlers --
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, param=e.param, code=e.code, type=e.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = str(e.detail)
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /v1/completions, /v1/chat/completions, /v1/models"
        return error_response(e.status_code, msg, code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, str(e), code="invalid_request")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        status, body = _exc_to_error(e)
        return JSONResponse(body, status_code=status)

    # -- simple endpoints --
    @app.get("/health")
    async def health() -> Response:
        if aeng.is_running:
            return JSONResponse({"status": "ok"})
        return error_response(503, aeng._dead_reason(), code="engine_unavailable", type="service_unavailable")

    @app.get("/version")
    async def version() -> JSONResponse:
        from fdpp import __version__

        return JSONResponse({"version": __version__})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [ModelCard(id=n, root=st.root, max_model_len=st.max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> JSONResponse:
        if model_id not in names:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(ModelCard(id=model_id, root=st.root, max_model_len=st.max_model_len).model_dump())

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        _check_model(st, req.model)
        if st.tokenizer is None:
            raise _bad("this model has no tokenizer", code="no_tokenizer")
        if (req.prompt is None) == (req.messages is None):
            raise _bad("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            from fdpp.tokenizer import apply_chat_template

            try:
                ids = apply_chat_template(st.tokenizer, _chat_conversation(req),
                                          add_generation_prompt=req.add_generation_prompt is not False)
            except InvalidRequestError as e:
                raise _bad(str(e), param="messages", code="invalid_messages") from None
        else:
            _check_text(req.prompt, "prompt")
            if req.add_special_tokens is False:
                ids = list(st.tokenizer.encode(req.prompt, add_special_tokens=False))
            else:
                ids = await _encode(st, req.prompt)
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=st.max_model_len, tokens=ids).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        _check_model(st, req.model)
        if st.tokenizer is None:
            raise _bad("this model has no tokenizer", code="no_tokenizer")
        _check_ids(st, req.tokens, "tokens")
        return JSONResponse(DetokenizeResponse(prompt=st.tokenizer.decode(req.tokens)).model_dump())

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = fb = None
        if aeng.is_running:
            with contextlib.suppress(Exception):
                stats, fb = await asyncio.wait_for(aeng.call(_engine_snapshot), timeout=30)
        st.metrics.set_engine(stats, fb, aeng.is_running)
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- completions --
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.time()
        req: CompletionRequest = await _parse(request, CompletionRequest)
        model = _check_model(st, req.model)
        n = _check_common(st, req)
        _check_max_tokens(req.max_tokens, "max_tokens")
        if req.suffix:
            raise _bad("suffix is not supported", param="suffix", code="unsupported_parameter")
        k = req.logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise _bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {k}", param="logprobs", code="invalid_value")
        if req.echo and k is not None:
            raise _bad("echo with logprobs is not supported (prompt logprobs are not computed)", param="echo",
                       code="unsupported_parameter")
        prompts = await _completion_prompts(st, req.prompt)
        if len(prompts) * n > MAX_PROMPTS:
            raise _bad(f"len(prompt) x n must be at most {MAX_PROMPTS}", param="n", code="invalid_value")
        subs = []
        rid = random_id("cmpl")
        for i, (_, ids) in enumerate(prompts):
            mt = _resolve_max_tokens(st, req.max_tokens, len(ids), "max_tokens")
            sp = _sampling_params(st, req, mt, k)
            subs.append((f"{rid}-{i}", ids, sp))
        for _, ids, _ in subs:
            st.metrics.prompt_tokens.labels(st.model_name).inc(len(ids))
        group = aeng.submit(subs)
        tracker = _Tracker(st, arrival, num_seqs=len(subs) * n)
        created = int(arrival)
        prompt_texts = [t if t is not None else (st.tokenizer.decode(ids) if st.tokenizer is not None else "")
                        for t, ids in prompts] if req.echo else None
        prompt_lens = [len(ids) for _, ids in prompts]
        holdback = max((len(s) for s in subs[0][2].stops), default=1) - 1

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            continuous = include_usage and bool(req.stream_options.continuous_usage_stats)

            async def gen() -> AsyncIterator[str]:
                states: dict[int, _ChoiceState] = {}
                final: dict[int, RequestOutput] = {}
                async for idx, out in group:
                    tracker.update(idx, out)
                    final[idx] = out
                    choices = []
                    for c in out.outputs:
                        ci = idx * n + c.index
                        cs = states.setdefault(ci, _ChoiceState())
                        if cs.finished:
                            continue
                        delta, new_ids, start, fin = _stream_deltas(c, cs, holdback)
                        prefix = prompt_texts[idx] if prompt_texts is not None and not cs.started else ""
                        lp = None
                        if k is not None and new_ids:
                            lp = _completion_logprobs(st, new_ids, (c.logprobs or [])[start:], k, cs.sent_chars)
                        cs.sent_tokens = len(c.token_ids)
                        if not delta and not prefix and not fin and lp is None:
                            continue
                        cs.started = True
                        cs.sent_chars += len(delta)
                        cs.finished = fin
                        delta = prefix + delta
                        choices.append(CompletionStreamChoice(
                            index=ci, text=delta, logprobs=lp, finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason))
                    if choices:
                        usage = _usage(prompt_lens, list(final.values())) if continuous else None
                        yield _sse(CompletionStreamResponse(id=rid, created=created, model=model, choices=choices,
                                                            usage=usage))
                tracker.done()
                if include_usage:
                    yield _sse(CompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                                        usage=_usage(prompt_lens, [final[i] for i in range(len(subs))])))

            return _sse_response(gen(), group, tracker)

        outs = await _collect_or_disconnect(request, group, tracker, len(subs))
        if outs is None:
            return Response(status_code=499)
        choices = []
        for idx, out in enumerate(outs):
            for c in out.outputs:
                text = c.text
                if prompt_texts is not None:
                    text = prompt_texts[idx] + text
                lp = None
                if k is not None:
                    lp = _completion_logprobs(st, c.token_ids, c.logprobs or [], k,
                                              len(prompt_texts[idx]) if prompt_texts is not None else 0)
                choices.append(CompletionResponseChoice(index=idx * n + c.index, text=text, logprobs=lp,
                                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        resp = CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                  usage=_usage(prompt_lens, outs))
        return JSONResponse(resp.model_dump())

    # -- chat completions --
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.time()
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        model = _check_model(st, req.model)
        n = _check_common(st, req)
        _check_max_tokens(req.max_tokens, "max_tokens")
        _check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
        if req.tools:
            raise _bad("tools / function calling is not supported", param="tools", code="unsupported_parameter")
        if req.response_format is not None and req.response_format.type != "text":
            raise _bad(f"response_format {req.response_format.type!r} is not supported (only 'text')",
                       param="response_format", code="unsupported_parameter")
        k: int | None = None
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise _bad(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
            if not req.logprobs:
                raise _bad("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        if req.logprobs:
            k = req.top_logprobs or 0
        conv = _chat_conversation(req)
        if st.tokenizer is None:
            raise _bad("this model has no tokenizer, so chat prompts cannot be built", param="messages")
        from fdpp.tokenizer import apply_chat_template

        try:
            ids = apply_chat_template(st.tokenizer, conv, add_generation_prompt=req.add_generation_prompt is not False)
        except InvalidRequestError as e:
            raise _bad(str(e), param="messages", code="invalid_messages") from None
        if not ids:
            raise _bad("the conversation renders to an empty prompt", param="messages", code="empty_messages")
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        mt = _resolve_max_tokens(st, requested, len(ids), name)
        sp = _sampling_params(st, req, mt, k)
        rid = random_id("chatcmpl")
        st.metrics.prompt_tokens.labels(st.model_name).inc(len(ids))
        group = aeng.submit([(rid, ids, sp)])
        tracker = _Tracker(st, arrival, num_seqs=n)
        created = int(arrival)
        holdback = max((len(s) for s in sp.stops), default=1) - 1

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            continuous = include_usage and bool(req.stream_options.continuous_usage_stats)

            async def gen() -> AsyncIterator[str]:
                states = {i: _ChoiceState() for i in range(n)}
                last: RequestOutput | None = None
                # the role first, as OpenAI does
                yield _sse(ChatCompletionStreamResponse(
                    id=rid, created=created, model=model,
                    choices=[ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             for i in range(n)]))
                async for idx, out in group:
                    tracker.update(idx, out)
                    last = out
                    choices = []
                    for c in out.outputs:
                        cs = states[c.index]
                        if cs.finished:
                            continue
                        delta, new_ids, start, fin = _stream_deltas(c, cs, holdback)
                        lp = None
                        if k is not None and new_ids:
                            lp = _chat_logprobs(st, new_ids, (c.logprobs or [])[start:], k)
                        cs.sent_tokens = len(c.token_ids)
                        if not delta and not fin and lp is None:
                            continue
                        cs.sent_chars += len(delta)
                        cs.finished = fin
                        choices.append(ChatCompletionStreamChoice(
                            index=c.index, delta=DeltaMessage(content=delta) if delta else DeltaMessage(),
                            logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                    if choices:
                        usage = _usage([len(ids)], [out]) if continuous else None
                        yield _sse(ChatCompletionStreamResponse(id=rid, created=created, model=model,
                                                                choices=choices, usage=usage))
                tracker.done()
                if include_usage and last is not None:
                    yield _sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                                            usage=_usage([len(ids)], [last])))

            return _sse_response(gen(), group, tracker)

        outs = await _collect_or_disconnect(request, group, tracker, 1)
        if outs is None:
            return Response(status_code=499)
        out = outs[0]
        choices = []
        for c in out.outputs:
            lp = _chat_logprobs(st, c.token_ids, c.logprobs or [], k) if k is not None else None
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=ChatResponseMessage(role="assistant", content=c.text), logprobs=lp,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        resp = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                      usage=_usage([len(ids)], outs))
        return JSONResponse(resp.model_dump())

    app.add_middleware(_Guard, state=st)
    return app


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that aborts its engine requests however it ends (also when the
    client leaves before the first chunk, when the body generator has not started and so cannot)."""

    def __init__(self, gen: AsyncIterator[str], group: Any, tracker: _Tracker) -> None:
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._group = group
        self._tracker = tracker

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._group.close()
            self._tracker.close()


def _sse_response(gen: AsyncIterator[str], group: Any, tracker: _Tracker) -> StreamingResponse:
    return _SSEResponse(_guarded_stream(gen, group), group, tracker)


async def _guarded_stream(events: AsyncIterator[str], group: Any) -> AsyncIterator[str]:
    """Every stream ends the same way: an error is reported in-band (the status line has already gone
    out), the request group is closed, and ``data: [DONE]`` is sent."""
    try:
        async for chunk in events:
            yield chunk
    except Exception as e:  # noqa: BLE001 - reported in-band, the stream has started
        _, body = _exc_to_error(e)
        yield _sse(body)
    finally:
        group.close()
    yield "data: [DONE]\n\n"


def _default_model_name(engine: Any) -> str:
    model = getattr(engine.config, "model", None)
    if not model:
        return "SmolLM2-135M-Instruct"
    import os

    return os.path.basename(os.path.normpath(str(model))) or str(model)
