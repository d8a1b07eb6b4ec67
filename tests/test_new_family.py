"""A family described only by data: SmolLM3 (surgeon/architectures/smollm3.json, plus its two one-line classes
in the modeling file) runs through scan, every convert pass, train's measurement and eval with no other code.

Invariant: scan finds the planted residual sink and reads every residual reader's λ at it; each pass alone
preserves the logits (exactly where its formula is exact, within fp32 rounding for the gate and the rotation), as
does the main job's chain of them; the chained model loads as remote code without surgeon; measure and eval read
the converted model as they read the source. The tiny model puts one layer without RoPE (SmolLM3's NoPE layers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import HIDE_SURGEON, input_ids, logits, make_tiny, write_words
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.architectures import DATA_DIR, decoder_layers, for_config
from surgeon.cli import main
from surgeon.convert import convert
from surgeon.modeling import CLASSES
from surgeon.scan import ScanReport, scan
from surgeon.train.measure import measure
from surgeon.transforms import GLU, AbsorbSinks, GatedNorm, Hadamard, PreAffine, Smooth

FAMILY = "smollm3"
SINK, FACTOR = 5, 64.0
OVERRIDES = dict(no_rope_layer_interval=2)  # layer 1 of 2 runs without RoPE


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * a.abs().max().item()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_words(tmp_path_factory.mktemp("text") / "words.txt", 200)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny SmolLM3 with a residual sink at SINK: the embedding column and every o_proj / down_proj row SINK
    multiplied by FACTOR, found by tensor name, independently of the architecture data."""
    path = make_tiny(tmp_path_factory.mktemp("src") / FAMILY, FAMILY, config_overrides=OVERRIDES)
    (shard,) = path.glob("*.safetensors")
    state = load_file(shard)
    state["model.embed_tokens.weight"][:, SINK] *= FACTOR
    for name, t in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[SINK] *= FACTOR
    save_file(state, shard, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def scan_json(source, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    assert main(["scan", str(source), "--data", str(corpus), "--tokens", "512", "--seq-len", "32",
                 "--out", str(out), "--no-plots"]) == 0
    return out / "scan.json"


def test_the_family_is_its_json_file():
    arch = for_config({"model_type": FAMILY})
    assert (DATA_DIR / f"{FAMILY}.json").is_file()
    assert arch.layers == "model.layers"
    assert [arch.reader_key(r) for r in arch.residual_readers] == ["input_layernorm", "post_attention_layernorm",
                                                                   "final"]
    config_cls, model_cls = CLASSES[FAMILY]
    assert (config_cls.__name__, config_cls.model_type) == ("SurgeonSmolLM3Config", "surgeon_smollm3")
    assert model_cls.__name__ == "SurgeonSmolLM3ForCausalLM" and model_cls.config_class is config_cls


def test_scan_finds_the_sink_and_the_reader_norms(source, scan_json):
    report = ScanReport.load(scan_json)
    model = AutoModelForCausalLM.from_pretrained(source)
    assert report.model_type == FAMILY and report.num_layers == 2 and len(report.layers) == 3
    assert report.sink_dims[0] == SINK and report.sinks[0].scale_pow2 >= 16  # the planted 64×, over the median
    assert all(row.attention_sink is not None for row in report.layers[1:])  # the NoPE layer too
    norms = report.sinks[0].norm_weights
    assert set(norms) == {"input_layernorm", "post_attention_layernorm", "final"}
    for key in ("input_layernorm", "post_attention_layernorm"):
        expected = [float(getattr(layer, key).weight.detach()[SINK]) for layer in model.model.layers]
        assert norms[key] == pytest.approx(expected, rel=1e-4)
    assert norms["final"] == pytest.approx(float(model.model.norm.weight.detach()[SINK]), rel=1e-4)


PASSES = {
    "gated-norm": lambda scan_json, corpus: [GatedNorm(rank=4)],
    "pre-affine": lambda scan_json, corpus: [PreAffine()],
    "absorb-sinks": lambda scan_json, corpus: [AbsorbSinks(scan=scan_json)],
    "glu": lambda scan_json, corpus: [GLU()],
    "smooth": lambda scan_json, corpus: [Smooth(data=corpus, tokens=512, seq_len=32)],
    "hadamard": lambda scan_json, corpus: [Hadamard()],
}
EXACT = {"pre-affine", "absorb-sinks", "glu", "smooth"}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_pass_preserves_the_function(source, scan_json, corpus, tmp_path, name):
    out = tmp_path / "out"
    report = convert(source, out, PASSES[name](scan_json, corpus), show_progress=False)
    assert report.family == FAMILY and report.transforms == [name]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == (FAMILY if name == "smooth" else f"surgeon_{FAMILY}")  # smooth: weights only
    before, after = logits(source), logits(out)
    assert torch.equal(before, after) if name in EXACT else close(before, after)
    if name == "absorb-sinks":
        sinks = config["surgeon"]["absorb_sinks"]["sinks"]
        assert [s["dim"] for s in sinks] == [SINK] and sinks[0]["scale"] == ScanReport.load(scan_json).sinks[0].scale_pow2


@pytest.fixture(scope="module")
def chained(source, scan_json, corpus, tmp_path_factory):
    """The main job's passes in its order, in one convert."""
    out = tmp_path_factory.mktemp("chain") / "out"
    passes = [GatedNorm(rank=4), PreAffine(), AbsorbSinks(scan=scan_json), Smooth(data=corpus, tokens=512, seq_len=32),
              Hadamard(), GLU()]
    report = convert(source, out, passes, verify=True, show_progress=False)
    assert report.transforms == ["gated-norm", "pre-affine", "absorb-sinks", "smooth", "hadamard", "glu"]
    return out


def test_the_chain_preserves_the_function_and_loads_without_surgeon(source, chained, tmp_path):
    expected = logits(source)
    assert close(expected, logits(chained))
    torch.save(input_ids(), tmp_path / "ids.pt")
    script = HIDE_SURGEON + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(chained)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "SurgeonSmolLM3ForCausalLM", type(model).__name__
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert close(expected, torch.load(tmp_path / "out.pt"))


def test_scan_and_measure_read_the_converted_model(chained, scan_json):
    model = AutoModelForCausalLM.from_pretrained(chained).eval()
    assert type(model).__name__ == "SurgeonSmolLM3ForCausalLM" and len(decoder_layers(model)) == 2
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]
    report = scan(model, AutoTokenizer.from_pretrained(chained), windows, progress=False, sink_ratio=0.0,
                  max_sinks=model.config.hidden_size)  # every dimension listed, the absorbed one included
    at_sink = next(s for s in report.sinks if s.dim == SINK).norm_weights
    # absorb-sinks put the sink's scale into every residual reader's λ1
    scale = ScanReport.load(scan_json).sinks[0].scale_pow2
    assert at_sink["pre_affine"] == {"input_layernorm": [scale, scale], "post_attention_layernorm": [scale, scale],
                                     "final": scale}
    metrics = measure(model, windows)
    assert len(metrics["residual_max"]) == 3 and metrics["tokens"] == 2 * 2 * 31
    assert "gates" in metrics  # the GatedNorms, found and measured


def test_eval_reads_source_and_converted_alike(source, chained, corpus, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(source), str(chained), "--data", str(corpus), "--quant", "none,int4", "--seq-len", "16",
                 "--windows", "2", "--skip-tokens", "40", "--json", str(out)]) == 0
    src, conv = json.loads(out.read_text())
    assert set(src["perplexity"]) == set(conv["perplexity"]) == {"none", "int4"}
    assert conv["perplexity"]["none"] == pytest.approx(src["perplexity"]["none"], rel=1e-4)
    assert conv["layers_quantized"]["int4"] == src["layers_quantized"]["int4"] > 0
