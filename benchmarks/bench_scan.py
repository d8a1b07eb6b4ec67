"""Benchmark: `surgeon.scan.scan` against a plain forward pass over the same token windows, in one process.

Target (issue 3): scan time <= 1.3x the plain forward (the hooks, the attention-sink logits and the report
are the overhead). Runs on the real SmolLM2-135M-Instruct and Shakespeare when the defaults are installed
(scripts/install_defaults.sh), else on a generated SmolLM2-shaped model and random tokens. The two sides run
alternately, `--repeat` times each, and the best of each is compared, so a busy shared machine skews both
alike; wall and process-CPU times are both reported (the CPU ratio is the steadier one on a busy machine,
especially with --threads 1). Results are appended to benchmarks/results/scan.csv.

    python benchmarks/bench_scan.py [--tokens 4096] [--seq-len 256] [--batch-size 4] [--repeat 3]
                                    [--threads 2] [--generated]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


class _IdTokenizer:
    """What scan needs of a tokenizer for a generated model: BOS and a way to print a token."""

    bos_token_id = 1
    eos_token_id = 2

    def decode(self, ids):
        return f"<{ids[0]}>"


def real_setup(args):
    from surgeon.errors import SurgeonError
    from surgeon.sources import iter_token_windows, load_model, resolve_model, resolve_text

    try:
        text = resolve_text("default")
        path = resolve_model("default")
    except SurgeonError as err:
        print(f"defaults not installed ({err}); using a generated model")
        return None
    model, tokenizer = load_model(path)
    batches = list(iter_token_windows(text, tokenizer, args.seq_len, args.tokens, args.batch_size))
    return "SmolLM2-135M-Instruct (real)", model, tokenizer, batches


def generated_setup(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # SmolLM2's width and head layout, fewer layers and a smaller vocabulary so it builds in seconds
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=8192, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    n_windows = max(1, args.tokens // args.seq_len)
    ids = torch.randint(3, config.vocab_size, (n_windows, args.seq_len + 1))
    ids[:, 0] = _IdTokenizer.bos_token_id
    batches = list(ids.split(args.batch_size))
    return "generated llama d=576 L=12", model, _IdTokenizer(), batches


def plain_forward(model, batches):
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generated", action="store_true", help="skip the real model even if installed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from surgeon.scan import scan

    setup = None if args.generated else real_setup(args)
    name, model, tokenizer, batches = setup or generated_setup(args)
    tokens = sum(b.numel() for b in batches)
    print(f"{name}: {len(batches)} batches, {tokens:,} tokens, {args.threads} threads, "
          f"attention {model.config._attn_implementation}")

    plain_forward(model, batches[:1])  # warm-up: first-call allocations and kernel selection
    # wall time is what a user waits for; process CPU time is what this process itself spent, which a busy
    # shared machine disturbs far less (with --threads 1 it is nearly load-independent)
    plain_wall, scan_wall, plain_cpu, scan_cpu = [], [], [], []
    report = None
    for i in range(args.repeat):
        w, c = time.perf_counter(), time.process_time()
        plain_forward(model, batches)
        plain_wall.append(time.perf_counter() - w)
        plain_cpu.append(time.process_time() - c)
        w, c = time.perf_counter(), time.process_time()
        report = scan(model, tokenizer, batches, progress=False)
        scan_wall.append(time.perf_counter() - w)
        scan_cpu.append(time.process_time() - c)
        print(f"  run {i + 1}: plain {plain_wall[-1]:.2f} s wall / {plain_cpu[-1]:.2f} s cpu, "
              f"scan {scan_wall[-1]:.2f} s wall / {scan_cpu[-1]:.2f} s cpu")
    plain, scanned = min(plain_wall), min(scan_wall)
    ratio = scanned / plain
    cpu_ratio = min(scan_cpu) / min(plain_cpu)
    print(f"plain forward {plain:.2f} s ({tokens / plain:,.0f} tok/s); scan {scanned:.2f} s "
          f"({tokens / scanned:,.0f} tok/s)")
    print(f"ratio scan/plain: wall {ratio:.2f}x, cpu {cpu_ratio:.2f}x (target <= 1.3x) "
          f"{'OK' if max(ratio, cpu_ratio) <= 1.3 else 'OVER TARGET'}")
    print(f"scan found: peak {report.peak['value']:,.1f} at dim {report.peak['dim']} (layer {report.peak['layer']}), "
          f"sinks {report.sink_dims}")

    results = HERE / "results" / "scan.csv"
    results.parent.mkdir(exist_ok=True)
    new = not results.exists()
    with open(results, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["date", "model", "tokens", "seq_len", "batch_size", "threads", "plain_s", "scan_s",
                             "ratio", "plain_cpu_s", "scan_cpu_s", "cpu_ratio"])
        writer.writerow([time.strftime("%Y-%m-%d %H:%M"), name, tokens, args.seq_len, args.batch_size,
                         args.threads, f"{plain:.3f}", f"{scanned:.3f}", f"{ratio:.3f}", f"{min(plain_cpu):.3f}",
                         f"{min(scan_cpu):.3f}", f"{cpu_ratio:.3f}"])


if __name__ == "__main__":
    main()
