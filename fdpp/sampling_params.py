"""Sampling parameters, in vLLM's conventions."""
from __future__ import annotations

from dataclasses import dataclass, field

from fdpp.errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How to sample one completion.

    temperature 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p 1.0 and min_p 0.0 disable
    theirs. Penalties follow vLLM/OpenAI: repetition_penalty divides positive logits of tokens seen in
    the prompt or output (multiplies negative ones); presence/frequency penalties subtract from logits of
    tokens generated so far. ``logprobs=k`` returns the sampled token's log-probability and the top k.
    ``output_kind="final_only"`` makes the engine report a request only when it finishes.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # "cumulative": step() reports the request every time it advances (streaming);
    # "final_only": only once it has finished (batch generation: less host work per step).
    output_kind: str = "cumulative"
    stops: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stops = [self.stop]
        else:
            self.stops = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"SamplingParams: {msg}")

        if self.n < 1:
            raise bad(f"n must be >= 1, got {self.n}")
        if not (self.temperature >= 0.0):
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0.0):
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise bad(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad(f"logprobs must be >= 0, got {self.logprobs}")
        if self.output_kind not in ("cumulative", "final_only"):
            raise bad(f"output_kind must be 'cumulative' or 'final_only', got {self.output_kind!r}")
        if any(not s for s in self.stops):
            raise bad("stop strings must be non-empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
