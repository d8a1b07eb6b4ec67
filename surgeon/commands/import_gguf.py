"""`surgeon import-gguf FILE OUT`: dequantize a GGUF checkpoint into a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path


DESCRIPTION = ("Load a GGUF file through transformers' GGUF loader, dequantize it, and write a plain HF model directory "
               "(config, safetensors, tokenizer) atomically. Every surgeon command also accepts a .gguf directly "
               "(imported once into the cache); this writes it where you choose.")


def add_arguments(p) -> None:
    p.add_argument("file", type=Path, help="the .gguf file")
    p.add_argument("out", type=Path, help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the written weights (default fp32: dequantized 4-bit values are exact in it)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="dangerous: run modeling code shipped with the checkpoint")


def run(args) -> int:
    from rich.console import Console

    from ..sources import import_gguf

    out = import_gguf(args.file, args.out, args.dtype, force=args.force, trust_remote_code=args.trust_remote_code)
    Console(stderr=True).print(f"wrote {out} ({args.dtype}) from {args.file}", soft_wrap=True)
    return 0
