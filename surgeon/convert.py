"""`surgeon convert`: read a checkpoint, plan the transforms, stream the rewritten tensors into a new model
directory that stock transformers loads (modeling file + auto_map), and optionally verify its logits.

The output is built in a temporary sibling and renamed into place only when everything (verification
included) succeeded; the source is only read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path


from . import __version__
from .dtypes import parse_dtype
from .errors import SurgeonError
from .io import Checkpoint, final_path, parse_size, staged_directory, write_sharded
from .io.digest import SourceHasher
from .io.hf_dir import MANIFEST, copy_side_files, set_model_type
from .io.validate import check_tensors
from .modeling import BASE_MODEL_TYPES, MODELING_FILE
from .architectures import base_model_type
from .calibrate import Calibrator
from .plan import Plan
from .progress import progress_bar

DEFAULT_SHARD_SIZE = "5GB"


@dataclass
class ConvertReport:
    source: Path
    output: Path
    family: str
    transforms: list[str]
    params_before: int
    params_after: int
    tensors_rewritten: int
    tensors_added: int
    bytes_written: int
    source_sha256: str
    source_files: dict[str, str] = field(default_factory=dict)
    verify: dict | None = None
    shards: list[str] = field(default_factory=list)


def surgeon_config(plan: Plan, source: Checkpoint, sha256: str) -> dict:
    """The output config: the base family's fields, our model_type and auto_map, and the surgeon block.

    A model that needs none of our modules (e.g. GLU at α = 1 and nothing else) is written as its stock family:
    stock model_type and architectures, no auto_map (the surgeon block stays, as provenance)."""
    config = plan.config
    base = base_model_type(source.config)
    if base not in BASE_MODEL_TYPES:
        raise SurgeonError(f"no surgeon model class for family {base!r}; supported: {', '.join(BASE_MODEL_TYPES)}")
    block = plan.surgeon
    block.setdefault("base_model_type", base)
    block.setdefault("base_architectures", source.config.get("architectures"))
    block["version"] = __version__
    if plan.arch.norm_offset:  # the modeling file builds Gemma's norms as x·(offset + w): it reads the offset here
        block["norm_offset"] = plan.arch.norm_offset
    block.setdefault("history", []).append(  # the source by name and hash: a published model names no local path
        {"transforms": list(plan.applied), "source": final_path(source.path.resolve()).name, "source_sha256": sha256}
    )
    block["source_sha256"] = block["history"][0]["source_sha256"]
    return set_model_type(config, base)


def convert(
    source: str | Path,
    output: str | Path,
    transforms: list,
    *,
    dtype: str | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    verify: bool = False,
    tolerance: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> ConvertReport:
    """Apply `transforms` (instances from surgeon.transforms) to the checkpoint at `source`, writing `output`.

    What a pass needs measured on the source (a scan, activation statistics, recorded smooth factors) is computed
    here, before the pass rewrites the plan, and handed to it (surgeon.calibrate)."""
    source, output = Path(source), Path(output)
    if not transforms:
        from .transforms import TRANSFORMS

        raise SurgeonError(f"no transform given; pass at least one transform ({', '.join(TRANSFORMS)})")
    check_order(transforms)
    ckpt = Checkpoint(source)
    plan = Plan(ckpt, seed=seed)
    check_tensors(ckpt)  # names and shapes against config.json, before anything is measured or written
    out_dtype = parse_dtype(dtype)
    if out_dtype is not None:
        plan.cast(out_dtype)
    calibrator = Calibrator(ckpt.path, progress=show_progress)
    try:
        for transform in transforms:
            transform.check(plan)  # cheap refusals before anything is measured
            transform.apply(plan, calibrator.calibrate(transform.needs(plan)))
    finally:
        calibrator.close()
    limit = parse_size(shard_size)

    hasher = SourceHasher([ckpt.path / "config.json", *ckpt.files])
    hasher.start()
    specs = plan.specs()
    total = sum(s.nbytes for s in specs)
    with staged_directory(output, force=force, sources=(source,)) as tmp:
        with progress_bar(f"writing {output.name}", total, enabled=show_progress, unit="bytes") as advance:
            shards = write_sharded(tmp, specs, plan.produce, limit, on_tensor=lambda s: advance(s.nbytes))
        try:
            digest, file_digests = hasher.result()
        except OSError as err:
            raise SurgeonError(f"reading the source for its sha256 failed: {err}") from None
        config = surgeon_config(plan, ckpt, digest)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(ckpt, tmp)
        write_side_tensors(plan, tmp)
        if "auto_map" in config:
            shutil.copy2(MODELING_FILE, tmp / MODELING_FILE.name)
        report = ConvertReport(
            source=source, output=output, family=base_model_type(ckpt.config),
            transforms=list(plan.surgeon.get("transforms", [])), params_before=ckpt.num_parameters,
            params_after=plan.num_parameters, tensors_rewritten=plan.count("rewritten"),
            tensors_added=plan.count("new"), bytes_written=total, source_sha256=digest, source_files=file_digests,
            shards=[p.name for p in shards],
        )
        if verify:
            from .verify import compare_logits

            report.verify = compare_logits(source, tmp, dtype=out_dtype, tolerance=tolerance)
            # a pass that changes the function on purpose (GLU at α > 0) is measured, not judged
            changing = [t.name for t in transforms if not getattr(t, "preserves_function", True)]
            report.verify["expected_to_differ"] = bool(changing)
            if changing:
                report.verify["changed_by"] = changing
            if not report.verify["ok"] and not changing:
                raise SurgeonError(
                    f"verification failed: max |Δlogit| {report.verify['max_abs_diff']:.3g} "
                    f"(relative {report.verify['max_rel_diff']:.3g}) exceeds {report.verify['tolerance']:.1g}; "
                    "nothing was written"
                )
        write_manifest(tmp, report, config)
    return report


def check_order(transforms: list) -> None:
    """Refuse a pass given after one its `after` says must come first (e.g. pre-affine after absorb-sinks)."""
    names = [t.name for t in transforms]
    for i, transform in enumerate(transforms):
        for earlier, why in transform.after.items():
            if earlier in names[i + 1:]:
                raise SurgeonError(f"put {earlier} before {transform.name}: {why}")


def write_side_tensors(plan: Plan, dest: Path) -> None:
    """The plan's side_tensors files (e.g. smooth's factors) as safetensors files in `dest`."""
    from safetensors.torch import save_file

    for name, (tensors, metadata) in plan.side_tensors.items():
        save_file({k: v.clone() for k, v in tensors.items()}, str(dest / name), metadata=metadata)  # one storage each


def write_manifest(out: Path, report: ConvertReport, config: dict) -> None:
    block = config["surgeon"]
    manifest = {
        "surgeon_version": __version__,
        "source": str(final_path(report.source.resolve())),
        "source_sha256": report.source_sha256,
        "source_files_sha256": report.source_files,
        "family": report.family,
        "transforms": report.transforms,
        "surgeon": block,
        "parameters": {"before": report.params_before, "after": report.params_after},
        "tensors": {"rewritten": report.tensors_rewritten, "added": report.tensors_added},
        "verify": report.verify,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    lines = [
        "---", "library_name: transformers", "tags: [surgeon, gated-norm, pre-affine]", "---", "",
        f"# {report.output.name}", "",
        f"Converted by surgeon {__version__} from a {report.family} checkpoint "
        f"(sha256 `{report.source_sha256[:16]}…`).", "",
        "| | |", "|---|---|",
        f"| transforms | {', '.join(report.transforms)} |",
        f"| parameters | {report.params_before:,} → {report.params_after:,} |",
        f"| tensors rewritten / added | {report.tensors_rewritten} / {report.tensors_added} |",
    ]
    from .transforms import TRANSFORMS

    # every pass the model carries (this convert's and earlier ones'), each in its own words
    lines += [f"| {label} | {value} |" for cls in TRANSFORMS.values() if cls.key in block
              for label, value in [cls.card_row(block[cls.key])]]
    if report.verify:
        note = " (expected to differ)" if report.verify.get("expected_to_differ") else ""
        lines.append(f"| verified max abs logit diff | {report.verify['max_abs_diff']:.3g}{note} |")
    if "auto_map" in config:
        lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`, or without "
                  "remote code after `import surgeon.modeling`.", ""]
    else:
        lines += ["", f"A stock `{config['model_type']}` model: load with "
                  "`AutoModelForCausalLM.from_pretrained(path)`.", ""]
    (out / "README.md").write_text("\n".join(lines))
