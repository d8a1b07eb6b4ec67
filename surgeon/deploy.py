"""Deployable W4A4: a compressed-tensors checkpoint of a model (converted, trained or stock), the format vLLM and
other serving engines read, and its perplexity as that format computes it.

Why compressed-tensors directly, not llm-compressor: surgeon already calibrates (the inputs' range is the only
statistic these schemes need: NVFP4's activation global scale), and llm-compressor pins transformers below the
version surgeon runs on. compressed-tensors holds the schemes, the packing and the config serving engines parse;
surgeon computes the parameters it writes:

    weights, NVFP4:  global g_w = 448·6 / amax|W|;  per block of 16, s_b = e4m3(g_w · amax|block| / 6)
    inputs,  NVFP4:  global g_x = 448·6 / amax|x| over the calibration text (static, as engines run it); block
                     scales at run time, e4m3(g_x · amax|block| / 6)
    INT4:            weights per group of 32 (amax / 7.5, compressed-tensors' symmetric range), inputs per token
                     at run time — nothing to calibrate

dequantized x = e2m1 · s_b / g, so 1 / g is surgeon.quant's tensor scale s_t: `fake_quantized(..., inputs=amax)`
computes the same NVFP4 with the calibrated g_x (the estimate the checkpoint is checked against).

The Hadamard rotations of a converted model stay where they are: pre-hooks of the modeling file, which run
before compressed-tensors' quantized forward, so the quantizer sees the rotated input, as in surgeon's own eval.
The LM head and GatedNorm's low-rank gate projections stay in full precision (surgeon.quant.DEFAULT_SKIP).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import SurgeonError
from .quant import DEFAULT_SKIP, quantized_linears

QUANTIZE_FILE = "surgeon_quantize.json"


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    format: str  # compressed-tensors' compression format
    weight: str  # "nvfp4" | "int4"
    activation: str | None  # "nvfp4" | "int4" | None (16-bit activations)
    group: int  # weights' block / group size

    @property
    def calibrates_inputs(self) -> bool:
        return self.activation == "nvfp4"  # a static global scale; INT4 inputs are scaled per token at run time

    def compressed_tensors_scheme(self):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        if self.weight == "nvfp4":
            return preset_name_to_scheme("NVFP4" if self.activation else "NVFP4A16", ["Linear"])
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=self.group, symmetric=True,
                                   dynamic=False)
        inputs = None if not self.activation else QuantizationArgs(num_bits=4, type="int", strategy="token",
                                                                   symmetric=True, dynamic=True)
        # the format on the scheme, not forced on the compressor: forced, compressed-tensors warns once per linear
        # that for INT4 inputs it would infer int-quantized (8-bit storage); the weights are packed on purpose
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs, format=self.format)


SCHEMES = {s.name: s for s in (
    Scheme("nvfp4", "NVFP4 W4A4: E2M1 weights and inputs in blocks of 16 with FP8 scales; the inputs' global scale "
                    "calibrated, their block scales at run time", "nvfp4-pack-quantized", "nvfp4", "nvfp4", 16),
    Scheme("nvfp4a16", "NVFP4 weights (blocks of 16, FP8 scales), 16-bit inputs", "nvfp4-pack-quantized", "nvfp4",
           None, 16),
    Scheme("w4a4", "INT4 W4A4: symmetric INT4 weights per group of 32, inputs per token at run time",
           "pack-quantized", "int4", "int4", 32),
    Scheme("w4a16", "symmetric INT4 weights per group of 32, 16-bit inputs", "pack-quantized", "int4", None, 32),
)}


def scheme_of(name: str) -> Scheme:
    try:
        return SCHEMES[name.lower()]
    except KeyError:
        raise SurgeonError(f"unknown --scheme {name!r}: compressed-tensors W4 schemes surgeon writes are "
                           f"{', '.join(SCHEMES)}") from None


def is_compressed(model_dir: str | os.PathLike) -> bool:
    """Whether a model directory is a compressed-tensors checkpoint (its config says so)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return quant.get("quant_method") == "compressed-tensors"


def quantizable_linears(model: nn.Module, scheme: Scheme, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """The linears the checkpoint quantizes, checked against the scheme's block size: refused, with the fix, where
    there are none or a width does not divide."""
    layers = quantized_linears(model, skip)
    if not layers:
        raise SurgeonError("the model has no linear layer to quantize (only the LM head and gate projections, which "
                           "stay in full precision): pass a causal LM")
    ragged = [(n, m.in_features) for n, m in layers if m.in_features % scheme.group]
    if ragged:
        name, width = ragged[0]
        raise SurgeonError(f"{name} reads {width} features, not a multiple of {scheme.name}'s blocks of "
                           f"{scheme.group}: that model cannot be written in this scheme (try another --scheme)")
    return layers


@torch.no_grad()
def input_amax(model: nn.Module, layers: list[tuple[str, nn.Linear]], windows, *, advance=lambda n=1: None
               ) -> dict[str, float]:
    """Per linear, the largest |input| over the calibration windows — the input the quantizer sees, after any
    Hadamard rotation (those pre-hooks are prepended, the recording ones appended)."""
    from .quant import input_channel_amax

    def ticking():
        for ids in windows:
            yield ids
            advance(1)

    per_channel, _ = input_channel_amax(model, ticking(), layers)
    return {name: float(a.max()) for name, a in per_channel.items()}


def _global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    a = torch.as_tensor(amax, dtype=torch.float32)
    return generate_gparam(-a, a)


@torch.no_grad()
def set_parameters(model: nn.Module, layers, scheme: Scheme, amax: dict[str, float] | None) -> None:
    """Fill the quantization parameters compressed-tensors attached (apply_quantization_config) from the weights
    and the calibrated input ranges (see the module docstring)."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    for name, layer in layers:
        args = layer.quantization_scheme.weights
        w = layer.weight.data.float()
        groups = w.reshape(w.shape[0], -1, scheme.group)
        global_scale = _global_scale(w.abs().amax()) if scheme.weight == "nvfp4" else None
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
        layer.weight_scale.data = scale.to(layer.weight_scale.dtype)
        if hasattr(layer, "weight_zero_point"):
            layer.weight_zero_point.data = zero.to(layer.weight_zero_point.dtype)
        if global_scale is not None:
            layer.weight_global_scale.data = global_scale.to(layer.weight_global_scale.dtype)
        if scheme.calibrates_inputs:
            layer.input_global_scale.data = _global_scale(amax[name]).to(layer.input_global_scale.dtype)


@dataclass
class QuantizeReport:
    source: str
    output: str
    scheme: str
    format: str
    layers: int
    kept_full_precision: list[str]
    calibration_tokens: int
    calibration_text: list[str]
    bytes_source: int
    bytes_written: int
    seconds: float
    peak_rss_mb: float
    files: list[str] = field(default_factory=list)


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def quantize(source: str | os.PathLike, out: str | os.PathLike, scheme: str = "nvfp4", *, text: list[Path] | None = None,
             tokens: int = 8192, seq_len: int = 256, batch_size: int = 4, skip_tokens: int = 0, force: bool = False,
             trust_remote_code: bool = False, show_progress: bool = True) -> QuantizeReport:
    """Write `source` as a compressed-tensors checkpoint in `scheme` to `out` (atomically: nothing is left on a
    failure). `text`: the calibration text (needed where the scheme calibrates: nvfp4); `tokens` of it are read,
    after `skip_tokens`."""
    from .io.atomic import check_destination, staged_directory
    from .progress import progress_bar, quiet_tqdm
    from .sources import iter_token_windows, load_model

    started = time.perf_counter()
    spec = scheme_of(scheme)
    source, out = Path(source), Path(out)
    if is_compressed(source):
        raise SurgeonError(f"{source} is already a compressed-tensors checkpoint: quantize its unquantized model")
    check_destination(out, force=force, sources=(source,))
    if spec.calibrates_inputs and not text:
        raise SurgeonError(f"--scheme {spec.name} calibrates its inputs' global scale: add --data TEXT")
    model, tokenizer = load_model(source, trust_remote_code=trust_remote_code)
    layers = quantizable_linears(model, spec)
    calibrated, windows = 0, []
    if spec.calibrates_inputs:
        if tokens < seq_len:
            raise SurgeonError(f"--tokens {tokens} is less than one window of {seq_len}: calibrate on at least "
                               f"--seq-len tokens")
        windows = list(iter_token_windows(text, tokenizer, seq_len, tokens, batch_size, skip_tokens=skip_tokens))
        calibrated = sum(int(b.numel()) for b in windows)
        if calibrated < tokens:
            raise SurgeonError(f"the calibration text holds {calibrated:,} tokens past the first {skip_tokens:,}, "
                               f"fewer than --tokens {tokens:,}: give more text or ask for fewer tokens")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    names = {n for n, _ in layers}
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    with progress_bar(f"quantize {spec.name}", len(windows) + 3, enabled=show_progress) as advance, quiet_tqdm():
        amax = input_amax(model, layers, windows, advance=advance) if windows else None
        config = QuantizationConfig(config_groups={"group_0": spec.compressed_tensors_scheme()}, ignore=kept)
        apply_quantization_config(model, config)
        set_parameters(model, layers, spec, amax)
        advance(1)
        compressor = ModelCompressor.from_pretrained_model(model)  # each scheme carries its format
        compressor.compress_model(model)
        advance(1)
        with staged_directory(out, force=force, sources=(source,)) as tmp:
            model.save_pretrained(tmp)
            compressor.update_config(str(tmp))
            tokenizer.save_pretrained(tmp)
            for extra in source.glob("*.py"):  # the modeling file a converted model's auto_map names
                shutil.copy2(extra, tmp / extra.name)
            report = QuantizeReport(
                source=str(source), output=str(out), scheme=spec.name, format=spec.format, layers=len(layers),
                kept_full_precision=kept, calibration_tokens=calibrated,
                calibration_text=[str(p) for p in (text or [])] if calibrated else [],
                bytes_source=_weights_bytes(source), bytes_written=_weights_bytes(tmp),
                seconds=time.perf_counter() - started, peak_rss_mb=_peak_rss_mb())
            report.files = [p.name for p in tmp.iterdir() if not p.name.startswith(".")] + [QUANTIZE_FILE, "README.md"]
            record = {**asdict(report), "input_amax": amax, "compressed_tensors": _ct_version()}
            (tmp / QUANTIZE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            (tmp / "README.md").write_text(card(report, spec))
            advance(1)
    report.files = sorted(set(report.files))
    return report


def _ct_version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def card(report: QuantizeReport, spec: Scheme) -> str:
    """The model card: what the checkpoint is, how it was made, how to load it."""
    remote = any(f.endswith(".py") for f in report.files)
    calibration = (f"the inputs' global scales calibrated on {report.calibration_tokens:,} tokens of "
                   f"{', '.join(Path(p).name for p in report.calibration_text)}" if report.calibration_tokens
                   else "nothing calibrated (the scheme scales its inputs at run time)")
    load = ("from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16"
            + (", trust_remote_code=True" if remote else "") + ")")
    return "\n".join([
        f"# {Path(report.output).name}: {spec.name} ({spec.format})", "",
        f"{spec.description}. Written by `surgeon quantize` from `{report.source}` with compressed-tensors "
        f"{_ct_version()}: {report.layers} linear layers quantized, {len(report.kept_full_precision)} kept in full "
        f"precision (the LM head and gate projections); {calibration}.", "",
        f"Weights: {report.bytes_written / 1e6:,.1f} MB (the source's {report.bytes_source / 1e6:,.1f} MB).", "",
        "## Loading", "", "```python", "import torch", load, "```", "",
        "compressed-tensors must be installed. Loading in float32 fails inside compressed-tensors 0.20 (its NVFP4 "
        "decompression unpacks to bfloat16 whatever the model's dtype); `surgeon eval` loads it, decompresses it "
        "and puts each weight back on its 4-bit grid in float32." if spec.weight == "nvfp4"
        else "compressed-tensors must be installed.",
        "" if not remote else "\n`trust_remote_code` runs this directory's `modeling_surgeon.py` only: the surgeon "
        "modules (and any online Hadamard rotation, applied before the quantized linears read their input).", "",
    ]) + "\n"


def load_compressed(model_dir: str | os.PathLike, *, trust_remote_code: bool = False):
    """(model, tokenizer) of a compressed-tensors checkpoint, decompressed, computing in float32: each quantized
    linear runs compressed-tensors' own forward (its inputs quantized as the scheme says, with the calibrated
    global scale; its weights re-rounded onto their grid in float32). Decompressed by hand, then cast: loading in
    float32 fails inside compressed-tensors, whose NVFP4 decompression unpacks to bfloat16 (the weights'
    dequantization rounds there, and the next float32 matmul refuses the mix)."""
    from .progress import quiet_tqdm
    from .sources import load_model

    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise SurgeonError(f"{model_dir} is a compressed-tensors checkpoint: pip install compressed-tensors "
                           "(surgeon's [deploy] extra)") from None
    with quiet_tqdm():
        model, tokenizer = load_model(model_dir, trust_remote_code=trust_remote_code)
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is None:
        raise SurgeonError(f"transformers loaded {model_dir} without its compressed-tensors quantizer: upgrade "
                           "transformers and compressed-tensors")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with quiet_tqdm():
        compressor.decompress_model(model)
    for tensor in [*model.parameters(), *model.buffers()]:  # transformers refuses .float() on a quantized model
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    with torch.no_grad():  # the bfloat16 dequantization's rounding undone: each weight back on its grid, in fp32
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
                module.weight.data = fake_quantize(
                    module.weight.data, module.weight_scale, getattr(module, "weight_zero_point", None),
                    scheme.weights, global_scale=getattr(module, "weight_global_scale", None))
    return model, tokenizer


def deployed_scheme(model_dir: str | os.PathLike) -> str:
    """The scheme a compressed-tensors checkpoint was written in: surgeon's name where surgeon wrote it, else the
    compressed-tensors format."""
    record = Path(model_dir) / QUANTIZE_FILE
    if record.is_file():
        return json.loads(record.read_text())["scheme"]
    return (json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}).get(
        "format", "compressed-tensors")
