"""What every handler of one app shares: the engine bridge, the served names, the limits, the metrics."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from fdpp.server.async_engine import AsyncEngine
from fdpp.server.metrics import ServerMetrics


@dataclass
class ServerState:
    async_engine: AsyncEngine
    engine: Any  # the LLMEngine: read-only attributes (tokenizer, max_model_len, model_config) only
    served_model_names: list[str]
    max_body_bytes: int
    max_n: int
    api_key: str | None
    metrics: ServerMetrics
    root: str
    tool_call_parser: str = "auto"  # the format of tool calls in outputs (fdpp.tools.PARSERS), or auto
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.vocab_size)

    @property
    def kv_capacity_tokens(self) -> int:
        bm = self.engine.block_manager  # sizes only: fixed at start-up
        return int(bm.num_blocks) * int(bm.block_size)

    @property
    def tool_parser_name(self) -> str:
        """The tool-call format: ``--tool-call-parser``, or picked from the chat template and family."""
        if self.tool_call_parser != "auto":
            return self.tool_call_parser
        from fdpp.tools import pick_parser_name

        return pick_parser_name(getattr(self.tokenizer, "chat_template", None), self.engine.model_config.model_type)

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = t
        return t


def state_of(request: Request) -> ServerState:
    """The ``ServerState`` of the app serving ``request``."""
    return request.app.state.fdpp


def default_model_name(engine: Any) -> str:
    model = getattr(engine.config, "model", None)
    if not model:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(str(model))) or str(model)
