#!/usr/bin/env python
"""End-to-end cost of the GatedNorm gates, and of the hadamard pass's online rotations, in one training step, on
the CPU.

A SmolLM2-135M-shaped Llama (hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied
embeddings) with random weights, twice:
    source     stock transformers LlamaForCausalLM
    converted  surgeon's SurgeonLlamaForCausalLM with a rank-16 GatedNorm on the three norms that read the
               residual stream (input_layernorm, post_attention_layernorm, model.norm), same base weights
    rotated    converted + the hadamard pass: every q/k/v, o, gate/up and down_proj weight times its block Hadamard
               matrix (blocks of 64; 512 for down_proj's 1536 inputs), and each layer's input multiplied by it online
Both take the same batch; a step is forward (loss) + backward + AdamW step, timed phase by phase, the two models
interleaved step by step so machine load drifts hit both alike. The norms run through surgeon.kernels with
backend="auto" (the torch reference on a CPU) unless --backend says otherwise. The gates add
61 · 2 · 16 · 576 ≈ 1.1 M parameters (0.8 %) and, per token and gated norm, 4·r·d multiply-adds; the rotations
add no parameter and, per token and layer, 3 · 576 · 64 + 1536 · (16 + 32) ≈ 184 k multiply-adds (q/k/v and
gate/up share theirs; the layer's linears: 3.5 M).

    python benchmarks/bench_gate_cost.py                     # 2 × 256 tokens, 5 timed steps
    python benchmarks/bench_gate_cost.py --layers 8 --steps 2
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from surgeon import kernels
from surgeon.architectures import registry
from surgeon.modeling import CLASSES, hadamard_block
from surgeon.transforms.hadamard import rotate_weight

from results_csv import append_rows  # benchmarks/, the script's own folder

RESULTS = Path(__file__).resolve().parent / "results" / "gate_cost.csv"
GATED_TARGETS = ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm", "model.norm"]
PHASES = ("forward", "backward", "optimizer", "step")


def smollm2_config(layers):
    return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0)


def hadamard_block_config(layers):
    """The surgeon block the hadamard pass writes for this shape (surgeon/architectures/llama.json's groups)."""
    linear_inputs = registry()["llama"].linear_inputs
    width = {"attention_in": 576, "attention_out": 576, "mlp_in": 576, "mlp_out": 1536}
    return {g: {"linears": list(linear_inputs[g]), "block": hadamard_block(w)} for g, w in width.items()}


def build(layers, rank):
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**smollm2_config(layers)))
    cfg_cls, model_cls = CLASSES["llama"]
    converted = model_cls(cfg_cls(**smollm2_config(layers), surgeon={"gated_norm": {"rank": rank,
                                                                                    "targets": GATED_TARGETS}}))
    # Same base weights; the gates start at the identity (W_up = 0 gives σ = ½, so λ is doubled, DESIGN §3), which
    # makes the two models the same function at step 0 — the first losses printed agree.
    missing, unexpected = converted.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(".gate_" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for module in converted.modules():
            if getattr(module, "gate_rank", 0):
                module.weight.mul_(2)
    rotated = model_cls(cfg_cls(**smollm2_config(layers), surgeon={
        "gated_norm": {"rank": rank, "targets": GATED_TARGETS}, "hadamard": {"groups": hadamard_block_config(layers)}}))
    rotated.load_state_dict(converted.state_dict())
    with torch.no_grad():  # W ← W·H where the model reads x·H: the same function again
        for module in rotated.modules():
            if getattr(module, "surgeon_hadamard_block", 0):
                module.weight.copy_(rotate_weight(module.weight, module.surgeon_hadamard_block))
    return source, converted, rotated


def timed_step(model, opt, batch):
    t0 = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}, loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median and min reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", choices=kernels.BACKENDS, default="auto", help="kernel backend for the norms")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 120)
    source, converted, rotated = build(args.layers, args.rank)
    n_source = sum(p.numel() for p in source.parameters())
    n_converted = sum(p.numel() for p in converted.parameters())
    batch = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    models = {name: (m, torch.optim.AdamW(m.parameters(), lr=1e-4)) for name, m in
              (("source", source), ("converted", converted), ("rotated", rotated))}
    console.print(f"SmolLM2-135M shape, {args.layers} layers, batch {args.batch}×{args.seq}, {args.threads} thread(s), "
                  f"norm backend {args.backend!r}; parameters {n_source / 1e6:.2f} M → {n_converted / 1e6:.2f} M "
                  f"(+{(n_converted - n_source) / 1e6:.3f} M, {100 * (n_converted / n_source - 1):.2f} %)")

    times = {name: {phase: [] for phase in PHASES} for name in models}
    with kernels.use_backend(args.backend):
        for step in range(args.warmup + args.steps):
            for name, (model, opt) in models.items():
                with console.status(f"step {step + 1}/{args.warmup + args.steps}: {name}"):
                    phase_times, loss = timed_step(model, opt, batch)
                if step >= args.warmup:
                    for phase, t in phase_times.items():
                        times[name][phase].append(t)
                console.print(f"  step {step + 1} {name:9s} {phase_times['step']:.2f} s  loss {loss:.3f}"
                              f"{'  (warm-up)' if step < args.warmup else ''}")

    # Median and best-of: on a shared machine the minimum is the steadier estimate of what a step costs.
    med = {name: {phase: statistics.median(ts) for phase, ts in per.items()} for name, per in times.items()}
    best = {name: {phase: min(ts) for phase, ts in per.items()} for name, per in times.items()}
    table = Table(title=f"gate and rotation cost per training step ({args.steps} timed steps each; ratios to source)")
    for col in ("phase", "source s (median)", "converted s (median)", "ratio (median)", "rotated s (median)",
                "ratio (median)", "converted ratio (min)", "rotated ratio (min)"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase in PHASES:
        s, c, r = (med[m][phase] for m in models)
        bs, bc, br = (best[m][phase] for m in models)
        table.add_row(phase, f"{s:.3f}", f"{c:.3f}", f"{c / s:.3f}×", f"{r:.3f}", f"{r / s:.3f}×", f"{bc / bs:.3f}×",
                      f"{br / bs:.3f}×")
    console.print(table)
    tokens = args.batch * args.seq
    console.print(f"throughput: source {tokens / med['source']['step']:.0f} tok/s, converted "
                  f"{tokens / med['converted']['step']:.0f} tok/s, rotated {tokens / med['rotated']['step']:.0f} tok/s; "
                  f"the gates cost {100 * (med['converted']['step'] / med['source']['step'] - 1):+.1f} % per step, "
                  f"the rotations {100 * (med['rotated']['step'] / med['converted']['step'] - 1):+.1f} % more")

    if not args.no_csv:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        rows = []
        for phase in PHASES:
            s, c, r = (med[m][phase] for m in models)
            bs, bc, br = (best[m][phase] for m in models)
            rows.append([stamp, args.layers, args.batch, args.seq, args.rank, args.threads, args.backend, args.steps,
                         phase, round(s, 4), round(c, 4), round(c / s, 4), round(bs, 4), round(bc, 4),
                         round(bc / bs, 4), round(r, 4), round(r / s, 4), round(br, 4), round(br / bs, 4)])
        append_rows(RESULTS, ["timestamp", "layers", "batch", "seq", "rank", "threads", "backend", "steps", "phase",
                              "source_s", "converted_s", "ratio", "source_min_s", "converted_min_s", "ratio_min",
                              "rotated_s", "rotated_ratio", "rotated_min_s", "rotated_ratio_min"], rows)
        console.print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
