"""``fdpp serve``: the OpenAI-compatible HTTP server (see ``fdpp.server``)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from fdpp.cli.common import add_model_args, llm_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
        description="Start an OpenAI-compatible server: POST /v1/completions, POST /v1/chat/completions "
        "(streaming over SSE or not), GET /v1/models, GET /health, GET /metrics (Prometheus). "
        "Requests are batched continuously on one engine. Stop it with Ctrl-C or SIGTERM: it stops "
        "accepting connections, lets the requests in flight finish for up to --drain-timeout seconds, aborts "
        "the rest (streams end with an error event and [DONE]) and exits with status 0; a second Ctrl-C "
        "stops at once.",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; use 0.0.0.0 to accept remote clients)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send in 'model' (default: the model folder/file name, or "
                   "SmolLM2-135M-Instruct for the embedded model); the first is reported in responses")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest accepted request body in bytes; larger ones get 413 (default 4 MiB)")
    g.add_argument("--max-n", type=int, default=16,
                   help="largest 'n' (completions per prompt) a request may ask for (default 16)")
    g.add_argument("--api-key", default=None,
                   help="if set, every endpoint (/v1/*, /tokenize, /detokenize) requires 'Authorization: Bearer "
                   "<key>', except /health, /ping, /version and /metrics, which stay open for probes and "
                   "scrapers (default: no key)")
    g.add_argument("--drain-timeout", "--timeout-graceful-shutdown", dest="drain_timeout", type=float, default=5.0,
                   metavar="SECONDS",
                   help="on Ctrl-C / SIGTERM, seconds the requests in flight may take to finish before they are "
                   "aborted (default 5)")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template for /v1/chat/completions (a file path, or the template itself) "
                   "instead of the model's own")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the server and of uvicorn's access log (default info)")
    g.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    from fdpp.structured.params import DEFAULT_COMPILE_TIMEOUT_S, DEFAULT_MAX_SPEC_BYTES
    from fdpp.tools import PARSERS

    g = p.add_argument_group("structured output and tool calling")
    g.add_argument("--tool-call-parser", default="auto", choices=["auto", *PARSERS],
                   help="format of the model's tool calls (default auto: from the chat template, else the model "
                   "family; templates without tools get a Hermes-style prompt and parser)")
    g.add_argument("--structured-outputs-compile-timeout", type=float, default=DEFAULT_COMPILE_TIMEOUT_S,
                   metavar="SECONDS", help="a JSON schema / regex / grammar that takes longer to compile is "
                   f"refused with a 400 (default {DEFAULT_COMPILE_TIMEOUT_S:g})")
    g.add_argument("--structured-outputs-max-bytes", type=int, default=DEFAULT_MAX_SPEC_BYTES, metavar="BYTES",
                   help="a JSON schema / regex / grammar larger than this is refused with a 400 "
                   f"(default {DEFAULT_MAX_SPEC_BYTES})")
    add_model_args(p)
    p.set_defaults(func=run)


# After the drain time: how long readers wait for the engine's current step before giving up on their
# requests, and how long shutdown waits for that step before exiting without it.
_ABORT_GRACE_S = 1.0


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from fdpp.errors import FdppError
    from fdpp.server.app import build_app

    if args.drain_timeout < 0:  # before the (slow) model load
        raise FdppError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = llm_from_args(args, structured_outputs_compile_timeout=args.structured_outputs_compile_timeout,
                        structured_outputs_max_bytes=args.structured_outputs_max_bytes)
    if args.chat_template:
        _set_chat_template(llm, args.chat_template)
    app = build_app(llm, served_model_names=args.served_model_name, max_body_bytes=args.max_body_bytes,
                    max_n=args.max_n, api_key=args.api_key, engine_stop_timeout=_ABORT_GRACE_S,
                    tool_call_parser=args.tool_call_parser)
    aeng = app.state.fdpp.async_engine
    aeng.stop_grace_s = _ABORT_GRACE_S
    drain = args.drain_timeout
    # uvicorn waits this long for open requests, then cancels them: past the drain time the engine has
    # aborted them (after at most its current step, or _ABORT_GRACE_S), so they end on their own first.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.no_access_log, timeout_graceful_shutdown=drain + 3 * _ABORT_GRACE_S)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # SIGINT / SIGTERM
            # uvicorn would re-raise the signal once shut down (exit status -15); a requested stop that
            # went as planned exits 0 instead. A second Ctrl-C stops waiting.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def shutdown(self, sockets=None) -> None:
            # uvicorn stops accepting and waits for the requests in flight; after the drain time the
            # engine aborts what is left (open streams end with an error event and [DONE]).
            timer = asyncio.get_running_loop().call_later(drain, aeng.request_stop)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    server = _Server(config)
    names = ", ".join(app.state.fdpp.served_model_names)
    print(f"fdpp serve: {names} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
    server.run()
    if not aeng.is_dead:
        # The engine thread is still inside a long step (a second Ctrl-C, or a step longer than the
        # grace time): every request has been answered, so exit without waiting for the step.
        logging.getLogger(__name__).warning("exiting while the engine finishes its current step")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _set_chat_template(llm, value: str) -> None:
    import os

    from fdpp.errors import FdppError

    tok = llm.get_tokenizer()
    if tok is None:
        raise FdppError("--chat-template: this model has no tokenizer")
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    elif "{" not in value:
        raise FdppError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    tok.chat_template = value  # set before the engine thread starts
