"""surgeon export RUN_DIR OUT [--dtype bf16|fp32] [--shard-size 5GB] [--step N] [--force]: the weights of a
training run's DeepSpeed checkpoint (any ZeRO stage; `latest` unless --step) consolidated into a Hugging Face model
directory — safetensors shards, the model directory's config (with the training recorded), tokenizer and modeling
file, a manifest and a model card with the run's before/after figures. A GLU model trained to α = 1 is written as
its stock family."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="run directory written by `surgeon train` (run.json, checkpoints/)")
    p.add_argument("output", help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the written weights (default: the trained model directory's)")
    p.add_argument("--shard-size", default="5GB", help="largest shard (default %(default)s)")
    p.add_argument("--step", type=int, help="export checkpoint step<N> instead of the latest")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..export import export

    report = export(args.run_dir, args.output, dtype=args.dtype, shard_size=args.shard_size, step=args.step,
                    force=args.force, show_progress=not args.no_progress)
    table = Table(title=f"surgeon export → {report.output}", show_header=False)
    table.add_row("from", f"{report.run_dir} checkpoint {report.tag} (ZeRO stage {report.zero_stage})")
    table.add_row("trained", f"{report.step:,} steps" + (f", {report.tokens:,} tokens" if report.tokens else "")
                  + (f", world size {report.world_size}" if report.world_size else ""))
    table.add_row("model", f"{report.model_type} ({report.family}, "
                           f"{'stock: no custom code' if report.stock else 'surgeon modules: trust_remote_code'})")
    table.add_row("transforms", ", ".join(report.transforms) or "—")
    if report.glu_alpha is not None:
        table.add_row("GLU α", f"{report.glu_alpha:g}")
    table.add_row("written", f"{report.tensors} tensors, {report.parameters:,} parameters, {report.dtype}, "
                             f"{report.bytes_written / 1e6:,.1f} MB in {len(report.shards)} shard(s)")
    if report.before and report.after:
        b, a = report.before, report.after
        for key, label in (("ppl", "perplexity"), ("residual_peak", "residual peak")):
            if key in b and key in a:
                table.add_row(label, f"{b[key]:.4g} → {a[key]:.4g} (step {b['step']} → {a['step']})")
        for fmt in (a.get("quant_ppl") or {}):
            if fmt in (b.get("quant_ppl") or {}):
                table.add_row(f"W4A4 {fmt} perplexity", f"{b['quant_ppl'][fmt]:.4g} → {a['quant_ppl'][fmt]:.4g}")
    weights = set(report.shards) | {"model.safetensors.index.json"}
    table.add_row("files", ", ".join(f for f in report.files if f not in weights) + f" + {len(weights)} weight files")
    Console().print(table)
    return 0
