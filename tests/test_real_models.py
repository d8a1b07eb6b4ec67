"""The real models beyond SmolLM2 (`install_defaults.sh --with NAME`): Qwen2.5-Coder-0.5B-Instruct (Qwen2,
d = 896, untied) and Gemma-3-270M (Gemma 3, d = 640, tied; norms scale by 1 + w, sandwich norms, GeGLU, a residual
sink of ~10⁵), each converted with every pass at once, verified (logits kept), and loaded by stock transformers
with surgeon hidden — what test_convert and test_gemma check on tiny random models, on real weights whose outliers
are real.

Skipped when a model is not installed; under SURGEON_REQUIRE_DEFAULTS (CI) it fails instead (real_defaults.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from real_defaults import require_model
from tiny import HIDE_SURGEON

from surgeon import sources
from surgeon.convert import convert
from surgeon.transforms import GLU, AbsorbSinks, GatedAttention, GatedNorm, Hadamard, PreAffine, Smooth

FAMILIES = {"qwen2.5-0.5b": "qwen2", "gemma3-270m": "gemma3_text"}
CALIBRATION_TOKENS = 1024  # smooth's and absorb-sinks' calibration: enough for real statistics, cheap on 2 cores

LOAD_WITHOUT_SURGEON = HIDE_SURGEON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[3])
    assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
    print(type(model).__module__)
""")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_converted_with_every_pass_keeps_its_logits_and_loads_without_surgeon(name, tmp_path):
    require_model(name)
    model = sources.resolve_model(name)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    text = sources.resolve_text("default")[2:6]  # plays the pipeline trains on, not its evaluation plays
    passes = [GatedNorm(rank=16), GatedAttention(), PreAffine(),
              AbsorbSinks(data=text, scan_tokens=CALIBRATION_TOKENS),
              Smooth(data=text, alpha=0.8, tokens=CALIBRATION_TOKENS), Hadamard(), GLU(alpha=0.0)]
    out = tmp_path / "every-pass"
    report = convert(model, out, passes, verify=True, show_progress=False)
    assert report.family == FAMILIES[name]
    assert report.transforms == ["gated-norm", "gated-attention", "pre-affine", "absorb-sinks", "smooth",
                                 "hadamard", "glu"]
    assert report.verify["ok"] and report.verify["max_rel_diff"] <= 1e-5, report.verify
    # on each of the 2L + 1 residual-reading norms (pre-attention, pre-MLP, final) GatedNorm (rank 16: 2·16·d) and
    # PreAffine's λ1 (d); a d × (heads·head_dim) gate on each of the L attention outputs; a tied model's LM head
    # written apart (absorb-sinks unties it). Qwen: d 896, L 24, 14 × 64, untied; Gemma: d 640, L 18, 4 × 256, tied.
    config = json.loads((model / "config.json").read_text())
    d, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    attention = heads * (config.get("head_dim") or d // heads)
    lm_head = config["vocab_size"] * d if config.get("tie_word_embeddings") else 0
    assert report.params_after - report.params_before == (
        (2 * layers + 1) * (2 * 16 * d + d) + layers * d * attention + lm_head)

    _, tokenizer = sources.load_model(model)
    ids = next(sources.iter_token_windows(sources.resolve_text("default")[:1], tokenizer, 48, batch_size=2))
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SURGEON, str(out), str(tmp_path / "ids.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout  # the class came from the checkpoint's own modeling file
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    source, _ = sources.load_model(model)
    with torch.no_grad():
        expected = source(input_ids=ids).logits
    scale = expected.abs().max().item()
    assert (remote - expected).abs().max().item() <= 1e-5 * scale
