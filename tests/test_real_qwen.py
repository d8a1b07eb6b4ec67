"""The second real model: Qwen2.5-Coder-0.5B-Instruct (Qwen2, d = 896, untied; `install_defaults.sh --with
qwen2.5-0.5b`) converted with every pass at once, verified (logits kept), and loaded by stock transformers with
surgeon hidden — what test_convert checks on tiny random models, on real weights whose outliers are real.

Skipped when the model is not installed; under SURGEON_REQUIRE_DEFAULTS (CI) it fails instead (real_defaults.py).
"""

from __future__ import annotations

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

NAME = "qwen2.5-0.5b"
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


@pytest.fixture(scope="module")
def qwen():
    require_model(NAME)
    return sources.resolve_model(NAME)


def test_qwen_converted_with_every_pass_keeps_its_logits_and_loads_without_surgeon(qwen, tmp_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    text = sources.resolve_text("default")[2:6]  # plays the pipeline trains on, not its evaluation plays
    passes = [GatedNorm(rank=16), GatedAttention(), PreAffine(),
              AbsorbSinks(data=text, scan_tokens=CALIBRATION_TOKENS),
              Smooth(data=text, alpha=0.8, tokens=CALIBRATION_TOKENS), Hadamard(), GLU(alpha=0.0)]
    out = tmp_path / "qwen-every-pass"
    report = convert(qwen, out, passes, verify=True, show_progress=False)
    assert report.family == "qwen2"
    assert report.transforms == ["gated-norm", "gated-attention", "pre-affine", "absorb-sinks", "smooth",
                                 "hadamard", "glu"]
    assert report.verify["ok"] and report.verify["max_rel_diff"] <= 1e-5, report.verify
    # on each of the 49 residual-reading norms GatedNorm (rank 16: 2·16·896) and PreAffine's λ1 (896); a 896×896
    # gate on each of the 24 attention outputs
    assert report.params_after - report.params_before == 49 * (2 * 16 * 896 + 896) + 24 * 896 * 896

    _, tokenizer = sources.load_model(qwen)
    ids = next(sources.iter_token_windows(sources.resolve_text("default")[:1], tokenizer, 48, batch_size=2))
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SURGEON, str(out), str(tmp_path / "ids.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout  # the class came from the checkpoint's own modeling file
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    source, _ = sources.load_model(qwen)
    with torch.no_grad():
        expected = source(input_ids=ids).logits
    scale = expected.abs().max().item()
    assert (remote - expected).abs().max().item() <= 1e-5 * scale
