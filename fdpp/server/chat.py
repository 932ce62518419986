"""POST /v1/chat/completions: a conversation rendered by the model's chat template, streamed or not.

One place each: ``render_chat_prompt`` (messages -> prompt token ids, also used by /tokenize),
``chat_sampling_params`` (request -> ``SamplingParams``), ``_chat_choice`` (a finished choice ->
the response's message) and ``stream_choice`` inside the handler (a choice's progress -> a delta).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fdpp.errors import InvalidRequestError
from fdpp.outputs import CompletionOutput
from fdpp.sampling_params import SamplingParams
from fdpp.server.constraints import (
    compile_constraint,
    constraint_kwargs,
    prompt_logprobs_json,
    request_constraint,
)
from fdpp.server.errors import bad_request
from fdpp.server.logprobs import chat_logprobs
from fdpp.server.metrics import RequestTracker
from fdpp.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    random_id,
)
from fdpp.server.state import ServerState, state_of
from fdpp.server.streaming import (
    ChoiceDelta,
    StreamSpec,
    collect_or_disconnect,
    sse_response,
    stop_holdback,
    usage_of,
)
from fdpp.server.validation import (
    MAX_LOGPROBS,
    check_common,
    check_max_tokens,
    check_model,
    check_text,
    parse_body,
    resolve_max_tokens,
    sampling_params,
)
from fdpp.tools import ToolCallStreamer, ToolPlan, plan_tools, template_conversation
from fdpp.tools.choice import check_tool_calls

router = APIRouter()

# OpenAI's roles ("function" is its deprecated form of "tool"); any other is refused, not rendered.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def check_chat_request(st: ServerState, req: ChatCompletionRequest) -> tuple[int, int | None]:
    """The checks that need no prompt; returns n and the number of top logprobs (None: no logprobs)."""
    n = check_common(st, req)
    check_max_tokens(req.max_tokens, "max_tokens")
    check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    if req.tool_choice is not None and not req.tools:
        raise bad_request("tool_choice is only allowed when tools are given", param="tool_choice",
                          code="invalid_value")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                              param="top_logprobs", code="invalid_value")
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    return n, (req.top_logprobs or 0) if req.logprobs else None


def chat_conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The request's messages as the chat template's conversation (text content only)."""
    if not messages:
        raise bad_request("messages must not be empty", param="messages", code="empty_messages")
    conv = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}]: only text content parts are supported, got "
                                      f"type {part.type!r}", param=f"messages[{i}].content",
                                      code="unsupported_content")
                parts.append(part.text)
            content = "\n".join(parts)
        else:
            content = m.content or ""
        check_text(content, f"messages[{i}].content")
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role: unknown role {m.role[:40]!r}; use one of {', '.join(CHAT_ROLES)}",
                              param="messages", code="invalid_value")
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = _checked(check_tool_calls, m.tool_calls, f"messages[{i}]")
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        conv.append(msg)
    return conv


def _checked(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with its InvalidRequestError as a 400."""
    try:
        return fn(*args)
    except InvalidRequestError as e:
        raise bad_request(str(e), param=e.param, code="invalid_value") from None


def render_chat_prompt(st: ServerState, messages: list[ChatMessage], add_generation_prompt: bool,
                       tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The prompt token ids of a conversation (and its tools), through the model's chat template."""
    conv = chat_conversation(messages)
    if st.tokenizer is None:
        raise bad_request("this model has no tokenizer, so chat prompts cannot be built", param="messages")
    from fdpp.tokenizer import apply_chat_template

    conv, template_kwargs = template_conversation(conv, tools, getattr(st.tokenizer, "chat_template", None))
    try:
        return apply_chat_template(st.tokenizer, conv, add_generation_prompt=add_generation_prompt, **template_kwargs)
    except InvalidRequestError as e:
        raise bad_request(str(e), param="messages", code="invalid_messages") from None


def chat_sampling_params(st: ServerState, req: ChatCompletionRequest, prompt_len: int,
                         logprobs: int | None, **extra: Any) -> SamplingParams:
    """The ``SamplingParams`` of ``req`` for a prompt of ``prompt_len`` tokens."""
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(st, requested, prompt_len, name, prompt_param="messages")
    return sampling_params(st, req, max_tokens, logprobs, **extra)


def chat_tool_plan(st: ServerState, req: ChatCompletionRequest) -> ToolPlan:
    """What the request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` ask for."""
    return _checked(plan_tools, req.tools, req.tool_choice, req.parallel_tool_calls, st.tool_parser_name)


def _chat_choice(st: ServerState, c: CompletionOutput, k: int | None, plan: ToolPlan) -> ChatCompletionResponseChoice:
    lp = chat_logprobs(st, c.token_ids, c.logprobs or [], k) if k is not None else None
    message = ChatResponseMessage(role="assistant", content=c.text)
    finish_reason = c.finish_reason
    if plan.parser is not None:
        ex = plan.parser.extract(c.text, final=True)
        calls = ex.tool_calls() if ex.ok else []
        if calls:
            message = ChatResponseMessage(role="assistant", content=ex.content or None,
                                          tool_calls=[call.to_openai() for call in calls])
            if finish_reason == "stop" and plan.finish_reason:
                finish_reason = plan.finish_reason
    return ChatCompletionResponseChoice(index=c.index, message=message, logprobs=lp, finish_reason=finish_reason,
                                        stop_reason=c.stop_reason)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    st = state_of(request)
    arrival = time.time()
    req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    model = check_model(st, req.model)
    n, k = check_chat_request(st, req)
    plan = chat_tool_plan(st, req)
    ids = render_chat_prompt(st, req.messages, req.add_generation_prompt is not False, req.tools)
    if not ids:
        raise bad_request("the conversation renders to an empty prompt", param="messages", code="empty_messages")
    constraint, constraint_param = request_constraint(req, plan.constraint)
    sp = chat_sampling_params(st, req, len(ids), k, **constraint_kwargs(st, req, constraint))
    if plan.parser is not None and plan.parser.needs_special_tokens:
        sp = dataclasses.replace(sp, skip_special_tokens=False)  # the format's markers are special tokens
    await compile_constraint(st, constraint, constraint_param)
    rid = random_id("chatcmpl")
    st.metrics.prompt_tokens.labels(st.model_name).inc(len(ids))
    group = st.async_engine.submit([(rid, ids, sp)])
    tracker = RequestTracker(st.metrics, arrival, num_seqs=n)
    created = int(arrival)

    if req.stream:
        texts: dict[int, str] = {}  # each choice's text so far (tool-call parsing needs all of it)
        streamers = {i: ToolCallStreamer(plan.parser) for i in range(n)} if plan.parser is not None else {}

        def stream_choice(d: ChoiceDelta) -> ChatCompletionStreamChoice | None:
            lp = chat_logprobs(st, d.token_ids, d.logprobs, k) if k is not None and d.token_ids else None
            content, calls, finish_reason = d.text, None, d.finish_reason
            if streamers:
                texts[d.index] = texts.get(d.index, "")[:d.text_offset] + d.text
                streamer = streamers[d.index]
                content, calls = streamer.update(texts[d.index], final=d.finish_reason is not None)
                if finish_reason == "stop" and streamer.num_calls and plan.finish_reason:
                    finish_reason = plan.finish_reason
            if not content and not calls and finish_reason is None and lp is None:
                return None
            return ChatCompletionStreamChoice(
                index=d.index, delta=DeltaMessage(content=content or None, tool_calls=calls or None), logprobs=lp,
                finish_reason=finish_reason, stop_reason=d.stop_reason)

        def chunk(choices: list, usage: Any) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)

        # the role first, as OpenAI does
        role = chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                      for i in range(n)], None)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        spec = StreamSpec(n=n, holdback=stop_holdback(sp), prompt_lens=[len(ids)], make_choice=stream_choice,
                          make_chunk=chunk, include_usage=include_usage,
                          continuous_usage=include_usage and bool(req.stream_options.continuous_usage_stats),
                          first_chunks=[role])
        return sse_response(group, tracker, spec)

    outs = await collect_or_disconnect(request, group, tracker, 1)
    if outs is None:
        return Response(status_code=499)
    resp = ChatCompletionResponse(id=rid, created=created, model=model,
                                  choices=[_chat_choice(st, c, k, plan) for c in outs[0].outputs],
                                  usage=usage_of([len(ids)], outs))
    if sp.prompt_logprobs is not None:
        resp.prompt_logprobs = prompt_logprobs_json(st, outs[0].prompt_logprobs, ids, sp.prompt_logprobs)
    return JSONResponse(resp.model_dump())
