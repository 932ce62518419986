"""What a constrained request asks for, in vLLM's ``StructuredOutputsParams`` shape.

Pure Python (no grammar engine imported here), so ``SamplingParams`` stays cheap to build and to
check. The grammar engine turns these into a compiled grammar (``fdpp.structured.backend``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from fdpp.errors import InvalidRequestError

# The constraint kinds; a request sets exactly one of them.
KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Default limits of one constraint (EngineConfig.structured_outputs_*, the CLI's --structured-outputs-*).
DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_MAX_SPEC_BYTES = 256 * 1024
# Logit bias values are clamped by OpenAI's documented range; we refuse values outside it instead.
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_ENTRIES = 4096  # the sampler applies each entry every step


@dataclass
class StructuredOutputsParams:
    """One output constraint (exactly one of the first five fields is set).

    * ``json``: a JSON schema (a dict, or its JSON text); the output is a JSON value that validates.
    * ``regex``: the output matches this regular expression (whole output).
    * ``choice``: the output is exactly one of these strings.
    * ``grammar``: an EBNF grammar (GBNF / xgrammar dialect, start rule ``root``).
    * ``json_object``: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).

    ``disable_any_whitespace`` makes JSON outputs compact (no whitespace between tokens but a
    single space after ``,`` and ``:``): small models sometimes loop on free whitespace.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputsParams:
        """Accept the params object itself or a dict with its field names (e.g. from JSON)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise InvalidRequestError(
                    f"structured_outputs: unknown field(s) {', '.join(unknown)}; use one of {', '.join(KINDS)}",
                    param="structured_outputs")
            return cls(**value)
        raise InvalidRequestError(
            f"structured_outputs must be a StructuredOutputsParams or a dict, got {type(value).__name__}",
            param="structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        """Shape checks that need no grammar engine: exactly one kind, right types, non-empty."""
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"structured_outputs: {msg}", param="structured_outputs")

        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            got = ", ".join(set_kinds) if set_kinds else "none"
            raise bad(f"set exactly one of {', '.join(KINDS)} (got {got})")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise bad(f"json: the schema is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
            else:
                parsed = self.json
                try:
                    json.dumps(parsed)
                except (TypeError, ValueError) as e:
                    raise bad(f"json: the schema cannot be written as JSON ({e})") from None
            if not isinstance(parsed, (dict, bool)):
                raise bad(f"json: a JSON schema is an object (or true/false), got {type(parsed).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise bad("regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise bad("grammar must be a non-empty EBNF string")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise bad("choice must be a non-empty list of strings")
            for i, c in enumerate(self.choice):
                if not isinstance(c, str) or not c:
                    raise bad(f"choice[{i}] must be a non-empty string, got {c!r}")
        if self.json_object not in (None, True, False):
            raise bad(f"json_object must be a bool, got {self.json_object!r}")

    def spec_text(self) -> str:
        """The constraint as one canonical string (the compile cache key and the size that is limited)."""
        kind = self.kind
        if kind == "json":
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json, sort_keys=True)
        elif kind == "choice":
            spec = json.dumps(list(self.choice))
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        return spec


def validate_logit_bias(logit_bias: Any) -> dict[int, float] | None:
    """Check a ``logit_bias`` map ({token id: bias in [-100, 100]}); return it with int keys.

    Token ids are checked against the vocabulary by the engine (it knows the vocabulary size).
    """
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise InvalidRequestError(f"logit_bias must be a dict {{token_id: bias}}, got {type(logit_bias).__name__}", param="logit_bias")
    if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed", param="logit_bias")
    out: dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequestError(f"logit_bias: the key {key!r} is not a token id (an integer)", param="logit_bias") from None
        if tok < 0:
            raise InvalidRequestError(f"logit_bias: token id {tok} is negative", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"logit_bias[{key}] must be a number, got {value!r:.40}", param="logit_bias")
        if not (isinstance(value, int) or math.isfinite(value)) or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise InvalidRequestError(f"logit_bias[{key}] must be in [-100, 100], got {value!r:.40}",
                                      param="logit_bias")
        out[tok] = float(value)
    return out or None
