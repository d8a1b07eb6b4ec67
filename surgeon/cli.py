"""The `surgeon` command: a thin layer over the library. Each subcommand lives in its own module under
surgeon/commands/ exposing `add_arguments(parser)` and `run(args)`; the table below holds each command's one-line
help, so `surgeon --help` and an argument error of the top-level parser import no command (nor torch): a command's
module is imported when that command is chosen. Adding a command is adding a module and a row."""

from __future__ import annotations

import argparse
import importlib
import sys

# name → one-line help, in the order `surgeon --help` lists them; the module is surgeon/commands/<name with _>.py
COMMANDS = {
    "convert": "insert GatedNorm / PreAffine, absorb residual sinks, anneal SwiGLU → GLU, fold SmoothQuant scales, "
               "rotate linear inputs (Hadamard)",
    "inspect": "describe a checkpoint (reads headers only)",
    "scan": "measure a model's outliers on calibration text (scan.json + figures)",
    "import-gguf": "dequantize a .gguf file into a HF model directory (safetensors + tokenizer)",
    "eval": "perplexity, unquantized and fake-quantized W4A4 (NVFP4, INT4)",
    "pipeline": "the main job: scan → convert → verify → train → export → eval → report",
    "train": "continued pretraining (DeepSpeed) that measures the outliers as it goes",
    "export": "consolidate a training run's checkpoint into a Hugging Face model directory",
    "quantize": "write a compressed-tensors W4 checkpoint (NVFP4, INT4) that serving engines load",
}


class CommandParser(argparse.ArgumentParser):
    """A command's parser that imports the command's module, and gets its arguments from it, only when argparse
    hands it the command line or its help is asked for."""

    def __init__(self, *args, command: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._command = command
        self._loaded = not command

    def load(self) -> None:
        if not self._loaded:
            self._loaded = True
            module = importlib.import_module(f"surgeon.commands.{self._command.replace('-', '_')}")
            self.description = getattr(module, "DESCRIPTION", module.__doc__)
            module.add_arguments(self)
            self.set_defaults(func=module.run)

    def parse_known_args(self, args=None, namespace=None):
        self.load()
        return super().parse_known_args(args, namespace)

    def format_usage(self):
        self.load()
        return super().format_usage()

    def format_help(self):
        self.load()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgeon", description="Model surgery for Hugging Face causal LMs: scan outliers, insert GatedNorm / "
        "PreAffine with the same function, evaluate W4A4.")
    # the `deepspeed` launcher passes --local_rank=N before the command; the process reads LOCAL_RANK instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name, help_line in COMMANDS.items():
        sub.add_parser(name, help=help_line, command=name)
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
