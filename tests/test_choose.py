"""The pass chooser (surgeon/choose.py) on planted cases, with the real passes, converter and fake quantizers:

  * helps: a tiny llama whose norms carry one channel ×64 (the readers' columns ÷64: the same function) — the
    activation outlier INT4's one scale per token is crushed by; smooth moves it into the weights and is kept;
  * hurts: a tiny llama whose linear weights already lie on the INT4 grid (as a GGUF's 4-bit weights do) — a
    Hadamard rotation takes them off it and smoothing rescales their columns, so under INT4 both are dropped.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import logits, make_tiny

from surgeon.choose import SIGNIFICANCE, choose, choose_each, lowers, markdown, significantly_lower, table
from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.quant import INT4_GROUP, int4
from surgeon.transforms import PreAffine

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. ") * 40
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
KW = dict(seq_len=32, batch_size=2, smooth_tokens=256, show=False)


def _rewrite(src, edit):
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file({k: v.contiguous() for k, v in weights.items()}, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    def plant(w):
        for layer in range(2):
            for norm, readers in READERS.items():
                w[f"model.layers.{layer}.{norm}.weight"][5] *= 64
                for reader in readers:
                    w[f"model.layers.{layer}.{reader}.weight"][:, 5] /= 64
    return _rewrite(make_tiny(tmp_path_factory.mktemp("outlier") / "m", "llama"), plant)


@pytest.fixture(scope="module")
def on_grid(tmp_path_factory):
    def snap(w):
        for name in w:
            if name.endswith("proj.weight"):
                w[name] = int4(w[name], group=INT4_GROUP)
    return _rewrite(make_tiny(tmp_path_factory.mktemp("grid") / "m", "llama", seed=3), snap)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def test_a_pass_that_helps_is_kept(outlier, text):
    choice = choose(outlier, [PreAffine()], [text], target="int4", **KW)
    source, base, *rest = choice.trials
    assert source.verdict == "source" and source.passes == [] and base.verdict == "base"
    assert base.label == "base: pre-affine"
    # an identity PreAffine: the same model
    assert source.figures["int4"]["kl"] == pytest.approx(base.figures["int4"]["kl"], rel=1e-4)
    smooth = [t for t in rest if t.stage == "smooth"]
    kept = [t for t in smooth if t.verdict == "kept"]
    assert len(kept) == 1 and kept[0].figures["int4"]["kl"] < base.figures["int4"]["kl"] / 4  # the outlier, moved
    assert choice.passes[0].name == "smooth" and choice.passes[0].alpha == float(kept[0].label.split()[-1])
    # every later stage was measured on top of what was kept
    assert all(t.passes[1].name == "smooth" for t in rest if t.stage == "hadamard")
    assert choice.labels()[0] == kept[0].label and not choice.overlaps_calibration


def test_a_pass_that_hurts_is_dropped(on_grid, text):
    choice = choose(on_grid, [PreAffine()], [text], target="int4", **KW)
    base = choice.trials[1]
    rotated = next(t for t in choice.trials if t.label == "hadamard all")
    assert rotated.figures["int4"]["kl"] > 1.5 * base.figures["int4"]["kl"] and rotated.verdict == "worse"
    assert all(t.verdict == "worse" for t in choice.trials if t.stage == "smooth")
    assert not any(p.name == "smooth" for p in choice.passes)
    assert "hadamard all" not in choice.labels()


def test_both_formats_must_be_lower_and_the_table_says_what_was_decided(outlier, text):
    def w(*values):
        return {"kl_windows": list(values)}

    assert lowers({"nvfp4": w(1.0, 1.1), "int4": w(2.0, 2.1)}, {"nvfp4": w(1.5, 1.6), "int4": w(3.0, 3.1)},
                  ("nvfp4", "int4"))
    assert not lowers({"nvfp4": w(1.0, 1.1), "int4": w(3.5, 3.6)}, {"nvfp4": w(1.5, 1.6), "int4": w(3.0, 3.1)},
                      ("nvfp4", "int4"))  # INT4 better, NVFP4 worse: no
    assert lowers({"nvfp4": w(1.0, 1.1), "int4": w(3.5, 3.6)}, {"nvfp4": w(1.5, 1.6), "int4": w(3.0, 3.1)},
                  ("nvfp4",))  # deciding on NVFP4 alone: yes
    choice = choose(outlier, [PreAffine()], [text], target="both", hadamard=False, **KW)
    assert set(choice.trials[0].figures) == {"nvfp4", "int4"}
    for trial in choice.trials[2:]:
        assert (trial.verdict != "worse") == lowers(trial.figures, choice.trials[1].figures, choice.formats)
    lines = markdown(choice)
    assert lines[0] == "| stage | candidate | NVFP4 W4A4 KL | NVFP4 ppl | INT4 W4A4 KL | INT4 ppl | verdict |"
    assert len(lines) == 2 + 2 + 3 and "**kept**" in "".join(lines) and "for comparison" in lines[2]
    assert table(choice).row_count == 5
    with pytest.raises(SurgeonError, match="unknown --format 'fp8'"):
        choose(outlier, [], [text], target="fp8", **KW)


# per pass, its planted change of the (NVFP4, INT4) error: attention_out helps INT4 most but hurts NVFP4, so "all"
# is not lower in both; smooth α 0.5 hurts NVFP4 alone and helps beneath a rotation
EFFECT = {"attention_in": (-0.02, -1.0), "attention_out": (0.1, -3.0), "mlp_in": (-0.01, -0.5),
          "mlp_out": (-0.03, -4.0)}


def _planted(source, passes, ids, formats, out, label, show, reference):
    nvfp4, int4_ = 1.0, 10.0
    names = [p.name for p in passes]
    for p in passes:
        if p.name == "hadamard":
            for g in p.groups:
                nvfp4, int4_ = nvfp4 + EFFECT[g][0], int4_ + EFFECT[g][1]
        if p.name == "smooth" and p.alpha == 0.5:
            nvfp4 += -0.01 if "hadamard" in names else 0.01
            int4_ -= 0.5
        if p.name == "smooth" and p.alpha == 0.8:
            nvfp4 += 0.05
    figures = {"nvfp4": nvfp4, "int4": int4_}
    # eight windows that agree (±1%) on each candidate's error: every planted difference is beyond the noise
    return {f: {"kl": figures[f], "perplexity": math.exp(figures[f]),
                "kl_windows": [figures[f] * (1 + 0.01 * (-1) ** i) for i in range(8)]} for f in formats}


def test_hadamard_groups_by_forward_selection_then_smooth_again_beneath_them(outlier, text, monkeypatch):
    """The search, on planted errors: each group that lowers both formats is added while one does, the group that
    hurts NVFP4 is left out (with it "all" was not lower), and smooth is retried beneath the kept rotation."""
    import surgeon.choose

    monkeypatch.setattr(surgeon.choose, "_measure", _planted)
    choice = choose(outlier, [PreAffine()], [text], target="both", alphas=(0.5, 0.8), **KW)
    rows = {t.label: t.verdict for t in choice.trials}
    assert rows["hadamard all"] == "worse" and rows["hadamard attention_out"] == "worse"
    assert rows["smooth α 0.5"] == "worse" and rows["smooth α 0.8"] == "worse"
    assert rows["hadamard mlp_out"] == "kept" and rows["hadamard attention_in"] == "dropped"
    assert rows["hadamard attention_in + mlp_out"] == "kept"
    assert rows["hadamard attention_in + attention_out + mlp_out"] == "worse"
    assert rows["hadamard attention_in + mlp_in + mlp_out"] == "kept"
    assert "hadamard attention_in + attention_out + mlp_in + mlp_out" not in rows  # that is "all", measured first
    assert rows["smooth α 0.5 beneath hadamard attention_in + mlp_in + mlp_out"] == "kept"
    assert rows["smooth α 0.8 beneath hadamard attention_in + mlp_in + mlp_out"] == "worse"
    assert choice.labels() == ["smooth α 0.5", "hadamard attention_in + mlp_in + mlp_out"]
    assert [p.name for p in choice.passes] == ["smooth", "hadamard"] and choice.passes[0].alpha == 0.5
    assert choice.passes[1].groups == ("attention_in", "mlp_in", "mlp_out")


def test_convert_auto_prints_the_table_and_writes_what_it_kept(outlier, text, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["convert", str(outlier), str(out), "-t", "pre-affine", "--auto", "--format", "int4",
                 "--data", str(text), "--smooth-tokens", "256", "--verify"]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # the table goes where surgeon's progress goes (stderr)
    assert "passes chosen by W4A4 error" in printed and "kept" in printed
    block = json.loads((out / "config.json").read_text())["surgeon"]
    assert block["transforms"][:2] == ["pre-affine", "smooth"]
    torch.testing.assert_close(logits(out), logits(outlier), rtol=0, atol=1e-5)
    for argv, message in ((["-t", "smooth", "--data", str(text)], "--auto chooses smooth and hadamard itself"),
                          ([], "add --data TEXT")):
        assert main(["convert", str(outlier), str(tmp_path / "x"), "--auto", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(outlier), str(tmp_path / "x")]) == 2  # neither -t nor --auto
    assert "convert needs a pass: -t NAME" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_pipeline_converts_with_what_the_chooser_kept_and_reports_it(outlier, text, tmp_path):
    """The main job's default: the chooser runs on the training text, its kept passes are the converted model's
    optional passes, and report.md / choice.json hold the table it decided from."""
    from surgeon.pipeline import PipelineConfig, run

    cfg = PipelineConfig(model=str(outlier), data=str(text), scan_tokens=256, seq_len=32, eval_windows=2,
                         eval_skip_tokens=32, batch_size=2, train=False, smooth_alphas=(0.5, 0.8), format="both",
                         deploy=None)  # the deployed rows are test_pipeline's
    result = run(cfg, tmp_path / "run")
    kept = [p.name for p in result.choice.passes]
    assert kept[0] == "smooth"  # the planted outlier: smooth lowers both formats' error
    block = json.loads((tmp_path / "run" / "model-converted" / "config.json").read_text())["surgeon"]
    assert block["transforms"] == ["pre-affine", *kept]
    assert block["smooth"]["alpha"] == result.choice.passes[0].alpha
    saved = json.loads((tmp_path / "run" / "choice.json").read_text())["both"]
    assert saved["kept"] == result.choice.labels() and saved["formats"] == ["nvfp4", "int4"]
    assert [t["label"] for t in saved["trials"]][:4] == ["the source, unconverted", "base: pre-affine", "smooth α 0.5",
                                                        "smooth α 0.8"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Passes chosen by measurement" in report and "| smooth | smooth α 0.5 |" in report
    assert result.verify["ok"] and "choose" in result.stages


def test_the_rotation_alone_replaces_a_smooth_it_makes_unneeded(outlier, text, monkeypatch):
    """Planted: smooth α 0.5 lowers INT4 alone, but beneath the rotation it raises it — so the smooth-again stage's
    "no smooth" candidate is kept and the choice is the rotation alone."""
    import surgeon.choose

    def planted(source, passes, ids, formats, out, label, show, reference):
        names = [p.name for p in passes]
        int4_ = 10.0 - 2.0 * ("smooth" in names) - 6.0 * ("hadamard" in names) + 3.0 * ("smooth" in names and
                                                                                       "hadamard" in names)
        return {f: {"kl": int4_, "perplexity": math.exp(int4_), "kl_windows": [int4_ * (1 + 0.01 * (-1) ** i)
                                                                               for i in range(8)]} for f in formats}

    monkeypatch.setattr(surgeon.choose, "_measure", planted)
    choice = choose(outlier, [PreAffine()], [text], target="int4", alphas=(0.5,), **KW)
    rows = {t.label: t.verdict for t in choice.trials}
    assert rows["smooth α 0.5"] == "replaced" and rows["hadamard all"] == "kept"
    assert rows["no smooth beneath hadamard all"] == "kept"
    assert choice.labels() == ["hadamard all"] and [p.name for p in choice.passes] == ["hadamard"]


def test_a_difference_the_windows_do_not_agree_on_is_noise():
    """Paired windows: a mean 5% lower that two of eight windows contradict by more is not kept; the same mean with
    every window lower is."""
    current = [1.0] * 8
    consistent = [0.95] * 8
    noisy = [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 1.3, 1.3]  # mean 0.925, standard error of the difference ~0.07
    assert significantly_lower(consistent, current)
    assert not significantly_lower(noisy, current)
    assert sum(noisy) / 8 < 1.0  # lower on average: the plain comparison would have kept it
    assert significantly_lower([0.9], [1.0]) and not significantly_lower([1.0], [1.0])  # one window: plain
    assert SIGNIFICANCE >= 1.5


def test_absorb_is_a_candidate_and_each_format_gets_its_own_search(outlier, text, monkeypatch):
    """choose_each on planted errors: absorb-sinks, tried first, helps INT4 and hurts NVFP4, so only INT4's search
    keeps it; attention_out's rotation helps INT4 only, so INT4 keeps it and NVFP4 does not; every pass list is
    measured once for both searches."""
    import surgeon.choose
    from surgeon.transforms import AbsorbSinks

    calls = []

    def planted(source, passes, ids, formats, out, label, show, reference):
        calls.append(tuple(surgeon.choose.pass_label(p) for p in passes))
        figures = _planted(source, [p for p in passes if p.name != "absorb-sinks"], ids, formats, out, label, show,
                           reference)
        if any(p.name == "absorb-sinks" for p in passes):
            figures = {f: {**v, "kl": v["kl"] + d, "kl_windows": [x + d for x in v["kl_windows"]]}
                       for f, v in figures.items() for d in [{"nvfp4": 0.02, "int4": -1.0}[f]]}
        return figures

    monkeypatch.setattr(surgeon.choose, "_measure", planted)
    choices = choose_each(outlier, [PreAffine()], [text], absorb=AbsorbSinks(sinks=[1], scale=8), alphas=(0.5,), **KW)
    nvfp4, int4_ = choices["nvfp4"], choices["int4"]
    assert nvfp4.formats == ("nvfp4",) and int4_.formats == ("int4",) and nvfp4.shown == ("nvfp4", "int4")
    assert {t.label: t.verdict for t in nvfp4.trials}["absorb-sinks"] == "worse"
    assert {t.label: t.verdict for t in int4_.trials}["absorb-sinks"] == "kept"
    assert "absorb-sinks" not in nvfp4.labels() and int4_.labels()[0] == "absorb-sinks"
    assert "attention_out" in int4_.passes[-1].groups
    int4_rows = {t.label: t.verdict for t in int4_.trials}
    assert int4_rows["smooth α 0.5"] == "kept"  # and the rotation without it is tried, and is worse here
    assert int4_rows[f"no smooth beneath {surgeon.choose.hadamard_label(int4_.passes[-1].groups)}"] == "worse"
    assert not any(p.name == "hadamard" and "attention_out" in p.groups for p in nvfp4.passes)
    assert all(t.passes[1].name == "absorb-sinks" for t in int4_.trials if t.stage in ("smooth", "hadamard"))
    assert len(calls) == len(set(calls))  # shared: no pass list converted twice
    assert len(calls) < len(nvfp4.trials) + len(int4_.trials)
    assert markdown(nvfp4)[0].count("W4A4 KL") == 2  # both formats shown, NVFP4 decided on


def test_the_pipeline_converts_once_per_format_where_their_choices_differ(outlier, text, tmp_path):
    """--format each (the default): a search per format on shared measurements; the planted outlier model keeps
    other passes for NVFP4 than for INT4, so there are two conversions, each with its own passes, directory,
    scan, evaluation in both formats and table in the report."""
    from surgeon.pipeline import PipelineConfig, run

    cfg = PipelineConfig(model=str(outlier), data=str(text), scan_tokens=256, seq_len=32, eval_windows=2,
                         eval_skip_tokens=32, batch_size=2, train=False, smooth_alphas=(0.5, 0.8), deploy=None)
    assert cfg.format == "each"
    result = run(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    nvfp4, int4_ = result.choices["nvfp4"], result.choices["int4"]
    assert nvfp4.formats == ("nvfp4",) and int4_.formats == ("int4",)
    assert nvfp4.labels() != int4_.labels()  # on this model (see the report's tables)
    assert [c.suffix for c in result.conversions] == ["-nvfp4", "-int4"]
    report = (run_dir / "report.md").read_text()
    for conversion, choice in zip(result.conversions, (nvfp4, int4_)):
        assert conversion.choice is choice and conversion.verify["ok"]
        block = json.loads((run_dir / f"model-converted{conversion.suffix}" / "config.json").read_text())["surgeon"]
        assert block["transforms"] == ["pre-affine", *(p.name for p in choice.passes)]
        assert set(result.evals[f"converted{conversion.suffix}"].perplexity) >= {"none", "nvfp4", "int4"}
        assert f"Kept: {', '.join(choice.labels())} (`model-converted{conversion.suffix}/`)" in report
    assert "### For NVFP4" in report and "### For INT4" in report and "| converted-int4 |" in report
    assert not (run_dir / "model-converted").exists()
    saved = json.loads((run_dir / "results.json").read_text())
    assert [c["label"] for c in saved["conversions"]] == ["converted-nvfp4", "converted-int4"]
    assert sorted(json.loads((run_dir / "choice.json").read_text())) == ["int4", "nvfp4"]
