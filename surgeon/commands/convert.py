"""surgeon convert SRC OUT --transform gated-norm [--transform pre-affine] [--rank 16] [--dtype] [--verify]
    --transform absorb-sinks [--sinks auto | 507,1234] [--scale auto | N] [--scan scan.json] [--data TEXT]
    --transform glu [--glu-alpha A]
    --transform smooth --data TEXT [--smooth-alpha 0.5] [--smooth-tokens 8192]
    --transform hadamard [--hadamard-groups attention_in,attention_out,mlp_in,mlp_out]"""

from __future__ import annotations

import sys
import warnings

from rich.table import Table

from rich.console import Console
from ..errors import SurgeonError
from ..transforms import DEFAULT_RANK, RESIDUAL_READERS, TRANSFORMS
from ..transforms.hadamard import GROUPS as HADAMARD_GROUPS


def add_parser(sub):
    p = sub.add_parser("convert", help="insert GatedNorm / PreAffine, absorb residual sinks, anneal SwiGLU → GLU, "
                                       "fold SmoothQuant scales, rotate linear inputs (Hadamard)",
                       description=__doc__)
    p.add_argument("source", help="source: a Hugging Face model directory, a .gguf file (dequantized first), a hub "
                                  "id in the local cache, or 'default' (SmolLM2-135M)")
    p.add_argument("output", help="output directory (must not exist unless --force)")
    p.add_argument("--transform", "-t", action="append", required=True, choices=sorted(TRANSFORMS),
                   help="a transform pass; repeat to compose (applied in the order given)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="GatedNorm rank r (default %(default)s)")
    p.add_argument("--targets", default=RESIDUAL_READERS,
                   help="comma-separated norm roles: residual (pre-attention, pre-MLP and final; the default), "
                        "or pre_attention, pre_mlp, final, q_norm, k_norm")
    p.add_argument("--qk-norm", action="store_true",
                   help="also target the per-head q_norm and k_norm (qwen3, qwen3_moe)")
    g = p.add_argument_group("absorb-sinks")
    g.add_argument("--sinks", default="auto",
                   help="residual-sink dimensions: auto (from the scan) or comma-separated indices such as 507,1234")
    g.add_argument("--scale", default="auto",
                   help="divide each sink by this power of two (rounded to one, with a warning); auto: the scan's "
                        "scale_pow2, which brings the dimension to the typical level")
    g.add_argument("--scan", default=None, help="scan.json of this model (from `surgeon scan`)")
    g.add_argument("--data", default=None,
                   help="text to scan when there is no --scan (absorb-sinks) and to calibrate smooth: .txt, .jsonl, "
                        "a folder of them, or `default`")
    g.add_argument("--scan-tokens", type=int, default=8192, help="text tokens scanned with --data (default 8192)")
    g = p.add_argument_group("smooth")
    g.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="SmoothQuant's α: the share of each input channel's outlier moved into the weights "
                        "(default %(default)s)")
    g.add_argument("--smooth-tokens", type=int, default=8192,
                   help="calibration tokens of --data (default %(default)s)")
    g = p.add_argument_group("hadamard")
    g.add_argument("--hadamard-groups", default=",".join(HADAMARD_GROUPS),
                   help="the linear inputs rotated online, comma-separated (default: all, %(default)s)")
    g = p.add_argument_group("glu")
    g.add_argument("--glu-alpha", type=float, default=0.0,
                   help="α of act_α = (1−α)·silu + α·σ: 0 (default) keeps the function for annealing in training; "
                        "1 converts to GLU directly (changes the function; a stock model if nothing else is added)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="store floating tensors in this dtype")
    p.add_argument("--shard-size", default="5GB", help="largest shard (default %(default)s)")
    p.add_argument("--verify", action="store_true", help="compare logits of source and result; fail above tolerance")
    p.add_argument("--tolerance", type=float, default=None, help="relative logit tolerance for --verify (1e-5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random W_down initialization")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="(dangerous) let transformers run the source's own code when importing a GGUF")
    p.set_defaults(func=run)


def build_transforms(args) -> list:
    roles = tuple(r.strip() for r in args.targets.split(",") if r.strip())
    if args.qk_norm:
        roles += ("q_norm", "k_norm")
    names = list(args.transform)
    if "absorb-sinks" in names and "pre-affine" in names and names.index("pre-affine") > names.index("absorb-sinks"):
        raise SurgeonError("put pre-affine before absorb-sinks: absorb-sinks inserts PreAffine on the residual "
                           "norms where absent and reuses one that is already there")
    built = []
    for name in names:
        cls = TRANSFORMS[name]
        if name == "absorb-sinks":
            built.append(cls(sinks=args.sinks, scale=args.scale, scan=args.scan, data=args.data,
                             scan_tokens=args.scan_tokens, progress=True))
        elif name == "smooth":
            built.append(cls(data=args.data, alpha=args.smooth_alpha, tokens=args.smooth_tokens, progress=True))
        elif name == "glu":
            built.append(cls(alpha=args.glu_alpha))
        elif name == "hadamard":
            built.append(cls(groups=args.hadamard_groups))
        else:
            kwargs = {"roles": roles}
            if name == "gated-norm":
                kwargs["rank"] = args.rank
            built.append(cls(**kwargs))
    return built


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"surgeon: warning: {message}", file=sys.stderr)


def run(args) -> int:
    from ..convert import convert
    from ..sources import resolve_model

    source = resolve_model(args.source, trust_remote_code=args.trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _print_warning  # one line each, as the errors are
        report = convert(source, args.output, build_transforms(args), dtype=args.dtype,
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
        verdict = (f"[yellow]differs, as expected ({', '.join(v['changed_by'])} changes the function)[/]"
                   if v.get("expected_to_differ") else "[green]ok[/]")
        table.add_row("verify", f"max |Δlogit| {v['max_abs_diff']:.3g} (relative {v['max_rel_diff']:.2g}) "
                                f"over {v['tokens']} tokens: {verdict}")
    Console().print(table)
    return 0
