"""The `surgeon` command: a thin layer over the library. Each subcommand lives in its own module under
surgeon/commands/ exposing `add_parser(subparsers)` (which sets `func`) — adding a command is adding a module."""

from __future__ import annotations

import argparse
import importlib
import sys


COMMANDS = ["convert", "inspect", "scan", "import_gguf", "eval", "pipeline", "train", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgeon", description="Model surgery for Hugging Face causal LMs: scan outliers, insert GatedNorm / "
        "PreAffine with the same function, evaluate W4A4.")
    # the `deepspeed` launcher passes --local_rank=N before the command; the process reads LOCAL_RANK instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"surgeon.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # the one error path: every failure is one line (staging dirs are gone already)
        return _fail(err, args)
    except KeyboardInterrupt as err:
        return _fail(err, args)


def _fail(err: BaseException, args) -> int:
    from .errors import debug, describe

    message, code = describe(err, getattr(args, "command", None))
    if debug():
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    print(f"surgeon: error: {message}", file=sys.stderr)
    return code

if __name__ == "__main__":
    sys.exit(main())
