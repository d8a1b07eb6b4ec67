"""surgeon quantize MODEL OUT [--scheme nvfp4|nvfp4a16|w4a4|w4a16] [--data TEXT] [--tokens N] [--force]: a
compressed-tensors checkpoint of MODEL (converted, trained or stock) that vLLM and other serving engines load: the
linears' weights packed to 4 bits, NVFP4's input global scales calibrated on the text, the LM head and gate
projections kept in full precision, a model card saying how it was made. Written atomically."""

from __future__ import annotations

from pathlib import Path


# surgeon.deploy.SCHEMES' names (tests/test_deploy.py holds them equal): the help imports no torch
SCHEME_NAMES = ("nvfp4", "nvfp4a16", "w4a4", "w4a16")


def add_arguments(p) -> None:
    p.add_argument("model", help="model directory, .gguf file, hub id, or 'default'")
    p.add_argument("output", help="output directory (must not exist unless --force)")
    p.add_argument("--scheme", default="nvfp4", help=f"one of {', '.join(SCHEME_NAMES)} (%(default)s)")
    p.add_argument("--data", default="default",
                   help="calibration text: file, folder, JSONL or 'default' (Shakespeare); nvfp4 calibrates on it")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (%(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (%(default)s)")
    p.add_argument("--skip-tokens", type=int, default=0, help="tokens of the text skipped first (%(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-remote-code", action="store_true", help="(dangerous) run a checkpoint's own code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..deploy import quantize, scheme_of
    from ..sources import resolve_model, resolve_text

    spec = scheme_of(args.scheme)  # a bad scheme is refused before anything loads
    source = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    text = resolve_text(args.data) if spec.calibrates_inputs else None
    report = quantize(source, Path(args.output), spec.name, text=text, tokens=args.tokens, seq_len=args.seq_len,
                      skip_tokens=args.skip_tokens, force=args.force, trust_remote_code=args.trust_remote_code,
                      show_progress=not args.no_progress)
    table = Table(title=f"surgeon quantize → {report.output}", show_header=False)
    table.add_row("scheme", f"{report.scheme} ({report.format}): {spec.description}")
    table.add_row("layers", f"{report.layers} quantized, {len(report.kept_full_precision)} in full precision")
    table.add_row("calibration", f"{report.calibration_tokens:,} tokens" if report.calibration_tokens else "none")
    table.add_row("weights", f"{report.bytes_source / 1e6:,.1f} MB → {report.bytes_written / 1e6:,.1f} MB")
    table.add_row("took", f"{report.seconds:.1f} s, peak memory {report.peak_rss_mb:,.0f} MB")
    table.add_row("files", ", ".join(report.files))
    Console().print(table)
    return 0
