"""OpenAI tool calling around the engine: checking ``tools``, what ``tool_choice`` asks for (and the
grammar that enforces ``required`` / a named function), and the conversation the chat template sees
(tools, assistant ``tool_calls``, ``tool`` results).

Enforcement follows vLLM: ``tool_choice="required"`` constrains the output to a JSON array of
``{"name": <one of the tools>, "parameters": <that tool's schema>}`` (one item when
``parallel_tool_calls`` is false); a named function constrains the output to its ``parameters``
object. Either way the arguments validate against the function's JSON schema. ``auto`` leaves the
model free and parses its output with the model's format; ``none`` ignores the tools.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fdpp.errors import InvalidRequestError
from fdpp.structured.params import StructuredOutputsParams
from fdpp.tools.parsers import (
    NamedFunctionParser,
    RequiredParser,
    ToolParser,
    make_parser,
    template_supports_tools,
)

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass
class ToolPlan:
    """What a request's tools mean for generation: the constraint (None: free text), the parser of
    the output (None: no tool calls possible), and whether calls end with finish_reason "tool_calls"."""

    mode: str  # "none" | "auto" | "required" | "named"
    constraint: StructuredOutputsParams | None
    parser: ToolParser | None
    finish_reason: str | None


def _bad(msg: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(msg, param=param)


def check_tools(tools: Any) -> list[Function]:
    """The functions of an OpenAI ``tools`` list, checked (names unique, parameters a schema object)."""
    if not isinstance(tools, list) or not tools:
        raise _bad("tools must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    out: list[Function] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"{where}: only {{'type': 'function', 'function': {{...}}}} tools are supported", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function must be an object with a name", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise _bad(f"{where}.function.name must be a non-empty string of at most 64 characters", "tools")
        params = fn.get("parameters", _EMPTY_PARAMETERS)
        if params is None:
            params = _EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise _bad(f"{where}.function.parameters must be a JSON schema object", "tools")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise _bad(f"{where}.function.description must be a string", "tools")
        if any(f.name == name for f in out):
            raise _bad(f"{where}: the function name {name!r} is used twice", "tools")
        out.append(Function(name, desc, params))
    return out


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None, parser_name: str) -> ToolPlan:
    """The ``ToolPlan`` of a chat request (``tools`` may be None)."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return ToolPlan("none", None, None, None)
    functions = check_tools(tools)
    names = [f.name for f in functions]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", None, None, None)
    if choice == "auto":
        return ToolPlan("auto", None, make_parser(parser_name, names), "tool_calls")
    if choice == "required":
        schema = required_schema(functions, parallel_tool_calls is not False)
        return ToolPlan("required", StructuredOutputsParams(json=schema, disable_any_whitespace=True),
                        RequiredParser(names), "tool_calls")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad("tool_choice must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        match = next((f for f in functions if f.name == name), None)
        if match is None:
            raise _bad(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)})",
                       "tool_choice")
        # NOTE: OpenAI (and vLLM) end a forced named call with finish_reason "stop".
        return ToolPlan("named", StructuredOutputsParams(json=match.parameters, disable_any_whitespace=True),
                        NamedFunctionParser([name]), None)
    raise _bad(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r:.60}",
               "tool_choice")


def required_schema(functions: Sequence[Function], parallel: bool) -> dict[str, Any]:
    """The JSON schema of ``tool_choice="required"`` outputs: an array of calls of the given functions."""
    items = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters},
              "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


# ---- the conversation the chat template sees -----------------------------------------------------
def check_tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` (OpenAI shape), checked; arguments stay JSON text."""
    if not isinstance(tool_calls, list):
        raise _bad(f"{where}.tool_calls must be a list", "messages")
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where}.tool_calls[{j}] must be {{'id', 'type': 'function', 'function': "
                       "{'name', 'arguments'}}", "messages")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args)
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def template_conversation(conv: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          chat_template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra template arguments for a conversation with tools / tool calls.

    A template that renders ``tools`` gets them as the ``tools`` argument and the calls' arguments as
    objects (as Hugging Face templates expect). A template that does not (SmolLM2's, plain ChatML)
    would show the model nothing, so fdpp writes Hermes' convention into the messages instead: the
    tools in the system message, calls as ``<tool_call>`` blocks, results as ``<tool_response>``
    blocks from the user."""
    if template_supports_tools(chat_template):
        out = []
        for m in conv:
            if m.get("tool_calls"):
                m = dict(m, tool_calls=[_with_object_arguments(c) for c in m["tool_calls"]])
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in conv:
        if m.get("tool_calls"):
            blocks = [_hermes_block(c) for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_call_id"})
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{prompt}")
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Hermes' function-calling system prompt (what Hermes and Qwen templates render)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except (TypeError, ValueError):
        args = fn["arguments"]
    return dict(call, function=dict(fn, arguments=args))


def _hermes_block(call: dict[str, Any]) -> str:
    fn = _with_object_arguments(call)["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
