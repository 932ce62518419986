"""``fdpp serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    from fdpp import LLM
    from fdpp.server import build_app
    app = build_app(LLM())            # then: uvicorn.run(app, host="127.0.0.1", port=8000)

See ``fdpp.server.app`` (endpoints, errors, metrics) and ``fdpp.server.async_engine`` (the engine loop).
"""
from fdpp.server.async_engine import AsyncEngine, EngineDeadError, RequestAbortedError, RequestGroup

__all__ = ["AsyncEngine", "EngineDeadError", "RequestAbortedError", "RequestGroup", "build_app"]


def build_app(*args, **kwargs):
    """See ``fdpp.server.app.build_app`` (imported lazily: FastAPI is only needed to serve)."""
    from fdpp.server.app import build_app as _build_app

    return _build_app(*args, **kwargs)
