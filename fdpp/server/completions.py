"""POST /v1/completions: one or more prompts (text or token ids), streamed over SSE or not.

``completion_sampling_params`` is where a completion request becomes ``SamplingParams``;
``stream_choice`` in the handler is where one choice's progress becomes a stream chunk's choice.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fdpp.sampling_params import SamplingParams
from fdpp.server.constraints import (
    compile_constraint,
    constraint_kwargs,
    prompt_logprobs_json,
    request_constraint,
)
from fdpp.server.errors import bad_request
from fdpp.server.logprobs import completion_logprobs
from fdpp.server.metrics import RequestTracker
from fdpp.server.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamChoice,
    CompletionStreamResponse,
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
    check_ids,
    check_max_tokens,
    check_model,
    check_text,
    encode,
    parse_body,
    resolve_max_tokens,
    sampling_params,
)

MAX_PROMPTS = 256

router = APIRouter()


def check_completion_request(st: ServerState, req: CompletionRequest) -> int:
    """The checks that need no prompt; returns n."""
    n = check_common(st, req)
    check_max_tokens(req.max_tokens, "max_tokens")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported_parameter")
    k = req.logprobs
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {k}", param="logprobs",
                          code="invalid_value")
    if req.echo and k is not None:
        raise bad_request("echo with logprobs is not supported (prompt logprobs are not computed)", param="echo",
                          code="unsupported_parameter")
    return n


def completion_sampling_params(st: ServerState, req: CompletionRequest, prompt_len: int,
                               **extra: Any) -> SamplingParams:
    """The ``SamplingParams`` of one prompt of ``req``."""
    max_tokens = resolve_max_tokens(st, req.max_tokens, prompt_len, "max_tokens")
    return sampling_params(st, req, max_tokens, req.logprobs, **extra)


async def completion_prompts(st: ServerState, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) for each prompt of a completion request."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", param="prompt", code="empty_prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt",
                          code="too_many_prompts")
    out: list[tuple[str | None, list[int]]] = []
    for i, p in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise bad_request(f"{param} must not be empty", param="prompt", code="empty_prompt")
            check_text(p, param)
            ids = await encode(st, p)
            if not ids:
                raise bad_request(f"{param} encodes to no tokens", param="prompt", code="empty_prompt")
            out.append((p, ids))
        else:
            if not p:
                raise bad_request(f"{param} must not be empty", param="prompt", code="empty_prompt")
            ids = list(p)
            check_ids(st, ids, param)
            out.append((None, ids))
    return out


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    st = state_of(request)
    arrival = time.time()
    req: CompletionRequest = await parse_body(request, CompletionRequest)
    model = check_model(st, req.model)
    n = check_completion_request(st, req)
    k = req.logprobs
    prompts = await completion_prompts(st, req.prompt)
    if len(prompts) * n > MAX_PROMPTS:
        raise bad_request(f"len(prompt) x n must be at most {MAX_PROMPTS}", param="n", code="invalid_value")
    constraint, constraint_param = request_constraint(req)
    extra = constraint_kwargs(st, req, constraint)
    rid = random_id("cmpl")
    subs = [(f"{rid}-{i}", ids, completion_sampling_params(st, req, len(ids), **extra))
            for i, (_, ids) in enumerate(prompts)]
    await compile_constraint(st, constraint, constraint_param)
    for _, ids, _ in subs:
        st.metrics.prompt_tokens.labels(st.model_name).inc(len(ids))
    group = st.async_engine.submit(subs)
    tracker = RequestTracker(st.metrics, arrival, num_seqs=len(subs) * n)
    created = int(arrival)
    prompt_texts = [t if t is not None else (st.tokenizer.decode(ids) if st.tokenizer is not None else "")
                    for t, ids in prompts] if req.echo else None
    prompt_lens = [len(ids) for _, ids in prompts]

    if req.stream:
        def stream_choice(d: ChoiceDelta) -> CompletionStreamChoice | None:
            prefix = prompt_texts[d.prompt_index] if prompt_texts is not None and d.is_first else ""
            lp = None
            if k is not None and d.token_ids:
                lp = completion_logprobs(st, d.token_ids, d.logprobs, k, d.text_offset)
            if not d.text and not prefix and d.finish_reason is None and lp is None:
                return None
            return CompletionStreamChoice(index=d.index, text=prefix + d.text, logprobs=lp,
                                          finish_reason=d.finish_reason, stop_reason=d.stop_reason)

        def chunk(choices: list, usage: Any) -> CompletionStreamResponse:
            return CompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        spec = StreamSpec(n=n, holdback=stop_holdback(subs[0][2]), prompt_lens=prompt_lens, make_choice=stream_choice,
                          make_chunk=chunk, include_usage=include_usage,
                          continuous_usage=include_usage and bool(req.stream_options.continuous_usage_stats))
        return sse_response(group, tracker, spec)

    outs = await collect_or_disconnect(request, group, tracker, len(subs))
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
                lp = completion_logprobs(st, c.token_ids, c.logprobs or [], k,
                                         len(prompt_texts[idx]) if prompt_texts is not None else 0)
            choice = CompletionResponseChoice(index=idx * n + c.index, text=text, logprobs=lp,
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            if req.prompt_logprobs is not None:  # vLLM's extension, on every choice
                choice.prompt_logprobs = prompt_logprobs_json(st, out.prompt_logprobs, out.prompt_token_ids,
                                                              req.prompt_logprobs)
            choices.append(choice)
    resp = CompletionResponse(id=rid, created=created, model=model, choices=choices,
                              usage=usage_of(prompt_lens, outs))
    return JSONResponse(resp.model_dump())

