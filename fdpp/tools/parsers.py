"""Tool-call parsers: a model's generated text -> content and tool calls, in full or as it streams.

One parser per output format (``PARSERS``):

* ``hermes`` (Hermes 2/3, Qwen2 / Qwen2.5 / Qwen3, and the fallback prompt of templates without
  tools): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated.
* ``llama3_json`` (Llama 3.1 / 3.2): ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several separated by ``;``; the whole output is the call(s).
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or, with newer tokenizers,
  ``[TOOL_CALLS]name[ARGS]{...}``.
* ``glm4`` (GLM-4-9B-chat): ``name\\n{...}``, the first line naming one of the request's tools.

Two more parse the outputs that ``tool_choice`` forces through the grammar engine
(``fdpp.tools.choice``): ``named`` (the output is the arguments object of one function) and
``required`` (a JSON array of ``{"name": ..., "parameters": {...}}``).

``Extraction`` is what a parser sees in a text. While streaming (``final=False``) its ``content`` is
stable (it only grows: a possible start of a tool-call marker is held back) and each call's
``arguments`` is a prefix of its final text; ``ToolCallStreamer`` turns successive extractions into
OpenAI's ``tool_calls`` deltas, so that the deltas add up to exactly what a non-streaming response
returns. Arguments are the model's own JSON text (not re-serialized) for that reason.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")


@dataclass
class ToolCall:
    """A complete call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: new_call_id())

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class PartialCall:
    """A call as far as the text goes: ``name`` None until known; ``arguments`` a prefix of the
    final arguments text (``""`` while nothing of it can be sent); ``done`` once complete."""

    name: str | None
    arguments: str
    done: bool


@dataclass
class Extraction:
    content: str  # text that is not tool-call markup (so far)
    calls: list[PartialCall]
    ok: bool = True  # False: the markup is malformed (a final response then returns the text as content)

    def tool_calls(self) -> list[ToolCall]:
        """The complete calls (a final extraction holds only complete ones when ``ok``)."""
        return [ToolCall(c.name, c.arguments) for c in self.calls if c.done and c.name is not None]


class _Malformed(ValueError):
    pass


# ---- JSON helpers: parse a call object as far as the text goes ------------------------------------
def _skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def scan_call_object(text: str, i: int, name_keys: Sequence[str] = ("name",),
                     args_keys: Sequence[str] = ("arguments", "parameters")) -> tuple[PartialCall, int | None]:
    """Parse the call object that starts at ``text[i] == "{"``.

    Returns the call so far and the index after its closing brace (None while incomplete). Raises
    ``_Malformed`` for text that cannot become a call object."""
    name: str | None = None
    args = ""
    j = _skip_ws(text, i + 1)
    first = True
    while True:
        if j >= len(text):
            return PartialCall(name, args, False), None
        if first and text[j] == "}":
            return PartialCall(name, args or "{}", name is not None), j + 1
        first = False
        if text[j] != '"':
            raise _Malformed(f"expected a key at {j}")
        try:
            key, j = _DECODER.raw_decode(text, j)
        except ValueError:
            return PartialCall(name, args, False), None  # the key is still being written
        j = _skip_ws(text, j)
        if j >= len(text):
            return PartialCall(name, args, False), None
        if text[j] != ":":
            raise _Malformed(f"expected ':' at {j}")
        j = _skip_ws(text, j + 1)
        if j >= len(text):
            return PartialCall(name, args, False), None
        try:
            value, end = _DECODER.raw_decode(text, j)
        except ValueError:
            if key in args_keys and text[j] == "{":
                args = text[j:]  # an object being written: everything up to here is part of it
            return PartialCall(name, args, False), None
        if key in name_keys:
            if not isinstance(value, str):
                raise _Malformed("the function name is not a string")
            name = value
        elif key in args_keys:
            if isinstance(value, dict):
                args = text[j:end]
            elif isinstance(value, str) and isinstance(_loads_or_none(value), dict):
                args = value  # arguments sent as a JSON string holding the object
            else:
                raise _Malformed("the arguments are not a JSON object")
        j = _skip_ws(text, end)
        if j >= len(text):
            return PartialCall(name, args, False), None
        if text[j] == ",":
            j = _skip_ws(text, j + 1)
            continue
        if text[j] == "}":
            if name is None:
                raise _Malformed("a call object without a name")
            return PartialCall(name, args or "{}", True), j + 1
        raise _Malformed(f"expected ',' or '}}' at {j}")


def _loads_or_none(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return None


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _scan_call_list(text: str, i: int, final: bool, name_keys: Sequence[str] = ("name",),
                    args_keys: Sequence[str] = ("arguments", "parameters")) -> Extraction:
    """A JSON array of call objects starting at ``text[i] == "["``."""
    calls: list[PartialCall] = []
    j = _skip_ws(text, i + 1)
    closed = False
    while j < len(text):
        if text[j] == "]" and not calls:
            closed = True
            break
        if text[j] != "{":
            raise _Malformed(f"expected a call object at {j}")
        call, end = scan_call_object(text, j, name_keys, args_keys)
        calls.append(call)
        if end is None:
            break
        j = _skip_ws(text, end)
        if j < len(text) and text[j] == ",":
            j = _skip_ws(text, j + 1)
        elif j < len(text) and text[j] == "]":
            closed = True
            break
        elif j < len(text):
            raise _Malformed(f"expected ',' or ']' at {j}")
    return _finish(Extraction("", calls), final, complete=closed)


def _finish(ex: Extraction, final: bool, complete: bool = True) -> Extraction:
    """A final extraction is ok only when every call is complete."""
    if final and (not complete or not ex.calls or not all(c.done for c in ex.calls)):
        ex.ok = False
    return ex


# ---- the parsers ---------------------------------------------------------------------------------
class ToolParser:
    """Base: ``extract(text, final)`` -> ``Extraction``. ``needs_special_tokens``: the format's markers
    are special tokens, so the output must be decoded with ``skip_special_tokens=False``."""

    name = "base"
    needs_special_tokens = False

    def __init__(self, tool_names: Sequence[str] = ()) -> None:
        self.tool_names = list(tool_names)

    def extract(self, text: str, final: bool) -> Extraction:
        try:
            return self._extract(text, final)
        except _Malformed:
            return Extraction(text if final else "", [], ok=False)

    def _extract(self, text: str, final: bool) -> Extraction:  # pragma: no cover - abstract
        raise NotImplementedError


class _MarkerParser(ToolParser):
    """Content, then a start marker after which come the calls."""

    marker = ""

    def _extract(self, text: str, final: bool) -> Extraction:
        k = text.find(self.marker)
        if k < 0:
            keep = len(text) if final else len(text) - _held_back(text, self.marker)
            return Extraction(text[:keep], [])
        ex = self._calls(text, k, final)
        ex.content = text[:k]
        return ex

    def _calls(self, text: str, k: int, final: bool) -> Extraction:  # pragma: no cover - abstract
        raise NotImplementedError


class HermesParser(_MarkerParser):
    name = "hermes"
    marker = "<tool_call>"
    end_marker = "</tool_call>"

    def _calls(self, text: str, k: int, final: bool) -> Extraction:
        calls: list[PartialCall] = []
        pos = k
        complete = True
        while pos >= 0:
            j = _skip_ws(text, pos + len(self.marker))
            if j >= len(text):
                complete = False
                break
            if text[j] != "{":
                raise _Malformed(f"expected a JSON object after {self.marker}")
            call, end = scan_call_object(text, j)
            calls.append(call)
            if end is None:
                complete = False
                break
            e = _skip_ws(text, end)
            if text.startswith(self.end_marker, e):
                pos = text.find(self.marker, e + len(self.end_marker))
            elif e >= len(text) or self.end_marker.startswith(text[e:]):
                break  # the closing tag is being written (a final text may also end without it)
            else:
                raise _Malformed(f"expected {self.end_marker}")
        return _finish(Extraction("", calls), final, complete)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    python_tag = "<|python_tag|>"

    def _extract(self, text: str, final: bool) -> Extraction:
        stripped = text.lstrip()
        start = len(text) - len(stripped)
        if stripped.startswith(self.python_tag):
            start = _skip_ws(text, start + len(self.python_tag))
        elif not stripped or (not final and self.python_tag.startswith(stripped)):
            return Extraction(text if final else "", [])  # not decided yet
        elif not stripped.startswith("{"):
            return Extraction(text, [])  # plain content
        calls: list[PartialCall] = []
        j = start
        complete = True
        while True:
            if j >= len(text):
                complete = bool(calls) and calls[-1].done
                break
            if text[j] != "{":
                raise _Malformed("expected a call object")
            call, end = scan_call_object(text, j, args_keys=("parameters", "arguments"))
            calls.append(call)
            if end is None:
                complete = False
                break
            j = _skip_ws(text, end)
            if j < len(text) and text[j] == ";":
                j = _skip_ws(text, j + 1)
            elif j < len(text):
                raise _Malformed("expected ';' between calls")
            else:
                break
        return _finish(Extraction("", calls), final, complete)


class MistralParser(_MarkerParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"
    args_marker = "[ARGS]"
    needs_special_tokens = True

    def _calls(self, text: str, k: int, final: bool) -> Extraction:
        j = _skip_ws(text, k + len(self.marker))
        if j < len(text) and text[j] == "[":
            return _scan_call_list(text, j, final)
        calls: list[PartialCall] = []
        pos = k
        complete = True
        while pos >= 0:  # name[ARGS]{...}, each call after its own [TOOL_CALLS]
            start = pos + len(self.marker)
            a = text.find(self.args_marker, start)
            if a < 0:
                complete = False
                break
            name = text[start:a].strip()
            j = _skip_ws(text, a + len(self.args_marker))
            if j >= len(text):
                calls.append(PartialCall(name, "", False))
                complete = False
                break
            if text[j] != "{":
                raise _Malformed("expected a JSON object after [ARGS]")
            try:
                value, end = _DECODER.raw_decode(text, j)
            except ValueError:
                calls.append(PartialCall(name, text[j:], False))
                complete = False
                break
            if not isinstance(value, dict):
                raise _Malformed("the arguments are not a JSON object")
            calls.append(PartialCall(name, text[j:end], True))
            pos = text.find(self.marker, end)
        return _finish(Extraction("", calls), final, complete)


class Glm4Parser(ToolParser):
    """GLM-4-9B-chat: the first line names one of the request's tools; the rest is its arguments."""

    name = "glm4"

    def _extract(self, text: str, final: bool) -> Extraction:
        nl = text.find("\n")
        if nl < 0:
            head = text.strip()
            if not final and any(n.startswith(head) for n in self.tool_names):
                return Extraction("", [])  # may still become a tool name
            return Extraction(text, [])
        name = text[:nl].strip()
        if name not in self.tool_names:
            return Extraction(text, [])
        j = _skip_ws(text, nl + 1)
        if j >= len(text):
            return _finish(Extraction("", [PartialCall(name, "", False)]), final, complete=False)
        if text[j] != "{":
            raise _Malformed("expected a JSON object after the function name")
        try:
            value, end = _DECODER.raw_decode(text, j)
        except ValueError:
            return _finish(Extraction("", [PartialCall(name, text[j:], False)]), final, complete=False)
        if not isinstance(value, dict) or text[end:].strip():
            raise _Malformed("the arguments are not one JSON object")
        return Extraction("", [PartialCall(name, text[j:end], True)])


class NamedFunctionParser(ToolParser):
    """The output forced by a named ``tool_choice``: the arguments object of that function."""

    name = "named"

    def _extract(self, text: str, final: bool) -> Extraction:
        stripped = text.strip()
        if final:
            if not isinstance(_loads_or_none(stripped), dict):
                raise _Malformed("the output is not a JSON object")
            return Extraction("", [PartialCall(self.tool_names[0], stripped, True)])
        return Extraction("", [PartialCall(self.tool_names[0], text.lstrip(), False)])


class RequiredParser(ToolParser):
    """The output forced by ``tool_choice="required"``: ``[{"name": ..., "parameters": {...}}, ...]``."""

    name = "required"

    def _extract(self, text: str, final: bool) -> Extraction:
        j = _skip_ws(text, 0)
        if j >= len(text):
            return _finish(Extraction("", []), final, complete=False)
        if text[j] != "[":
            raise _Malformed("the output is not a JSON array")
        return _scan_call_list(text, j, final, args_keys=("parameters",))


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen2": HermesParser,  # Qwen2 / 2.5 / 3 use Hermes' format
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "glm4": Glm4Parser,
}
# chat-template text -> the format it teaches (checked in order); then the model family
_TEMPLATE_HINTS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"),
                   ("<|observation|>", "glm4"))
_FAMILY = {"qwen2": "hermes", "qwen3": "hermes", "mistral": "mistral", "llama": "llama3_json", "chatglm": "glm4",
           "glm4": "glm4"}


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` it is given."""
    return bool(chat_template) and "tools" in chat_template


def pick_parser_name(chat_template: str | None, model_type: str | None) -> str:
    """The format a model emits calls in: from its chat template, else its family. A template that
    ignores tools gets fdpp's Hermes-style fallback prompt (``fdpp.tools.choice``), so: hermes."""
    if not template_supports_tools(chat_template):
        return "hermes"
    for hint, name in _TEMPLATE_HINTS:
        if hint in chat_template:
            return name
    return _FAMILY.get((model_type or "").lower(), "hermes")


def make_parser(name: str, tool_names: Sequence[str] = ()) -> ToolParser:
    try:
        cls = PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}") from None
    return cls(tool_names)


# ---- streaming ------------------------------------------------------------------------------------
class ToolCallStreamer:
    """Turns one choice's growing text into OpenAI ``delta`` pieces: new content, and ``tool_calls``
    entries (the first for a call carries index, id, type and name with empty arguments; the next
    ones append to its arguments)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.sent_content = 0
        self.sent_args: list[int] = []  # per announced call: characters of arguments sent
        self.ids: list[str] = []

    @property
    def num_calls(self) -> int:
        return len(self.sent_args)

    def update(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls deltas) for the choice's whole text so far."""
        ex = self.parser.extract(text, final)
        if final and not ex.ok and not self.sent_args:
            ex = Extraction(text, [])  # not a call after all: the text is the answer
        content = ex.content[self.sent_content:] if len(ex.content) > self.sent_content else ""
        self.sent_content += len(content)
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(ex.calls):
            if call.name is None:
                break  # calls are announced in order
            if i == len(self.sent_args):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            if len(call.arguments) > self.sent_args[i]:
                deltas.append({"index": i, "function": {"arguments": call.arguments[self.sent_args[i]:]}})
                self.sent_args[i] = len(call.arguments)
        return content, deltas
