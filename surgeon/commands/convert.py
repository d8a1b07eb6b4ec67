"""surgeon convert SRC OUT --transform gated-norm [--transform pre-affine] [--rank 16] [--dtype] [--verify]
    --transform absorb-sinks [--sinks auto | 507,1234] [--scale auto | N] [--scan scan.json] [--data TEXT]
    --transform glu [--glu-alpha A]
    --transform smooth --data TEXT [--smooth-alpha 0.5] [--smooth-tokens 8192]
    --transform hadamard [--hadamard-groups attention_in,attention_out,mlp_in,mlp_out]
    --auto --data TEXT [--format nvfp4|int4|both]: the -t passes, then smooth and hadamard where they lower the
           format's W4A4 error on TEXT (surgeon/choose.py; the table it decided from is printed)"""

from __future__ import annotations

import sys
import warnings


def add_arguments(p) -> None:
    from ..transforms import TRANSFORMS  # the passes declare their options (and import torch)

    p.add_argument("source", help="source: a Hugging Face model directory, a .gguf file (dequantized first), a hub "
                                  "id in the local cache, or 'default' (SmolLM2-135M)")
    p.add_argument("output", help="output directory (must not exist unless --force)")
    p.add_argument("--transform", "-t", action="append", default=[], choices=sorted(TRANSFORMS),
                   help="a transform pass; repeat to compose (applied in the order given)")
    p.add_argument("--auto", action="store_true",
                   help="after the -t passes, add smooth (at one of --smooth-alphas) and hadamard (every group or "
                        "one) only where they lower the --format W4A4 error on --data (measured, table printed)")
    p.add_argument("--format", choices=["nvfp4", "int4", "both"], default="both",
                   help="with --auto: the W4A4 format(s) a chosen pass must not make worse (%(default)s)")
    p.add_argument("--smooth-alphas", default="0.5,0.65,0.8",
                   help="with --auto: smooth's α candidates, comma-separated (%(default)s)")
    add_pass_options(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="store floating tensors in this dtype")
    p.add_argument("--shard-size", default="5GB", help="largest shard (default %(default)s)")
    p.add_argument("--verify", action="store_true", help="compare logits of source and result; fail above tolerance")
    p.add_argument("--tolerance", type=float, default=None, help="relative logit tolerance for --verify (1e-5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random W_down initialization")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="(dangerous) let transformers run the source's own code when importing a GGUF")


def add_pass_options(parser) -> None:
    """Every pass's own options, in TRANSFORMS order: under a heading of the pass's name, or among the command's
    own (cli_group false); an option that several passes share is added once, where it first appears."""
    from ..transforms import TRANSFORMS

    added: dict[str, object] = {}
    for cls in TRANSFORMS.values():
        group = None
        for option in cls.options:
            if option.flags[0] in added:
                if added[option.flags[0]] is not option:
                    raise RuntimeError(f"{cls.name} declares {option.flags[0]} unlike the pass that added it")
                continue
            if group is None:
                group = parser.add_argument_group(cls.name) if cls.cli_group else parser
            group.add_argument(*option.flags, **option.kwargs)
            added[option.flags[0]] = option


def build_transforms(args) -> list:
    """The passes named by --transform, in the order given, each built from its own options."""
    from ..transforms import TRANSFORMS

    return [TRANSFORMS[name].from_args(args) for name in args.transform]


def _chosen(args, source, base: list) -> list:
    """--auto: the optional passes the chooser keeps on top of `base` (surgeon.choose), measured on --data."""
    from ..choose import SMOOTH_ALPHAS, choose
    from ..errors import SurgeonError
    from ..sources import resolve_text

    named = [t.name for t in base if t.name in ("smooth", "hadamard")]
    if named:
        raise SurgeonError(f"--auto chooses smooth and hadamard itself: drop -t {named[0]}")
    if args.data is None:
        raise SurgeonError("--auto measures the passes on calibration text: add --data TEXT (.txt, .jsonl, a folder, "
                           "or `default`)")
    try:
        alphas = tuple(float(a) for a in args.smooth_alphas.split(",") if a.strip()) or SMOOTH_ALPHAS
    except ValueError:
        raise SurgeonError(f"--smooth-alphas {args.smooth_alphas!r} is not a comma-separated list of numbers") from None
    text = resolve_text(args.data)
    return choose(source, base, text, target=args.format, alphas=alphas, smooth_tokens=args.smooth_tokens).passes


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"surgeon: warning: {message}", file=sys.stderr)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..convert import convert
    from ..errors import SurgeonError
    from ..sources import resolve_model
    from ..transforms import TRANSFORMS

    if not args.transform and not args.auto:
        raise SurgeonError(f"convert needs a pass: -t NAME (one of {', '.join(sorted(TRANSFORMS))}; repeat to "
                           "compose), or --auto --data TEXT to choose smooth and hadamard by measurement")
    source = resolve_model(args.source, trust_remote_code=args.trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _print_warning  # one line each, as the errors are
        transforms = build_transforms(args)
        if args.auto:
            transforms += _chosen(args, source, transforms)
            if not transforms:
                raise SurgeonError("--auto kept no pass (none lowered the W4A4 error: the table above) and no -t was "
                                   "given: nothing to convert")
        report = convert(source, args.output, transforms, dtype=args.dtype,
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
