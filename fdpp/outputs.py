"""What generate() returns, in vLLM's shape."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # One dict per generated token: {token_id: logprob} holding the sampled token and the top-k.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # Prompt tokens whose K/V came from the prefix cache (OpenAI usage.prompt_tokens_details.cached_tokens)
    num_cached_tokens: int | None = None
    # with SamplingParams.prompt_logprobs: [None, {prompt token 1: logprob, top k...}, ...]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    extra: dict = field(default_factory=dict)
    # Set when a sequence of this request ended with finish_reason "error": what went wrong. The
    # request failed alone; the engine and the other requests carried on.
    error: str | None = None

    def __repr__(self) -> str:  # short: the default dumps every token id
        o = self.outputs[0] if self.outputs else None
        text = o.text if o else ""
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"text={text!r}, finished={self.finished}, finish_reason={o.finish_reason if o else None!r})"
        )
