"""``fdpp chat``: an interactive chat that streams the reply token by token."""
from __future__ import annotations

import argparse
import sys

from fdpp.cli.common import add_model_args, add_sampling_args, llm_from_args, sampling_from_args
from fdpp.errors import InvalidRequestError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat with streaming output",
        description="Chat with the model. Type a message and press Enter; the reply streams as it is "
        "generated. Ctrl-C during a reply stops that reply (the chat goes on); Ctrl-C at the prompt, "
        "/exit or Ctrl-D quits. /reset clears the conversation.",
    )
    p.add_argument("--system", default=None, help="system message")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)  # before loading: a bad flag costs no load time
    llm = llm_from_args(args)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise InvalidRequestError(
            f"{args.model} has no tokenizer (random weights), so it cannot chat; try "
            f"'fdpp generate --raw --model {args.model} TEXT' to complete text instead"
        )
    if not getattr(tokenizer, "chat_template", None):
        print("note: this model has no chat template, so messages are sent as 'role: content' lines; "
              "for plain text completion use 'fdpp generate --raw'", file=sys.stderr)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    base = list(history)
    interactive = sys.stdin.isatty()
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    break
                line = line.rstrip("\n")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            break
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(base)
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        reply = _stream_reply(llm, history, params)
        history.append({"role": "assistant", "content": reply})
    return 0


def _stream_reply(llm, history: list[dict[str, str]], params) -> str:
    """Stream one reply to stdout; Ctrl-C stops it (the request is aborted, its KV blocks freed) and
    keeps what was shown so far as the reply."""
    reply: list[str] = []
    stream = llm.stream(llm.apply_chat_template(history), params)
    try:
        for delta in stream:
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()  # aborts the request
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return "".join(reply).strip()
