"""``fdpp chat``: an interactive chat that streams the reply token by token."""
from __future__ import annotations

import argparse
import sys

from fdpp.cli.common import add_model_args, add_sampling_args, llm_from_args, sampling_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat with streaming output",
        description="Chat with the model. Type a message and press Enter; the reply streams as it is "
        "generated. Commands: /reset clears the conversation, /exit (or Ctrl-D) quits.",
    )
    p.add_argument("--system", default=None, help="system message")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    llm = llm_from_args(args)
    params = sampling_from_args(args)
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
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = llm.apply_chat_template(history)
        reply = []
        for delta in llm.stream(prompt_ids, params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
