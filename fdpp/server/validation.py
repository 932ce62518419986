"""Request parsing and the checks both generation endpoints share.

Everything here raises ``APIError`` (a 400 naming the parameter, or a 404 for an unknown model) before
anything reaches the engine. Endpoint-specific checks live with their endpoint (``completions``,
``chat``); ``sampling_params`` is the one place a request's common sampling fields become a
``SamplingParams``.
"""
from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from fdpp.errors import InvalidRequestError
from fdpp.sampling_params import SamplingParams
from fdpp.server.errors import APIError, bad_request
from fdpp.server.state import ServerState

DEFAULT_MAX_N = 16
MAX_LOGPROBS = 20
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - 1024


async def parse_body(request: Request, model_cls: type[BaseModel]) -> Any:
    """The request body as ``model_cls``; a 400 naming the field for anything that is not (a 415 for
    a body that does not say it is JSON)."""
    ctype = request.headers.get("content-type")
    if ctype is not None and not is_json_content_type(ctype):
        raise APIError(415, f"Content-Type must be application/json, got {ctype.split(';')[0].strip()!r}; send "
                       "the body as JSON with 'Content-Type: application/json'", code="unsupported_media_type")
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (invalid byte at offset {e.start})",
                          code="invalid_utf8") from None
    if not text.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                          code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(obj).__name__}", code="invalid_json")
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
        raise bad_request(msg, param=loc or None, code=code) from None


def is_json_content_type(ctype: str) -> bool:
    """``application/json`` or a ``+json`` type, any parameters (a missing header is taken as JSON)."""
    media = ctype.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _is_union_tag(x: Any) -> bool:
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict"))


def check_text(s: str, param: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} is not valid UTF-8 (it holds an unpaired surrogate)", param=param,
                          code="invalid_utf8") from None


def check_model(st: ServerState, model: str | None) -> str:
    """The served model name the request asked for (the first one if none)."""
    if model is None:
        return st.model_name
    if model not in st.served_model_names:
        raise APIError(404, f"The model `{model}` does not exist. Served models: {', '.join(st.served_model_names)}",
                       param="model", code="model_not_found")
    return model


def check_range(value: Any, lo: float, hi: float, name: str, *, lo_open: bool = False) -> None:
    ok = value is not None and not (isinstance(value, float) and math.isnan(value))
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad_request(f"{name} must be in {interval}, got {value}", param=name, code="invalid_value")


def check_common(st: ServerState, req: Any) -> int:
    """Checks of the shared fields that need no prompt; returns n."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options",
                          code="invalid_value")
    n = 1 if req.n is None else req.n
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}", param="n", code="invalid_value")
    if n > st.max_n:
        raise bad_request(f"n must be at most {st.max_n} on this server, got {n}", param="n", code="invalid_value")
    if req.best_of is not None and req.best_of != n:
        raise bad_request("best_of is not supported (leave it out or set it equal to n)", param="best_of",
                          code="unsupported_parameter")
    return n


def check_max_tokens(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise bad_request(f"{name} must be at least 1, got {value}", param=name, code="invalid_value")


def resolve_max_tokens(st: ServerState, requested: int | None, prompt_len: int, name: str,
                       prompt_param: str = "prompt") -> int:
    """The number of tokens to generate: ``requested`` checked against the context and the KV cache, or
    as many as fit when None. ``name`` is the request's max-tokens field, ``prompt_param`` its prompt's."""
    ctx = st.max_model_len
    if prompt_len >= ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_len} tokens "
            "(the prompt plus at least one generated token must fit). Please reduce the length of the prompt.",
            param=prompt_param, code="context_length_exceeded")
    if requested is None:
        requested = ctx - prompt_len
        cap = st.kv_capacity_tokens
        if prompt_len + requested > cap:  # a small KV cache: fill what one sequence can hold
            requested = max(1, cap - prompt_len)
    elif prompt_len + requested > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + requested} "
            f"tokens ({prompt_len} in the prompt, {requested} for the completion). Please reduce the length of "
            f"the prompt or {name}.", param=name, code="context_length_exceeded")
    cap = st.kv_capacity_tokens
    if prompt_len + requested > cap:
        # One sequence larger than the whole KV cache could never be scheduled (the engine would fail).
        raise bad_request(
            f"the prompt ({prompt_len} tokens) plus {name}={requested} needs {prompt_len + requested} tokens of KV "
            f"cache but this server's cache holds {cap}; lower {name} or restart the server with a larger cache",
            param=name, code="kv_cache_too_small")
    return requested


async def encode(st: ServerState, text: str) -> list[int]:
    if st.tokenizer is None:
        raise bad_request("this model has no tokenizer: send the prompt as token ids", param="prompt")
    if len(text) > 20_000:  # keep the event loop responsive for long prompts
        return list(await asyncio.to_thread(st.tokenizer.encode, text))
    return list(st.tokenizer.encode(text))


def check_ids(st: ServerState, ids: list[int], param: str) -> None:
    vocab = st.vocab_size
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(f"{param}: token id {t} is outside the vocabulary (0..{vocab - 1})", param=param,
                              code="invalid_value")


def sampling_params(st: ServerState, req: Any, max_tokens: int, logprobs: int | None,
                    **extra: Any) -> SamplingParams:
    """``SamplingParams`` from the sampling fields both endpoints share (``extra`` adds endpoint-specific
    keywords), range-checked with OpenAI's parameter names."""
    temperature = 1.0 if req.temperature is None else req.temperature
    check_range(temperature, 0.0, 2.0, "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    check_range(top_p, 0.0, 1.0, "top_p", lo_open=True)
    top_k = -1 if req.top_k is None or req.top_k == 0 else req.top_k
    if not -1 <= top_k <= st.vocab_size:
        raise bad_request(f"top_k must be -1 or 0 (off) or in [1, {st.vocab_size}] (the vocabulary), got "
                          f"{req.top_k}", param="top_k", code="invalid_value")
    min_p = 0.0 if req.min_p is None else req.min_p
    check_range(min_p, 0.0, 1.0, "min_p")
    pp = req.presence_penalty or 0.0
    fp = req.frequency_penalty or 0.0
    check_range(pp, -2.0, 2.0, "presence_penalty")
    check_range(fp, -2.0, 2.0, "frequency_penalty")
    rp = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if not rp > 0 or math.isinf(rp):
        raise bad_request(f"repetition_penalty must be > 0, got {rp}", param="repetition_penalty",
                          code="invalid_value")
    if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
        raise bad_request(f"seed must be a 64-bit integer, got {req.seed}", param="seed", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    for i, s in enumerate(stops):
        if not s:
            raise bad_request("stop strings must be non-empty", param="stop", code="invalid_value")
        check_text(s, f"stop[{i}]" if not isinstance(req.stop, str) else "stop")
    vocab = st.vocab_size
    for t in req.stop_token_ids or []:
        if not 0 <= t < vocab:
            raise bad_request(f"stop_token_ids: {t} is outside the vocabulary (0..{vocab - 1})",
                              param="stop_token_ids", code="invalid_value")
    min_tokens = req.min_tokens or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise bad_request(f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}",
                          param="min_tokens", code="invalid_value")
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
            **extra,
        )
    except InvalidRequestError as e:
        raise bad_request(str(e), param=getattr(e, "param", None), code="invalid_value") from None
