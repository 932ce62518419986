"""Request fields that constrain or score generation, for both endpoints: structured output (OpenAI's
``response_format``, vLLM's ``guided_*`` and ``structured_outputs``, forced tool calls), ``logit_bias``
and ``prompt_logprobs`` -> ``SamplingParams`` keywords; compiling a constraint off the engine thread;
prompt logprobs in vLLM's response shape.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fdpp.errors import InvalidRequestError
from fdpp.server.errors import bad_request
from fdpp.server.state import ServerState
from fdpp.server.validation import MAX_LOGPROBS
from fdpp.structured.params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def request_constraint(req: Any, forced: StructuredOutputsParams | None = None,
                       forced_param: str = "tool_choice") -> tuple[StructuredOutputsParams | None, str | None]:
    """The one structured-output constraint of a request and the field it came from (None: free text).

    Sources: ``forced`` (a tool_choice that forces calls), ``response_format`` (chat), vLLM's
    ``structured_outputs`` and ``guided_*`` fields. More than one is a 400."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if forced is not None:
        found.append((forced_param, forced))
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type != "text":
        found.append(("response_format", _checked("response_format", _response_format, rf)))
    if getattr(req, "structured_outputs", None) is not None:
        found.append(("structured_outputs", _checked("structured_outputs", StructuredOutputsParams.from_value,
                                                     req.structured_outputs)))
    for field, kind in _GUIDED.items():
        value = getattr(req, field, None)
        if value is not None:
            found.append((field, _checked(field, lambda v, kind=kind: StructuredOutputsParams(**{kind: v}), value)))
    if len(found) > 1:
        raise bad_request(f"set only one output constraint; this request sets {', '.join(f for f, _ in found)}",
                          param=found[1][0], code="invalid_value")
    if not found:
        return None, None
    return found[0][1], found[0][0]


def _checked(param: str, build: Any, value: Any) -> StructuredOutputsParams:
    try:
        return build(value)
    except InvalidRequestError as e:
        raise bad_request(_reworded(str(e), param), param=param, code="invalid_value") from None


def _reworded(message: str, param: str) -> str:
    """An engine message about ``structured_outputs`` as one about the request field that set it."""
    for prefix in ("structured_outputs: ", f"{param}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return f"{param}: {message}"


def _response_format(rf: Any) -> StructuredOutputsParams:
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if rf.type == "json_schema":
        spec = rf.json_schema
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise InvalidRequestError("type 'json_schema' needs json_schema.schema (a JSON schema object)",
                                      param="response_format")
        return StructuredOutputsParams(json=schema)
    raise InvalidRequestError(f"type must be 'text', 'json_object' or 'json_schema', got {rf.type!r}",
                              param="response_format")


def constraint_kwargs(st: ServerState, req: Any, constraint: StructuredOutputsParams | None) -> dict[str, Any]:
    """``SamplingParams`` keywords for the constraint, ``logit_bias`` and ``prompt_logprobs``."""
    kw: dict[str, Any] = {"structured_outputs": constraint}
    if req.logit_bias:
        vocab = st.vocab_size
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            try:
                tok = int(key)
            except ValueError:
                raise bad_request(f"logit_bias: the key {key!r} is not a token id", param="logit_bias",
                                  code="invalid_value") from None
            if not 0 <= tok < vocab:
                raise bad_request(f"logit_bias: token id {tok} is outside the vocabulary (0..{vocab - 1})",
                                  param="logit_bias", code="invalid_value")
            bias[tok] = value
        kw["logit_bias"] = bias
    k = req.prompt_logprobs
    if k is not None:
        if not 0 <= k <= MAX_LOGPROBS:
            raise bad_request(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {k}", param="prompt_logprobs",
                              code="invalid_value")
        if req.stream:
            raise bad_request("prompt_logprobs is not supported with stream=true", param="prompt_logprobs",
                              code="unsupported_parameter")
        kw["prompt_logprobs"] = k
    return kw


async def compile_constraint(st: ServerState, constraint: StructuredOutputsParams | None, param: str | None) -> None:
    """Compile (or find cached) the request's grammar in a worker thread, so that a slow compilation
    never stalls the engine loop; a bad or too large constraint is a 400 here, before submission."""
    if constraint is None:
        return
    try:
        await asyncio.to_thread(st.engine.structured.compile, constraint)
    except InvalidRequestError as e:
        raise bad_request(_reworded(str(e), param or "structured_outputs"), param=param, code="invalid_value") from None


def prompt_logprobs_json(st: ServerState, entries: list[dict[int, float] | None] | None, prompt_ids: list[int],
                         k: int) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the prompt token, then the top ``k`` (rank is None for a prompt token
    outside the top k: the engine does not rank the whole vocabulary)."""
    if entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for pos, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        actual = prompt_ids[pos]
        order = sorted(entry, key=lambda t: -entry[t])
        in_top = len(entry) <= k  # the prompt token was one of the top k (no extra entry for it)
        row = {}
        for t in [actual, *(t for t in order if t != actual)]:
            rank = order.index(t) + 1 if (t != actual or in_top) else None
            row[str(t)] = {"logprob": entry[t], "rank": rank, "decoded_token": st.token_text(t)}
        out.append(row)
    return out
