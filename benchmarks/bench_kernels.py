#!/usr/bin/env python
"""Speed and memory of the fused GatedNorm / PreAffine-RMSNorm kernels against the torch reference.

Providers, at model-like shapes (tokens × hidden, rank 16 by default):
    triton    the fused kernels (surgeon/kernels, backend="triton") — GPU only
    eager     the torch reference (surgeon.modeling.modeling_surgeon), backend="torch" — the baseline
    compile   the same reference through torch.compile, backend="compile"

Modes (after Liger-Kernel's benchmark guideline): forward (with autograd recording, as in training), backward
(a fresh untimed forward before each timed backward) and full (forward + backward). Every time is printed beside the memory-bound floor, the bytes that have to move
divided by the bandwidth of a measured large copy on the same device:
    forward   read x, write out                     2 · tokens · hidden · itemsize
    backward  read x and dout, write dx             3 · tokens · hidden · itemsize
    full      both                                  5 · tokens · hidden · itemsize
(the weights, rstd and the r-vector per row are < 2 % of that at hidden ≥ 2048 and are left out).
Memory: "saved" is the activation memory kept for the backward beyond the inputs themselves (counted with
torch.autograd.graph.saved_tensors_hooks, so it works on any device); "peak" is the CUDA allocator's peak
during one full step above what was allocated before it (GPU only).

Targets checked: on a GPU, triton full within 1.5× of the floor and ≥ 3× faster than eager; on a CPU, compiled
full ≥ 1.5× faster than eager (the Triton rows need a GPU). Results are printed as a table and appended to
benchmarks/results/kernels.csv.

    python benchmarks/bench_kernels.py                                  # GPU: 16k tokens × 2048/4096/8192
    python benchmarks/bench_kernels.py --tokens 4096 --hidden 1024 2048 # a CPU-sized run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from surgeon import kernels

from results_csv import append_rows  # benchmarks/, the script's own folder

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.csv"
EPS = 1e-6
MODES = ("forward", "backward", "full")
FLOOR_PASSES = {"forward": 2, "backward": 3, "full": 5}
PROVIDER_BACKEND = {"triton": "triton", "eager": "torch", "compile": "compile"}
CSV_FIELDS = ["timestamp", "commit", "device", "op", "tokens", "hidden", "rank", "dtype", "mode", "provider", "ms",
              "speedup_vs_eager", "floor_ms", "x_floor", "saved_mb", "peak_mb"]


# ----------------------------------------------------------------------------- inputs


def make_case(op, tokens, hidden, rank, dtype, device, seed=0):
    """A closure running the op with a given backend, and the tensors whose .grad it fills."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()

    x = leaf(tokens, hidden, scale=2.0)
    weight = leaf(hidden, scale=0.1, offset=1.0)
    pre = leaf(hidden, scale=0.1, offset=1.0)
    if op == "gated_norm":
        w_down = leaf(rank, hidden, scale=hidden ** -0.5)
        w_up = leaf(hidden, rank, scale=0.1)
        tensors = [x, weight, w_down, w_up, pre]

        def run(backend):
            return kernels.gated_norm(x, weight, w_down, w_up, EPS, pre_affine=pre, backend=backend)
    else:
        tensors = [x, weight, pre]

        def run(backend):
            return kernels.pre_affine_rms_norm(x, weight, pre, EPS, backend=backend)
    return run, tensors


# ----------------------------------------------------------------------------- measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH = {}


def time_once(fn, device, setup=None, grad_to_none=()):
    """Milliseconds of one fn(setup()) — only fn is timed, so a backward can be timed after a fresh forward
    instead of with retain_graph (which torch.compile's donated buffers forbid). CUDA: events, with the L2
    flushed first as Triton's do_bench does; CPU: perf_counter."""
    for t in grad_to_none:
        t.grad = None
    arg = setup() if setup is not None else None
    if device.type != "cuda":
        begin = time.perf_counter()
        fn(arg)
        return (time.perf_counter() - begin) * 1e3
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    _FLUSH[device].zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(arg)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def time_ms(fn, device, warmup, reps, setup=None, grad_to_none=()):
    times = [time_once(fn, device, setup, grad_to_none) for _ in range(warmup + reps)]
    return statistics.median(times[warmup:])


def copy_bandwidth(device, nbytes):
    """Bytes per second of a large device copy (read + write), the practical memory-bound ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)

    ms = time_ms(lambda _: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (ms * 1e-3)


def saved_activation_bytes(run, tensors):
    """Bytes of the tensors autograd keeps for the backward, beyond the inputs themselves (deduplicated by
    storage)."""
    inputs = {t.untyped_storage().data_ptr() for t in tensors}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def peak_bytes(fn, device):
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def bench_case(op, providers, tokens, hidden, rank, dtype, device, modes, warmup, reps):
    """{provider: ({mode: median ms}, saved bytes, peak bytes)} on one set of inputs shared by all providers."""
    run_backend, tensors = make_case(op, tokens, hidden, rank, dtype, device)
    runs = {p: functools.partial(run_backend, PROVIDER_BACKEND[p]) for p in providers}
    dout = None
    for run in runs.values():        # first calls: torch.compile / Triton JIT happen here, not in the timings
        out = run()
        if dout is None:
            dout = torch.randn_like(out)
        out.backward(dout)
        del out
    timings = {
        "forward": lambda run: dict(fn=lambda _: run()),            # autograd recording, as in training
        "backward": lambda run: dict(fn=lambda out: out.backward(dout), setup=run, grad_to_none=tensors),
        "full": lambda run: dict(fn=lambda _: run().backward(dout), grad_to_none=tensors),
    }
    results = {p: {} for p in providers}
    for mode in modes:
        samples = {p: [] for p in providers}
        for i in range(warmup + reps):
            # Providers interleaved call by call, so load drifting on a shared machine hits all of them alike.
            for p in providers:
                ms = time_once(device=device, **timings[mode](runs[p]))
                if i >= warmup:
                    samples[p].append(ms)
        for p in providers:
            results[p][mode] = statistics.median(samples[p])
    for t in tensors:
        t.grad = None
    return {p: (results[p], saved_activation_bytes(runs[p], tensors),
                peak_bytes(lambda: runs[p]().backward(dout), device)) for p in providers}


# ----------------------------------------------------------------------------- report


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def append_csv(rows):
    append_rows(RESULTS, CSV_FIELDS, rows)


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 on a GPU (training dtype), fp32 on a CPU (bf16 there is not representative)")
    parser.add_argument("--ops", nargs="+", choices=["gated_norm", "pre_affine_rms_norm"],
                        default=["gated_norm", "pre_affine_rms_norm"])
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDER_BACKEND), default=list(PROVIDER_BACKEND))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup", type=int, help="untimed calls per measurement (default: 10 GPU, 2 CPU)")
    parser.add_argument("--reps", type=int, help="timed calls per measurement, median reported (default: 50 GPU, "
                                                  "5 CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a shared machine, OpenMP barriers across contended "
                             "cores make multi-threaded timings erratic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-csv", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 150)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype,
                                                               torch.bfloat16 if gpu else torch.float32)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    reps = args.reps if args.reps is not None else (50 if gpu else 5)
    providers = [p for p in args.providers if p != "triton" or gpu]
    if "eager" not in providers:
        providers.insert(0, "eager")  # the baseline every ratio is against
    if not gpu and "triton" in args.providers:
        console.print("[yellow]Triton rows need a GPU: on this CPU only the eager and compiled torch paths run.[/]")
    if gpu and not kernels.triton_available():
        raise SystemExit("Triton is not importable; cannot benchmark the kernels")

    bandwidth = copy_bandwidth(device, (1 << 30) if gpu else (256 << 20))
    itemsize = torch.empty((), dtype=dtype).element_size()
    console.print(f"device: {device_name(device)}   copy bandwidth: {bandwidth / 1e9:.1f} GB/s   dtype: "
                  f"{str(dtype).removeprefix('torch.')}   tokens: {args.tokens}   rank: {args.rank}")

    rows, checks = [], []
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    commit = git_commit()
    for op in args.ops:
        for hidden in args.hidden:
            with console.status(f"{op} hidden={hidden}: {', '.join(providers)}"):
                measured = bench_case(op, providers, args.tokens, hidden, args.rank, dtype, device, args.modes,
                                      warmup, reps)
            for mode in args.modes:
                floor_ms = FLOOR_PASSES[mode] * args.tokens * hidden * itemsize / bandwidth * 1e3
                eager_ms = measured["eager"][0][mode]
                for provider in providers:
                    times, saved, peak = measured[provider]
                    ms = times[mode]
                    rows.append({
                        "timestamp": stamp, "commit": commit, "device": device_name(device), "op": op,
                        "tokens": args.tokens, "hidden": hidden, "rank": args.rank if op == "gated_norm" else "",
                        "dtype": str(dtype).removeprefix("torch."), "mode": mode, "provider": provider,
                        "ms": round(ms, 4), "speedup_vs_eager": round(eager_ms / ms, 3),
                        "floor_ms": round(floor_ms, 4), "x_floor": round(ms / floor_ms, 3),
                        "saved_mb": round(saved / 2**20, 2), "peak_mb": None if peak is None else round(peak / 2**20, 2),
                    })
                if mode != "full":
                    continue
                if gpu and "triton" in measured:
                    ms = measured["triton"][0]["full"]
                    checks.append((f"{op} d={hidden}: triton full ≤ 1.5× floor", ms / floor_ms, ms <= 1.5 * floor_ms,
                                   f"{ms / floor_ms:.2f}× floor"))
                    checks.append((f"{op} d={hidden}: triton full ≥ 3× faster than eager", eager_ms / ms,
                                   eager_ms / ms >= 3, f"{eager_ms / ms:.2f}×"))
                if not gpu and "compile" in measured:
                    ms = measured["compile"][0]["full"]
                    checks.append((f"{op} d={hidden}: compiled full ≥ 1.5× faster than eager", eager_ms / ms,
                                   eager_ms / ms >= 1.5, f"{eager_ms / ms:.2f}×"))

    table = Table(title=f"surgeon kernels — {args.tokens} tokens, {device_name(device)}", show_lines=False)
    for col, justify in [("op", "left"), ("hidden", "right"), ("mode", "left"), ("provider", "left"), ("ms", "right"),
                         ("vs eager", "right"), ("floor ms", "right"), ("× floor", "right"),
                         ("saved MB", "right"), ("peak MB", "right")]:
        table.add_column(col, justify=justify)
    previous = None
    for r in rows:
        key = (r["op"], r["hidden"], r["mode"])
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        speed = r["speedup_vs_eager"]
        color = "green" if speed >= 1.5 else ("red" if speed < 0.95 else "white")
        table.add_row(r["op"], str(r["hidden"]), r["mode"], r["provider"], f"{r['ms']:.3f}",
                      f"[{color}]{speed:.2f}×[/]", f"{r['floor_ms']:.3f}", f"{r['x_floor']:.1f}",
                      fmt(r["saved_mb"], ".1f"), fmt(r["peak_mb"], ".1f"))
    console.print(table)
    for name, _, ok, shown in checks:
        console.print(f"{'[green]PASS[/]' if ok else '[red]MISS[/]'}  {name}: {shown}")
    if not args.no_csv:
        append_csv(rows)
        console.print(f"appended {len(rows)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
