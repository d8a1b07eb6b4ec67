"""surgeon inspect PATH: family, parameters, norms, tied or not, transforms present — from headers only.

PATH is whatever the other commands take as a model: a model directory is read from its safetensors headers
(nothing of torch imported); a .gguf file, a folder holding one, a model's name (`default`, `qwen2.5-0.5b`) or a
hub id is resolved as every command resolves it (surgeon.sources: a GGUF is dequantized once into the cache) and
its cached directory is inspected, with the GGUF's own header facts beside it."""

from __future__ import annotations

import json
import re
from collections import Counter

from rich.console import Console
from rich.table import Table


def add_arguments(p) -> None:
    p.add_argument("path", help="Hugging Face model directory, .gguf file, hub id, or a model's name ('default')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # as surgeon.sources reads one


def _model_dir(path) -> tuple[str, dict | None]:
    """(the directory to read headers from, the GGUF import record or None). A plain model directory stays on the
    torch-free path; anything else goes through surgeon.sources, as in every other command."""
    from pathlib import Path

    from .. import catalog

    text = str(path)
    folder = Path(text).expanduser()
    gguf = (folder.is_file() and folder.suffix.lower() == ".gguf"
            or folder.is_dir() and not (folder / "config.json").is_file() and any(folder.glob("*.gguf")))
    named = not folder.exists() and (catalog.named(text) is not None or _HUB_ID.match(text))
    if not (gguf or named):  # a model directory, or an error the header reader words best
        return text, None
    from ..sources import IMPORT_RECORD, resolve_model

    resolved = resolve_model(path)
    record = resolved / IMPORT_RECORD
    return str(resolved), json.loads(record.read_text()) if record.is_file() else None


def describe(path) -> dict:
    from ..architectures import base_model_type, for_config
    from ..io.headers import Headers  # safetensors headers: no torch

    folder, imported = _model_dir(path)
    ckpt = Headers(folder)
    arch = for_config(ckpt.config)
    config = ckpt.config
    norms = {}
    for role, pattern in arch.norms.items():
        names = [n for n in arch.expand(pattern, config) if f"{n}.weight" in ckpt]
        if not names:
            continue
        carries = [k for k in ("pre_affine", "gate_down.weight") if all(f"{n}.{k}" in ckpt for n in names)]
        norms[role] = {"pattern": pattern, "count": len(names),
                       "carries": [c.removesuffix(".weight").replace("gate_down", "gate") for c in carries]}
    block = config.get("surgeon") or {}
    gated_attention = None
    if block.get("gated_attention"):
        ga = block["gated_attention"]
        gates = [n for p in ga["targets"] for n in arch.expand(p, config) if f"{n}.output_gate.weight" in ckpt]
        gated_attention = {"granularity": ga["granularity"], "heads": ga["heads"], "gates": len(gates)}
    dtypes = Counter(e.dtype for e in ckpt.tensors.values())
    return {
        "path": str(ckpt.path), "model_type": config.get("model_type"), "family": base_model_type(config),
        "parameters": ckpt.num_parameters, "bytes": ckpt.nbytes, "files": [f.name for f in ckpt.files],
        "dtypes": dict(dtypes), "layers": arch.num_layers(config), "hidden_size": config.get(arch.hidden_size_key),
        "tied_embeddings": arch.tied(config), "has_lm_head": arch.lm_head in ckpt, "norms": norms,
        "transforms": block.get("transforms", []),
        "gate_rank": (block.get("gated_norm") or {}).get("rank"),
        "absorbed_sinks": [{"dim": e["dim"], "scale": e["scale"]}
                           for e in (block.get("absorb_sinks") or {}).get("sinks", [])],
        "glu_alpha": (block.get("glu") or {}).get("alpha"),
        "gated_attention": gated_attention,
        "smooth": block.get("smooth"),
        "hadamard": {g: v["block"] for g, v in ((block.get("hadamard") or {}).get("groups") or {}).items()},
        "source_sha256": block.get("source_sha256"),
        "quantization": _quantization(config, ckpt),
        "gguf": None if imported is None else {"file": str(path), "sha256": imported.get("sha256"),
                                               **(imported.get("gguf") or {}), "imported_as": imported.get("dtype")},
    }


def _quantization(config: dict, ckpt) -> dict | None:
    """A compressed-tensors checkpoint's format, and how many linears it packs / keeps (from names only)."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return None
    packed = sum(1 for name in ckpt.tensors if name.endswith(".weight_packed"))  # both packed formats' name
    return {"format": quant.get("format"), "status": quant.get("quantization_status"), "packed_linears": packed,
            "kept": len(quant.get("ignore") or [])}


def run(args) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    gguf = info["gguf"]
    table = Table(title=f"surgeon inspect {gguf['file'] if gguf else info['path']}", show_header=False)
    if gguf:
        types = ", ".join(f"{k}×{v}" for k, v in sorted((gguf.get("tensor_types") or {}).items(),
                                                         key=lambda kv: -kv[1]))
        table.add_row("GGUF", f"{gguf.get('name') or '?'} ({gguf.get('architecture')}; {types}); "
                              f"sha256 {(gguf.get('sha256') or '?')[:16]}…")
        table.add_row("imported as", f"{info['path']} ({gguf.get('imported_as')})")
    table.add_row("family", f"{info['family']} (model_type {info['model_type']})")
    table.add_row("parameters", f"{info['parameters']:,} ({info['bytes'] / 1e6:,.1f} MB, "
                                + ", ".join(f"{k}×{v}" for k, v in info["dtypes"].items()) + " tensors)")
    table.add_row("layers / hidden", f"{info['layers']} / {info['hidden_size']}")
    table.add_row("embeddings", "tied" if info["tied_embeddings"] else "untied")
    table.add_row("files", f"{len(info['files'])}: {', '.join(info['files'][:3])}"
                           + (" …" if len(info["files"]) > 3 else ""))
    for role, n in info["norms"].items():
        table.add_row(f"norm {role}", f"{n['count']} × {n['pattern']}"
                                      + (f"  [cyan]+ {', '.join(n['carries'])}[/]" if n["carries"] else ""))
    table.add_row("transforms", (", ".join(info["transforms"]) or "none")
                  + (f" (gate rank {info['gate_rank']})" if info["gate_rank"] else ""))
    if info["absorbed_sinks"]:
        table.add_row("absorbed sinks", ", ".join(f"dim {e['dim']} ÷{e['scale']:g}" for e in info["absorbed_sinks"]))
    if info["smooth"]:
        sm = info["smooth"]
        low, high = sm["log2_scale_range"]
        table.add_row("smoothed", f"α {sm['alpha']:g}, {sm['points']} points, scales 2^{low}…2^{high} "
                                  f"({sm['calibration_tokens']:,} calibration tokens)")
    if info["hadamard"]:
        table.add_row("Hadamard-rotated inputs", ", ".join(f"{g} (blocks of {b})" for g, b in info["hadamard"].items()))
    if info["gated_attention"]:
        ga = info["gated_attention"]
        table.add_row("gated attention", f"{ga['gates']} gates, {ga['granularity']} ({ga['heads']} heads)")
    if info["glu_alpha"] is not None:
        table.add_row("GLU α", f"{info['glu_alpha']:g} (0 = SwiGLU, 1 = GLU)")
    if info["quantization"]:
        q = info["quantization"]
        table.add_row("quantized", f"compressed-tensors {q['format']} ({q['status']}): {q['packed_linears']} linears "
                                   f"packed, {q['kept']} kept in full precision")
    Console().print(table)
    return 0
