"""The ``fdpp`` command line: generate | chat | serve | bench | tune | calibrate."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "generate": "fdpp.cli.generate",
    "chat": "fdpp.cli.chat",
    "serve": "fdpp.cli.serve",
    "bench": "fdpp.cli.bench",
    "tune": "fdpp.cli.tune",
    "calibrate": "fdpp.cli.calibrate",
}


def build_parser() -> argparse.ArgumentParser:
    from fdpp.cli.common import Parser

    parser = Parser(
        prog="fdpp",
        description="fdpp: fast LLM inference (FlashDecoding++ in Triton). With no --model, the embedded "
        "SmolLM2-135M-Instruct is used. Run 'fdpp COMMAND --help' for a command's flags.",
    )
    from fdpp import __version__

    parser.add_argument("--version", action="version", version=f"fdpp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a command whose optional dependencies are missing
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(_unavailable=str(e))
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"fdpp {args.command}: unavailable: {args._unavailable}", file=sys.stderr)
        return 1
    from fdpp.errors import FdppError

    try:
        return int(args.func(args) or 0)
    except FdppError as e:
        print(f"fdpp {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
