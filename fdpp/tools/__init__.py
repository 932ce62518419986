"""Tool calling: output parsers per model format (``parsers``) and what ``tools`` / ``tool_choice``
mean for a request (``choice``). Pure Python: no engine, no server."""
from fdpp.tools.choice import ToolPlan, plan_tools, template_conversation
from fdpp.tools.parsers import PARSERS, ToolCall, ToolCallStreamer, make_parser, pick_parser_name

__all__ = ["PARSERS", "ToolCall", "ToolCallStreamer", "ToolPlan", "make_parser", "pick_parser_name",
           "plan_tools", "template_conversation"]
