"""surgeon convert SRC OUT --transform gated-norm [--transform pre-affine] [--rank 16] [--dtype] [--verify]"""

from __future__ import annotations

from rich.table import Table

from rich.console import Console
from ..transforms import DEFAULT_RANK, RESIDUAL_READERS, TRANSFORMS


def add_parser(sub):
    p = sub.add_parser("convert", help="insert identity-initialized GatedNorm / PreAffine modules",
                       description=__doc__)
    p.add_argument("source", help="source Hugging Face model directory")
    p.add_argument("output", help="output directory (must not exist unless --force)")
    p.add_argument("--transform", "-t", action="append", required=True, choices=sorted(TRANSFORMS),
                   help="a transform pass; repeat to compose (applied in the order given)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="GatedNorm rank r (default %(default)s)")
    p.add_argument("--targets", default=RESIDUAL_READERS,
                   help="comma-separated norm roles: residual (pre-attention, pre-MLP and final; the default), "
                        "or pre_attention, pre_mlp, final, q_norm, k_norm")
    p.add_argument("--qk-norm", action="store_true", help="also target qwen3's per-head q_norm and k_norm")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="store floating tensors in this dtype")
    p.add_argument("--shard-size", default="5GB", help="largest shard (default %(default)s)")
    p.add_argument("--verify", action="store_true", help="compare logits of source and result; fail above tolerance")
    p.add_argument("--tolerance", type=float, default=None, help="relative logit tolerance for --verify (1e-5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random W_down initialization")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def build_transforms(args) -> list:
    roles = tuple(r.strip() for r in args.targets.split(",") if r.strip())
    if args.qk_norm:
        roles += ("q_norm", "k_norm")
    built = []
    for name in args.transform:
        cls = TRANSFORMS[name]
        kwargs = {"roles": roles}
        if name == "gated-norm":
            kwargs["rank"] = args.rank
        built.append(cls(**kwargs))
    return built


def run(args) -> int:
    from ..convert import convert

    report = convert(args.source, args.output, build_transforms(args), dtype=args.dtype,
                     shard_size=args.shard_size, force=args.force, verify=args.verify,
                     tolerance=args.tolerance, seed=args.seed)
    table = Table(title=f"surgeon convert → {report.output}", show_header=False)
    table.add_row("family", report.family)
    table.add_row("transforms", ", ".join(report.transforms))
    table.add_row("parameters", f"{report.params_before:,} → {report.params_after:,} "
                                f"(+{report.params_after - report.params_before:,})")
    table.add_row("tensors rewritten / added", f"{report.tensors_rewritten} / {report.tensors_added}")
    table.add_row("written", f"{report.bytes_written / 1e6:,.1f} MB in {len(report.shards)} shard(s)")
    table.add_row("source sha256", report.source_sha256[:16] + "…")
    if report.verify:
        v = report.verify
        table.add_row("verify", f"max |Δlogit| {v['max_abs_diff']:.3g} (relative {v['max_rel_diff']:.2g}) "
                                f"over {v['tokens']} tokens: [green]ok[/]")
    Console().print(table)
    return 0
