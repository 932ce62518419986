"""Sampling parameters, in vLLM's conventions."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from fdpp.errors import InvalidRequestError
from fdpp.structured.params import StructuredOutputsParams, validate_logit_bias

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Documented limits (the engine turns these fields into int64/float32 tensors or per-token work):
MAX_LOGPROBS = 20  # top log-probabilities per token (vLLM's default max_logprobs; OpenAI allows 20)
MAX_N = 1024  # completions per request (each is a sequence with its own KV blocks)


@dataclass
class SamplingParams:
    """How to sample one completion.

    temperature 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p 1.0 and min_p 0.0 disable
    theirs. Penalties follow vLLM/OpenAI: repetition_penalty divides positive logits of tokens seen in
    the prompt or output (multiplies negative ones); presence/frequency penalties subtract from logits of
    tokens generated so far. ``logprobs=k`` returns the sampled token's log-probability and the top k.
    ``output_kind="final_only"`` makes the engine report a request only when it finishes.

    Every field is checked when the object is built (and again when a request is added): a value of
    the wrong type or out of range raises ``InvalidRequestError`` naming the parameter (``.param``).
    Ranges: n in [1, MAX_N]; temperature finite and >= 0; top_p in (0, 1]; top_k -1, 0 or in
    [1, 2**63-1] (values above the vocabulary disable top-k); min_p in [0, 1]; repetition_penalty
    finite and > 0; presence/frequency penalties in [-2, 2]; max_tokens >= 1 (or None: up to the
    context); min_tokens in [0, max_tokens]; stop_token_ids non-negative int64s; seed a 64-bit signed
    integer; logprobs in [0, MAX_LOGPROBS] (the engine also caps it at the vocabulary size).
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
    # Constrained decoding (JSON schema, regex, choice, grammar; see fdpp.structured), an additive
    # {token id: bias} per step, and the top-k log-probabilities of every prompt token (vLLM's fields).
    structured_outputs: StructuredOutputsParams | dict | None = None
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    # "cumulative": step() reports the request every time it advances (streaming);
    # "final_only": only once it has finished (batch generation: less host work per step).
    output_kind: str = "cumulative"
    stops: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types and ranges) and normalize it; raise ``InvalidRequestError``.

        Each field has one small check below; a new field adds one line here.
        """
        self.n = _int("n", self.n, 1, MAX_N)
        self.temperature = _float("temperature", self.temperature, 0.0, math.inf)
        self.top_p = _float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        self.top_k = _top_k(self.top_k)
        self.min_p = _float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, 1, INT64_MAX)
        hi = self.max_tokens if self.max_tokens is not None else INT64_MAX
        self.min_tokens = _int("min_tokens", self.min_tokens, 0, hi, why=f"max_tokens={self.max_tokens}")
        self.stops = _stops(self.stop)
        self.stop_token_ids = _int_list("stop_token_ids", self.stop_token_ids, 0, INT64_MAX)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            setattr(self, name, _bool(name, getattr(self, name)))
        if self.seed is not None:
            self.seed = _int("seed", self.seed, INT64_MIN, INT64_MAX)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        self.logit_bias = validate_logit_bias(self.logit_bias)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if self.output_kind not in ("cumulative", "final_only"):
            raise _bad("output_kind", f"must be 'cumulative' or 'final_only', got {self.output_kind!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


# ---- per-field checks ------------------------------------------------------------------------------
def _bad(name: str, msg: str, param: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(f"SamplingParams: {name} {msg}", param=param or name)


def _int(name: str, value: Any, lo: int, hi: int, why: str = "", param: str | None = None) -> int:
    # NOTE: bool is an int subclass; True for n or top_k is a caller's mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(name, f"must be an integer, got {type(value).__name__} {value!r:.40}", param)
    value = int(value)
    if not lo <= value <= hi:
        why = f" ({why})" if why else ""
        raise _bad(name, f"must be in [{lo}, {hi}]{why}, got {value}", param)
    return value


def _float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, f"must be a number, got {type(value).__name__} {value!r:.40}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise _bad(name, f"is out of range, got {value}") from None
    ok = (lo < value if lo_open else lo <= value) and value <= hi and math.isfinite(value)
    if not ok:
        if math.isinf(hi):
            raise _bad(name, f"must be a finite number {'>' if lo_open else '>='} {lo}, got {value}")
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {type(value).__name__} {value!r:.40}")
    return value


def _top_k(value: Any) -> int:
    if value is None:
        return -1
    value = _int("top_k", value, -1, INT64_MAX)
    return -1 if value == 0 else value


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"must be a string or a list of strings, got {stop!r:.80}")
    if any(not s for s in stops):
        raise _bad("stop", "strings must be non-empty")
    return list(stops)


def _int_list(name: str, values: Any, lo: int, hi: int) -> list[int]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise _bad(name, f"must be a list of integers, got {type(values).__name__}")
    return [_int(f"{name}[{i}]", v, lo, hi, param=name) for i, v in enumerate(values)]
