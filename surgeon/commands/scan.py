"""`surgeon scan MODEL --data TEXT`: measure residual sinks, massive activations and attention sinks."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SurgeonError


DESCRIPTION = ("One calibration pass with hooks: per-layer max |h| of the residual stream, residual-sink dimensions, "
               "massive activations, attention sinks; writes scan.json and PNG figures.")


def add_arguments(p) -> None:
    p.add_argument("model", help="HF model directory, .gguf file, hub id (org/name, from the local cache) or "
                                 "`default` (SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help="text: .txt file, .jsonl with a `text` field, a folder of them, "
                                                 "or `default` (Shakespeare)")
    p.add_argument("--tokens", type=int, default=8192, help="text tokens to read (default 8192)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window, BOS excluded (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--skip-tokens", type=int, default=0, help="start this many tokens into the text (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for scan.json and the PNGs (default runs/scan-<model>)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--sink-ratio", type=float, default=8.0,
                   help="a dimension is a residual sink when its mean |h| is this many times the median's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plots", action="store_true", help="write scan.json only")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="dangerous: run modeling code shipped with the checkpoint")


def _slug(spec: str) -> str:
    name = Path(spec.rstrip("/")).name or spec
    name = name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def run(args) -> int:
    import torch
    from rich.console import Console

    from .. import plots
    from ..scan import print_report, scan
    from ..dtypes import DTYPES
    from ..sources import iter_token_windows, load_model, resolve_model, resolve_text

    for name in ("tokens", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise SurgeonError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.skip_tokens < 0:
        raise SurgeonError(f"--skip-tokens must be 0 or more (got {args.skip_tokens})")
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    out = args.out or Path("runs") / f"scan-{_slug(args.model)}"
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"--out {out} exists and is not a directory: choose another path")

    # resolve everything before the long pass, so a bad argument fails in a second, not after the scan
    text_paths = resolve_text(args.data)
    model_path = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    console.print(f"[bold]scan[/] {args.model} ({model_path}) on {len(text_paths)} text file(s), "
                  f"{args.tokens:,} tokens in windows of {args.seq_len}", soft_wrap=True)
    model, tokenizer = load_model(model_path, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code)
    windows = iter_token_windows(text_paths, tokenizer, args.seq_len, args.tokens, args.batch_size,
                                 skip_tokens=args.skip_tokens)
    report = scan(model, tokenizer, windows, model_name=args.model, model_path=str(model_path),
                  sink_ratio=args.sink_ratio, total_tokens=_expected_tokens(args, tokenizer))

    out.mkdir(parents=True, exist_ok=True)
    written = [report.save(out / "scan.json")]
    if not args.no_plots:
        written += plots.write_all(report, out)
    print_report(report, Console())
    console.print("wrote " + ", ".join(str(p) for p in written), soft_wrap=True)
    return 0


def _expected_tokens(args, tokenizer) -> int:
    """What the progress bar counts to: whole windows, BOS included."""
    windows = max(1, args.tokens // args.seq_len)
    return windows * (args.seq_len + (tokenizer.bos_token_id is not None))
