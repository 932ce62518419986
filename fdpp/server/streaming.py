"""Driving a request group to a response: the one SSE streaming loop both endpoints use, the
non-streaming collection, and how every stream ends.

A stream is a sequence of chunks, each holding the choices that advanced. Which fields a choice's chunk
carries (completion ``text`` and an echoed prompt, or a chat ``delta``) is the endpoint's business: it
passes ``StreamSpec.make_choice``, called with a ``ChoiceDelta`` (what one choice gained since its
last chunk), and ``StreamSpec.make_chunk``; this module does the rest (per-choice progress, holding
back a possible stop-string prefix, usage, metrics, errors, ``[DONE]``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from fdpp.outputs import CompletionOutput, RequestOutput
from fdpp.sampling_params import SamplingParams
from fdpp.server.errors import APIError, exc_to_error
from fdpp.server.metrics import RequestTracker
from fdpp.server.protocol import PromptTokensDetails, UsageInfo


# ---- one choice's progress -------------------------------------------------------------------------
@dataclass
class ChoiceDelta:
    """What one choice gained since its last chunk."""

    index: int  # the choice's index in the response (prompt_index * n + the engine's choice index)
    prompt_index: int
    text: str  # new text; a tail that may begin a stop string is held back until it cannot
    token_ids: list[int]  # new tokens (their text may be partly held back)
    logprobs: list[dict[int, float]]  # one entry per new token when logprobs were requested, else []
    text_offset: int  # characters of this choice's text sent before ``text``
    is_first: bool  # nothing has been sent for this choice yet
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class _ChoiceState:
    sent_chars: int = 0
    sent_tokens: int = 0
    finished: bool = False
    started: bool = False

    def advance(self, c: CompletionOutput, index: int, prompt_index: int, holdback: int) -> ChoiceDelta:
        finished = c.finish_reason is not None
        text = c.text
        limit = len(text) if finished else max(self.sent_chars, len(text) - holdback)
        delta = text[self.sent_chars:limit] if limit > self.sent_chars else ""
        start = self.sent_tokens
        self.sent_tokens = len(c.token_ids)
        return ChoiceDelta(index, prompt_index, delta, list(c.token_ids[start:]), (c.logprobs or [])[start:],
                           self.sent_chars, not self.started, c.finish_reason, c.stop_reason)

    def commit(self, d: ChoiceDelta) -> None:
        """``d`` was sent."""
        self.started = True
        self.sent_chars += len(d.text)
        self.finished = d.finish_reason is not None


# ---- the streaming loop ----------------------------------------------------------------------------
@dataclass
class StreamSpec:
    """How an endpoint renders its stream (see the module docstring)."""

    n: int  # choices per prompt
    holdback: int  # characters held back: the longest stop string minus one
    prompt_lens: list[int]
    make_choice: Callable[[ChoiceDelta], BaseModel | None]  # None: nothing worth a chunk yet
    make_chunk: Callable[[list[BaseModel], UsageInfo | None], BaseModel]
    include_usage: bool = False
    continuous_usage: bool = False
    first_chunks: list[BaseModel] = field(default_factory=list)  # sent before any output (chat: the role)


def stop_holdback(params: SamplingParams) -> int:
    """Characters of streamed text to hold back: a stop string may begin in them."""
    return max((len(s) for s in params.stops), default=1) - 1


def check_output(out: RequestOutput) -> None:
    """Raise if the engine ended this request with an error (it failed alone; the others go on)."""
    error = getattr(out, "error", None)
    if error is None and not any(c.finish_reason == "error" for c in out.outputs):
        return
    raise APIError(500, f"the engine failed on this request and ended it: {error or 'unknown error'} "
                   "(other requests are not affected)", code="request_failed")


async def stream_events(group: Any, tracker: RequestTracker, spec: StreamSpec) -> AsyncIterator[str]:
    """The SSE events of one response (without the final ``[DONE]``, which ``sse_response`` adds)."""
    for chunk in spec.first_chunks:
        yield sse(chunk)
    states: dict[int, _ChoiceState] = {}
    final: dict[int, RequestOutput] = {}
    async for idx, out in group:
        tracker.update(idx, out)
        check_output(out)
        final[idx] = out
        choices = []
        for c in out.outputs:
            ci = idx * spec.n + c.index
            cs = states.setdefault(ci, _ChoiceState())
            if cs.finished:
                continue
            d = cs.advance(c, ci, idx, spec.holdback)
            choice = spec.make_choice(d)
            if choice is None:
                continue
            cs.commit(d)
            choices.append(choice)
        if choices:
            usage = usage_of(spec.prompt_lens, list(final.values())) if spec.continuous_usage else None
            yield sse(spec.make_chunk(choices, usage))
    tracker.done()
    if spec.include_usage:
        yield sse(spec.make_chunk([], usage_of(spec.prompt_lens, list(final.values()))))


def sse(obj: BaseModel | dict) -> str:
    if isinstance(obj, BaseModel):
        data = obj.model_dump_json(exclude_unset=False)
    else:
        data = json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage_of(prompt_lens: list[int], outs: list[RequestOutput]) -> UsageInfo:
    p = sum(prompt_lens)
    c = sum(len(o.token_ids) for r in outs for o in r.outputs)
    cached = [r.num_cached_tokens for r in outs if r.num_cached_tokens is not None]
    details = PromptTokensDetails(cached_tokens=sum(cached)) if cached else None
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=details)


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that aborts its engine requests however it ends (also when the
    client leaves before the first chunk, when the body generator has not started and so cannot)."""

    def __init__(self, gen: AsyncIterator[str], group: Any, tracker: RequestTracker) -> None:
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


def sse_response(group: Any, tracker: RequestTracker, spec: StreamSpec) -> StreamingResponse:
    """The streaming response of ``group``, rendered by ``spec``."""
    return _SSEResponse(_guarded_stream(stream_events(group, tracker, spec), group), group, tracker)


async def _guarded_stream(events: AsyncIterator[str], group: Any) -> AsyncIterator[str]:
    """Every stream ends the same way: an error is reported in-band (the status line has already gone
    out), the request group is closed, and ``data: [DONE]`` is sent."""
    try:
        async for chunk in events:
            yield chunk
    except Exception as e:  # noqa: BLE001 - reported in-band, the stream has started
        _, body = exc_to_error(e)
        yield sse(body)
    finally:
        group.close()
    yield "data: [DONE]\n\n"


# ---- non-streaming ---------------------------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _collect(group: Any, tracker: RequestTracker, num_prompts: int) -> list[RequestOutput]:
    final: dict[int, RequestOutput] = {}
    try:
        async for idx, out in group:
            tracker.update(idx, out)
            check_output(out)
            final[idx] = out
    finally:
        group.close()
        tracker.close()
    tracker.done()
    return [final[i] for i in range(num_prompts)]


async def collect_or_disconnect(request: Request, group: Any, tracker: RequestTracker,
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
