"""``fdpp serve``: the OpenAI-compatible HTTP server (see ``fdpp.server``)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from fdpp.cli.common import add_model_args, llm_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
        description="Start an OpenAI-compatible server: POST /v1/completions, POST /v1/chat/completions "
        "(streaming over SSE or not), GET /v1/models, GET /health, GET /metrics (Prometheus). "
        "Requests are batched continuously on one engine. Stop it with Ctrl-C or SIGTERM: requests in "
        "flight are aborted and the server exits.",
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
                   help="if set, /v1 endpoints require 'Authorization: Bearer <key>' (default: no key)")
    g.add_argument("--timeout-graceful-shutdown", type=float, default=5.0,
                   help="seconds to wait for open connections to close on shutdown (default 5)")
    g.add_argument("--engine-in-background", action="store_true",
                   help="run the engine loop in a background thread and uvicorn on the main thread (default: "
                   "the engine on the main thread, which loaded the model: on the CPU torch runs about twice as "
                   "fast there)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the server and of uvicorn's access log (default info)")
    g.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from fdpp.server.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = llm_from_args(args)
    app = build_app(llm, served_model_names=args.served_model_name, max_body_bytes=args.max_body_bytes,
                    max_n=args.max_n, api_key=args.api_key, start_engine=args.engine_in_background)
    aeng = app.state.fdpp.async_engine
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.no_access_log,
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    names = ", ".join(app.state.fdpp.served_model_names)
    banner = f"fdpp serve: {names} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)"

    if args.engine_in_background:
        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:  # SIGINT / SIGTERM
                aeng.request_stop()  # abort what is in flight so open streams end now
                super().handle_exit(sig, frame)

        print(banner, file=sys.stderr)
        _Server(config).run()
        return 0

    # uvicorn (HTTP, asyncio) in a background thread; the engine loop here on the main thread.
    server = uvicorn.Server(config)
    signals: list[int] = []

    def on_signal(sig: int, frame) -> None:
        if signals:  # a second Ctrl-C: do not wait for connections to close
            server.force_exit = True
        signals.append(sig)
        aeng.request_stop()  # in-flight requests are aborted; their streams end with an error event
        server.should_exit = True

    aeng.claim()
    http = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    http.start()

    def watch_http() -> None:  # uvicorn gone (e.g. the port is taken): stop the engine loop too
        http.join()
        aeng.request_stop()

    threading.Thread(target=watch_http, name="uvicorn-watch", daemon=True).start()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not server.started and http.is_alive():
            time.sleep(0.05)
        if server.started:
            print(banner, file=sys.stderr)
        aeng.run_forever()
    finally:
        server.should_exit = True
        http.join(args.timeout_graceful_shutdown + 10)
        for s, h in old.items():
            signal.signal(s, h)
    if not server.started:
        print(f"fdpp serve: the HTTP server did not start on {args.host}:{args.port} (see the log above)",
              file=sys.stderr)
        return 1
    if aeng.error is not None:
        return 1
    return 0
