"""Tool-call parsers (pure: no model): each format in full and streamed in pieces."""
from __future__ import annotations

import json
import random

import pytest

from fdpp.errors import InvalidRequestError
from fdpp.tools import ToolCallStreamer, make_parser, pick_parser_name, plan_tools, template_conversation
from fdpp.tools.parsers import NamedFunctionParser, RequiredParser

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
NAMES = ["get_weather", "add"]

# (parser, text, content, [(name, arguments)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", '{"city": "Paris"}')]),
    ("hermes", '<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}</tool_call>\n<tool_call>\n'
               '{"name": "get_weather", "arguments": {"city": "Oslo \\"N\\" {x}"}}\n</tool_call>',
     "", [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Oslo \\"N\\" {x}"}')]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    ("llama3_json", '{"name": "add", "parameters": {"a": 4, "b": 5}}', "", [("add", '{"a": 4, "b": 5}')]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 4, "b": 5}}; {"name": "get_weather", '
                    '"parameters": {"city": "Rome"}}', "", [("add", '{"a": 4, "b": 5}'), ("get_weather", '{"city": "Rome"}')]),
    ("llama3_json", "The answer is 9.", "The answer is 9.", []),
    ("llama3_json", '{"answer": 9}', '{"answer": 9}', []),  # JSON but not a call
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", '
                '"arguments": {"city": "Lima"}}]', "Sure.", [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Lima"}')]),
    ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 7, "b": 8}[TOOL_CALLS]get_weather[ARGS]{"city": "Kyiv"}', "",
     [("add", '{"a": 7, "b": 8}'), ("get_weather", '{"city": "Kyiv"}')]),
    ("glm4", 'get_weather\n{"city": "Beijing"}', "", [("get_weather", '{"city": "Beijing"}')]),
    ("glm4", "get weather is not a tool name\nso this is text", "get weather is not a tool name\nso this is text", []),
]


def _stream(parser, text, rng):
    """Feed ``text`` in random pieces; return (content, [(name, arguments)], ids) from the deltas."""
    streamer = ToolCallStreamer(parser)
    content, calls = "", {}
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) + [len(text)]
    for i, cut in enumerate(cuts):
        c, deltas = streamer.update(text[:cut], final=i == len(cuts) - 1)
        content += c
        for d in deltas:
            entry = calls.setdefault(d["index"], {"name": None, "arguments": "", "id": None})
            if "id" in d:
                assert entry["id"] is None and d["type"] == "function" and d["function"]["arguments"] == ""
                entry["id"], entry["name"] = d["id"], d["function"]["name"]
            else:
                assert entry["id"] is not None, "arguments before the call was announced"
                entry["arguments"] += d["function"]["arguments"]
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_parse_in_full_and_streamed(name, text, content, calls):
    parser = make_parser(name, NAMES)
    ex = parser.extract(text, final=True)
    got = [(c.name, c.arguments) for c in ex.tool_calls()] if ex.ok else []
    assert (ex.content if ex.ok else text) == content
    assert got == calls
    for c in got:
        json.loads(c[1])
    rng = random.Random(0)
    for _ in range(20):  # the deltas add up to the non-streaming result, however the text is cut
        assert _stream(make_parser(name, NAMES), text, rng) == (content, calls)


def test_a_call_cut_off_is_text_when_not_streamed():
    # NOTE: a stream has announced the call by then (it cannot be taken back); both end with "length"
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    ex = make_parser("hermes", NAMES).extract(text, final=True)
    assert not ex.ok
    assert _stream(make_parser("hermes", NAMES), text, random.Random(0)) == ("", [("add", '{"a": 1')])


def test_forced_outputs():
    assert _stream(NamedFunctionParser(["add"]), '{"a": 1, "b": 2}', random.Random(1)) == ("", [("add", '{"a": 1, "b": 2}')])
    text = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "get_weather", "parameters": {"city": "X"}}]'
    ex = RequiredParser(NAMES).extract(text, final=True)
    assert ex.ok and [(c.name, c.arguments) for c in ex.tool_calls()] == [("add", '{"a": 1, "b": 2}'),
                                                                          ("get_weather", '{"city": "X"}')]
    assert _stream(RequiredParser(NAMES), text, random.Random(2))[1] == [("add", '{"a": 1, "b": 2}'),
                                                                         ("get_weather", '{"city": "X"}')]


def test_plan_tools_modes_and_errors():
    assert plan_tools(None, None, None, "hermes").mode == "none"
    assert plan_tools(TOOLS, "none", None, "hermes").parser is None
    auto = plan_tools(TOOLS, None, None, "mistral")
    assert auto.mode == "auto" and auto.constraint is None and auto.parser.name == "mistral"
    req = plan_tools(TOOLS, "required", False, "hermes")
    assert req.constraint.json["maxItems"] == 1 and req.finish_reason == "tool_calls"
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, None, "hermes")
    assert named.constraint.json == TOOLS[1]["function"]["parameters"] and named.finish_reason is None
    for tools, choice, words in [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
        (TOOLS, "sometimes", "tool_choice must be"),
        (None, "required", "needs tools"),
        ([{"type": "function", "function": {"name": ""}}], None, "name"),
        (TOOLS + TOOLS[:1], None, "used twice"),
        ([{"type": "retrieval"}], None, "only"),
    ]:
        with pytest.raises(InvalidRequestError, match=words):
            plan_tools(tools, choice, None, "hermes")


def test_parser_pick_and_template_conversation():
    assert pick_parser_name(None, "llama") == "hermes"  # no tools in the template: Hermes fallback prompt
    assert pick_parser_name("{% if tools %}<|python_tag|>{% endif %}", "llama") == "llama3_json"
    assert pick_parser_name("{{ tools }} [TOOL_CALLS]", "mistral") == "mistral"
    assert pick_parser_name("{{ tools }}", "chatglm") == "glm4"
    conv = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    msgs, kwargs = template_conversation(conv, TOOLS, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert kwargs == {} and msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' == msgs[2]["content"]
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    msgs, kwargs = template_conversation(conv, TOOLS, "{{ tools }}")
    assert kwargs == {"tools": TOOLS} and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
