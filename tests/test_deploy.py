"""surgeon quantize (surgeon/deploy.py): compressed-tensors checkpoints of tiny converted models, written, reloaded
and run — by surgeon (decompressed, float32) and by stock transformers with surgeon hidden (bfloat16) — against
surgeon's own fake quantizer with the same calibrated input scales; every bad input refused with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from tiny import HIDE_SURGEON, input_ids, make_tiny, write_words

from surgeon.cli import main
from surgeon.convert import convert
from surgeon.deploy import SCHEMES, is_compressed, load_compressed, quantizable_linears, quantize, scheme_of
from surgeon.errors import SurgeonError
from surgeon.quant import fake_quantized
from surgeon.sources import load_model
from surgeon.transforms import GatedNorm, Hadamard, PreAffine

KW = dict(tokens=512, seq_len=64, show_progress=False)
WIDE = dict(hidden_size=64, intermediate_size=128, head_dim=16)  # every width a multiple of INT4's groups of 32


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "words.txt"
    write_words(path, 400)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny llama with GatedNorm (its gate projections must stay unquantized), PreAffine and every Hadamard
    group (the rotation must reach the quantizer)."""
    root = tmp_path_factory.mktemp("converted")
    src = make_tiny(root / "src", "llama", config_overrides=WIDE)
    return convert(src, root / "conv", [GatedNorm(rank=16), PreAffine(), Hadamard()], show_progress=False).output


@pytest.fixture(scope="module")
def nvfp4_dir(converted, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "nvfp4"
    quantize(converted, out, "nvfp4", text=[text], **KW)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_nvfp4_checkpoint_computes_what_the_static_scale_fake_quantizer_estimates(converted, nvfp4_dir):
    record = json.loads((nvfp4_dir / "surgeon_quantize.json").read_text())
    deployed, _ = load_compressed(nvfp4_dir)
    model, _ = load_model(converted)
    ids = input_ids(2, 24)
    with fake_quantized(model, "nvfp4", inputs=record["input_amax"]):
        estimate = _logits(model, ids)
    with fake_quantized(model, "nvfp4"):  # per-token input scales: what a serving engine does not compute
        dynamic = _logits(model, ids)
    reference = _logits(model, ids)
    got = _logits(deployed, ids)
    scale = reference.abs().max()
    torch.testing.assert_close(got, estimate, rtol=0, atol=1e-5 * float(scale))
    assert (got - reference).abs().max() > 1e-3 * scale  # it is quantized
    assert (got - dynamic).abs().max() > 1e-5 * scale  # and the static global scale is what it computes
    assert is_compressed(nvfp4_dir) and not is_compressed(converted)


def test_the_rotation_is_carried_and_the_gate_projections_stay_in_full_precision(converted, nvfp4_dir):
    config = json.loads((nvfp4_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "nvfp4-pack-quantized"
    assert config["surgeon"]["hadamard"] == json.loads((converted / "config.json").read_text())["surgeon"]["hadamard"]
    ignored = set(quant["ignore"])
    assert "lm_head" in ignored and all(any(g in n for g in ("gate_down", "gate_up", "lm_head")) for n in ignored)
    assert len(ignored) == 2 * (2 * 2 + 1) + 1  # gate_down/gate_up on 2 norms × 2 layers + the final norm, lm_head
    with safe_open(nvfp4_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").dtype == torch.uint8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float8_e4m3fn
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.layers.0.mlp.down_proj.input_global_scale" in keys
    assert "model.layers.0.input_layernorm.gate_down.weight" in keys and "lm_head.weight" in keys
    deployed, _ = load_compressed(nvfp4_dir)
    hooked = [n for n, m in deployed.named_modules() if getattr(m, "surgeon_hadamard_block", None)]
    assert len(hooked) == 2 * 7  # q, k, v, o, gate, up, down in each layer: rotated before they quantize
    # without the rotation the same packed weights compute something else: the hooks are what carries it
    ids = input_ids(2, 24)
    rotated = _logits(deployed, ids)
    for name in hooked:
        dict(deployed.named_modules())[name]._forward_pre_hooks.clear()
    assert (_logits(deployed, ids) - rotated).abs().max() > 1e-2 * rotated.abs().max()


LOAD_STOCK = HIDE_SURGEON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits.float(), sys.argv[3])
    assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
""")


def _cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def test_stock_transformers_loads_it_in_bf16_with_surgeon_hidden(converted, nvfp4_dir, tmp_path):
    ids = input_ids(2, 24)
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run([sys.executable, "-c", LOAD_STOCK, str(nvfp4_dir), str(tmp_path / "ids.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    stock = torch.load(tmp_path / "logits.pt", weights_only=True)
    deployed, _ = load_compressed(nvfp4_dir)
    expected = _logits(deployed, ids)
    unquantized = _logits(load_model(converted)[0], ids)
    # bf16 moves some block scales and E2M1 roundings of a tiny random model (its logits are ~0.5): close to the
    # float32 computation of the same checkpoint, not equal — and closer to it than to the unquantized model
    assert _cosine(stock, expected) > 0.99 and _cosine(stock, expected) > _cosine(stock, unquantized)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "w4a4", "w4a16"])
def test_the_other_schemes_write_reload_and_stay_close(converted, text, tmp_path, scheme):
    out = tmp_path / scheme
    report = quantize(converted, out, scheme, text=[text], **KW)
    assert report.calibration_tokens == 0 and report.layers == 2 * 7  # nothing static to calibrate
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format"] == SCHEMES[scheme].format
    deployed, _ = load_compressed(out)
    model, _ = load_model(converted)
    ids = input_ids(2, 24)
    reference, got = _logits(model, ids), _logits(deployed, ids)
    error = float((got - reference).abs().max() / reference.abs().max())
    assert 1e-4 < error < 0.5, error
    q = dict(deployed.named_modules())["model.layers.1.mlp.up_proj"]
    if SCHEMES[scheme].weight == "int4":  # the weights lie on the symmetric INT4 grid, per group of 32
        steps = q.weight.reshape(q.weight.shape[0], -1, 32) / q.weight_scale.unsqueeze(-1)
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max() <= 8
    assert report.bytes_written < 0.6 * report.bytes_source


def test_cli_quantize_then_eval_shows_the_deployed_row(converted, text, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", str(converted), str(out), "--data", str(text), "--tokens", "512", "--seq-len", "64",
                 "--no-progress"]) == 0
    assert "surgeon quantize" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "Written by `surgeon quantize`" in card and "global scales calibrated on" in card
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == {
        "format": "nvfp4-pack-quantized", "status": "compressed", "packed_linears": 14, "kept": 11}
    assert main(["eval", str(converted), str(out), "--data", str(text), "--seq-len", "64", "--windows", "2",
                 "--skip-tokens", "0", "--quant", "none,nvfp4", "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())
    assert list(rows[1]["perplexity"]) == ["deployed nvfp4"] and rows[1]["ratio"] == {}
    assert rows[1]["perplexity"]["deployed nvfp4"] > 0 and "deployed nvfp4" in capsys.readouterr().out


def test_the_help_lists_every_scheme_without_importing_torch():
    from surgeon.commands.quantize import SCHEME_NAMES

    assert SCHEME_NAMES == tuple(SCHEMES)
    done = subprocess.run([sys.executable, "-c", "import sys\nfrom surgeon.cli import main\ntry:\n    main(['quantize', "
                           "'--help'])\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "nvfp4a16" in done.stdout, done.stderr[-2000:]


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(converted, nvfp4_dir, text, tmp_path, capsys):
    cases = [
        (["--scheme", "fp8"], "unknown --scheme 'fp8'"),
        (["--data", str(text), "--tokens", "32"], "less than one window"),
        (["--data", str(text), "--tokens", "1000000"], "fewer than --tokens"),
    ]
    for argv, message in cases:
        out = tmp_path / "x"
        assert main(["quantize", str(converted), str(out), "--seq-len", "64", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".x.*"))
    assert main(["quantize", str(converted), str(nvfp4_dir), "--data", str(text), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", str(nvfp4_dir), str(tmp_path / "y"), "--no-progress"]) == 2
    assert "already a compressed-tensors checkpoint" in capsys.readouterr().err
    with pytest.raises(SurgeonError, match="calibrates its inputs' global scale: add --data"):
        quantize(converted, tmp_path / "z", "nvfp4", text=None, **KW)
    with pytest.raises(SurgeonError, match="not a multiple of w4a4's blocks of 32"):
        quantize(make_tiny(tmp_path / "narrow", "llama"), tmp_path / "z", "w4a4", **KW)  # d = 48
    head_only = torch.nn.Module()
    head_only.lm_head = torch.nn.Linear(8, 8)
    with pytest.raises(SurgeonError, match="no linear layer to quantize"):
        quantizable_linears(head_only, scheme_of("nvfp4"))
    assert not (tmp_path / "z").exists() and not (tmp_path / "y").exists()
