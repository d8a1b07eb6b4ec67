"""surgeon eval MODEL [MODEL ...] --data TEXT [--quant none,nvfp4,int4] [--smoothquant [ALPHA]]: perplexity with fake-quantized W4A4,
models side by side, each with its ratio to its own unquantized perplexity. A compressed-tensors checkpoint (surgeon
quantize) is evaluated as its format computes it, beside the others on the same windows."""

from __future__ import annotations

from pathlib import Path

from ..errors import SurgeonError


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="model directories, .gguf files, hub ids, or 'default'")
    p.add_argument("--data", default="default", help="text file, folder, JSONL, or 'default' (Shakespeare)")
    p.add_argument("--quant", default="none,nvfp4,int4", help="comma-separated formats (%(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window, BOS added (%(default)s)")
    p.add_argument("--windows", type=int, default=8, help="number of windows (%(default)s)")
    p.add_argument("--skip-tokens", type=int, default=1000, help="tokens skipped at the start (%(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize the LM head too")
    p.add_argument("--smoothquant", type=float, nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="also evaluate each format after a SmoothQuant pre-pass (α, default 0.5), calibrated on "
                        "the skipped tokens before the evaluation windows")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--trust-remote-code", action="store_true", help="(dangerous) run a checkpoint's own code")


def parse_formats(text: str) -> tuple[str, ...]:
    from ..quant import FORMATS

    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SurgeonError(f"unknown quantization format(s) {', '.join(bad) or text!r}; use {', '.join(FORMATS)}")
    return formats


def run(args) -> int:
    import torch
    from rich.console import Console

    from ..deploy import deployed_scheme, is_compressed, load_compressed
    from ..evaluate import evaluate_deployed, evaluate_model, save, table
    from ..progress import progress_bar
    from ..quant import DEFAULT_SKIP, smoothquant_scales
    from ..sources import iter_token_windows, load_model, resolve_model, resolve_text

    formats = parse_formats(args.quant)
    paths = resolve_text(args.data)
    dirs = [resolve_model(m, trust_remote_code=args.trust_remote_code) for m in args.models]
    skip = tuple(s for s in DEFAULT_SKIP if not (args.quantize_lm_head and s == "lm_head"))
    torch.manual_seed(0)
    results, windows, calibration = [], None, None
    n_quantized = len([f for f in dict.fromkeys(formats) if f != "none"])
    n_steps = len(dirs) * (1 + n_quantized * (2 if args.smoothquant is not None else 1))
    with progress_bar("evaluating", n_steps, unit="items") as advance:
        for spec, path in zip(args.models, dirs):
            deployed = is_compressed(path)
            if deployed:
                model, tokenizer = load_compressed(path, trust_remote_code=args.trust_remote_code)
            else:
                model, tokenizer = load_model(path, trust_remote_code=args.trust_remote_code)
            if windows is None:  # the first model's tokenizer defines the windows for all
                windows = list(iter_token_windows(paths, tokenizer, args.seq_len, args.seq_len * args.windows,
                                                  args.batch_size, skip_tokens=args.skip_tokens))
            if deployed:  # already 4-bit: evaluated as its format computes it, not fake-quantized again
                results.append(evaluate_deployed(model, windows, deployed_scheme(path), name=spec, advance=advance))
                advance(n_quantized * (2 if args.smoothquant is not None else 1))
                del model
                continue
            smooth = None
            if args.smoothquant is not None:
                if calibration is None:
                    calibration = _calibration_windows(paths, tokenizer, args, windows)
                smooth = smoothquant_scales(model, calibration, args.smoothquant, skip)
            results.append(evaluate_model(model, windows, formats, name=spec, skip=skip, smooth=smooth,
                                          advance=advance))
            del model
    Console().print(table(results))
    if args.json:
        save(results, args.json)
    return 0


def _calibration_windows(paths, tokenizer, args, windows):
    """SmoothQuant's calibration text: the tokens skipped before the evaluation windows, when they hold a window;
    else the evaluation windows themselves (said on the console)."""
    from rich.console import Console

    from ..sources import iter_token_windows

    if args.skip_tokens >= args.seq_len:
        return list(iter_token_windows(paths, tokenizer, args.seq_len, args.skip_tokens, args.batch_size))
    Console(stderr=True).print("[yellow]SmoothQuant calibrates on the evaluation windows: --skip-tokens is shorter "
                               "than one window")
    return windows
