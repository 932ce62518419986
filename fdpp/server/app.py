"""The OpenAI-compatible HTTP API (FastAPI) over one ``AsyncEngine``.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streaming over SSE and not),
GET /v1/models, GET /health, GET /version, GET /metrics (Prometheus), POST /tokenize, /detokenize.

``build_app(llm)`` takes an ``fdpp.LLM`` (or an ``LLMEngine``) that is already loaded, so a process (or
a test) can serve the model it holds. From then on only the engine thread touches the engine.

One module per concern: ``state`` (what handlers share), ``errors`` (OpenAI error bodies),
``guard`` (body limit, API key, request counting), ``validation`` (parsing, shared checks, request ->
``SamplingParams``), ``streaming`` (the one SSE loop), ``completions`` and ``chat`` (the endpoints),
``endpoints`` (the small ones), ``metrics`` (Prometheus). A bad request never affects the others.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from fdpp.server import chat, completions, endpoints
from fdpp.server import metrics as metrics_routes
from fdpp.server.async_engine import AsyncEngine
from fdpp.server.errors import APIError, install_error_handlers
from fdpp.server.guard import Guard
from fdpp.server.metrics import ServerMetrics
from fdpp.server.state import ServerState, default_model_name
from fdpp.server.validation import DEFAULT_MAX_N

DEFAULT_MAX_BODY_BYTES = 4 << 20

__all__ = ["APIError", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_N", "ServerState", "build_app"]


def build_app(llm: Any, *, served_model_names: list[str] | str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_n: int = DEFAULT_MAX_N,
              api_key: str | None = None, async_engine: AsyncEngine | None = None,
              engine_stop_timeout: float = 30.0, tool_call_parser: str = "auto") -> FastAPI:
    """A FastAPI app serving ``llm`` (an ``fdpp.LLM`` or ``LLMEngine``).

    ``tool_call_parser`` names the format of the model's tool calls (``fdpp.tools.PARSERS``); "auto"
    picks it from the chat template and the model family.

    The engine loop starts in a background thread with the app (lifespan start-up) and stops at
    shutdown, aborting what is in flight; shutdown waits at most ``engine_stop_timeout`` seconds for the
    step that is running. ``app.state.fdpp`` is the ``ServerState`` (``.async_engine``).

    Why a background thread and not the main one (the thread that loaded the model): on a small CPU
    box torch's OpenMP pool is about 2x faster for the thread that created it while nothing else runs,
    but with the HTTP thread competing for the cores its spinning workers stall steps for seconds
    (measured on 2 cores: 16 sequences x 12 tokens 2.2 s alone, 30 s next to a lightly busy Python
    thread). A pool created by a later thread waits passively: steady, if slower.
    """
    engine = getattr(llm, "engine", llm)
    if isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    root = getattr(engine.config, "model", None) or "SmolLM2-135M-Instruct"
    names = list(served_model_names or []) or [default_model_name(engine)]
    aeng = async_engine or AsyncEngine(engine)
    if tool_call_parser != "auto":
        from fdpp.tools import make_parser

        make_parser(tool_call_parser)  # an unknown name fails here, at start-up
    st = ServerState(aeng, engine, names, int(max_body_bytes), int(max_n), api_key, ServerMetrics(names[0]),
                     str(root), tool_call_parser)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aeng.start()
        try:
            yield
        finally:
            await asyncio.to_thread(aeng.shutdown, engine_stop_timeout)

    app = FastAPI(title="fdpp OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.fdpp = st
    install_error_handlers(app)

    for module in (endpoints, metrics_routes, completions, chat):
        app.include_router(module.router)
    app.add_middleware(Guard, state=st)
    return app
