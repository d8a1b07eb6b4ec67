"""convert: every transform and combination on every family (tied and untied) preserves the logits, adds
exactly the parameters its formula says with the specified init, round-trips, and loads without surgeon."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from tiny import FAMILIES, HIDE_SURGEON, input_ids, logits, make_tiny

from surgeon.convert import convert
from surgeon.errors import SurgeonError
from surgeon.io import Checkpoint
from surgeon.transforms import GatedNorm, PreAffine

RESIDUAL_NORMS = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                  "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
QK_NORMS = [f"model.layers.{i}.self_attn.{k}" for i in range(2) for k in ("q_norm", "k_norm")]
COMBOS = {"gated": ("gated-norm",), "pre": ("pre-affine",), "both": ("gated-norm", "pre-affine")}
RANK = 8


def build(names, rank=RANK, roles=("residual",)):
    return [GatedNorm(rank=rank, roles=roles) if n == "gated-norm" else PreAffine(roles=roles) for n in names]


def tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.tensors}


def assert_close_logits(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    assert (a - b).abs().max().item() <= rel * a.abs().max().item()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {(f, tied): make_tiny(root / f"{f}-{'tied' if tied else 'untied'}", f, tied)
            for f in FAMILIES for tied in (False, True)}


@pytest.mark.parametrize("combo", sorted(COMBOS))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_function_and_parameters(sources, tmp_path, family, tied, combo):
    src = sources[(family, tied)]
    out = tmp_path / "out"
    report = convert(src, out, build(COMBOS[combo]), show_progress=False)
    assert report.transforms == list(COMBOS[combo])

    # function preserved
    assert_close_logits(logits(src), logits(out))

    # exactly the parameters the formulas add, with the specified init; everything else bit-identical
    before, after = tensors(src), tensors(out)
    gated, pre = "gated-norm" in COMBOS[combo], "pre-affine" in COMBOS[combo]
    expected_new = set()
    for norm in RESIDUAL_NORMS:
        w = before[f"{norm}.weight"]
        d = w.shape[0]
        if gated:
            expected_new |= {f"{norm}.gate_down.weight", f"{norm}.gate_up.weight"}
            assert torch.equal(after[f"{norm}.weight"], 2 * w)
            assert after[f"{norm}.gate_up.weight"].shape == (d, RANK)
            assert not after[f"{norm}.gate_up.weight"].any()
            assert after[f"{norm}.gate_down.weight"].shape == (RANK, d)
        else:
            assert torch.equal(after[f"{norm}.weight"], w)
        if pre:
            expected_new.add(f"{norm}.pre_affine")
            assert torch.equal(after[f"{norm}.pre_affine"], torch.ones(d))
    assert set(after) - set(before) == expected_new
    assert set(before) <= set(after)
    for name in before:
        if not (gated and name.endswith("norm.weight") and name.rsplit(".", 1)[0] in RESIDUAL_NORMS):
            assert torch.equal(before[name], after[name]), name
    if gated:  # W_down ~ N(0, 1/d): pooled over all gates, the std is within a few percent of 1/sqrt(d)
        downs = torch.cat([after[f"{n}.gate_down.weight"].flatten() for n in RESIDUAL_NORMS])
        assert downs.std().item() == pytest.approx(1 / math.sqrt(48), rel=0.1)
        assert abs(downs.mean().item()) < 0.05
    assert report.params_after - report.params_before == sum(after[n].numel() for n in expected_new)


def test_written_directory(sources, tmp_path):
    src = sources[("llama", True)]
    out = tmp_path / "out"
    convert(src, out, build(COMBOS["both"]), show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "surgeon_llama"
    assert config["architectures"] == ["SurgeonLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_surgeon.SurgeonLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_surgeon.SurgeonLlamaForCausalLM"}
    block = config["surgeon"]
    assert block["transforms"] == ["gated-norm", "pre-affine"]
    assert block["gated_norm"] == {"rank": RANK, "targets": ["model.layers.*.input_layernorm",
                                                             "model.layers.*.post_attention_layernorm", "model.norm"]}
    assert block["pre_affine"]["targets"] == block["gated_norm"]["targets"]
    assert len(block["source_sha256"]) == 64 and block["base_model_type"] == "llama"
    assert config["tie_word_embeddings"] is True and config["hidden_size"] == 48
    for name in ("modeling_surgeon.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "surgeon_manifest.json", "README.md", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00001.safetensors"]
    with safe_open(str(out / shards[0]), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert set(fh.keys()) == set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(fh.get_tensor(k).nbytes for k in fh.keys())
    assert not list(tmp_path.glob(".*surgeon-tmp"))  # the staging directory is gone


def test_source_sha256_is_sha256sum_of_the_files(sources, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    src = sources[("qwen2", False)]
    files = {f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in ("config.json", "model.safetensors")}
    sha256sum = "".join(f"{d}  {f}\n" for f, d in files.items())
    for out in ("cold", "cached"):  # the second run takes the per-file digests from the cache
        report = convert(src, tmp_path / out, build(COMBOS["pre"]), show_progress=False)
        assert report.source_files == files
        assert report.source_sha256 == hashlib.sha256(sha256sum.encode()).hexdigest()
    assert (tmp_path / "cache" / "sha256.json").is_file()


def test_qwen3_qk_norms(sources, tmp_path):
    src = sources[("qwen3", False)]
    out = tmp_path / "out"
    convert(src, out, build(COMBOS["both"], roles=("residual", "q_norm", "k_norm")), show_progress=False)
    assert_close_logits(logits(src), logits(out))
    after = tensors(out)
    for norm in QK_NORMS:
        assert after[f"{norm}.gate_down.weight"].shape == (RANK, 12)  # per-head norms: d = head_dim
        assert torch.equal(after[f"{norm}.pre_affine"], torch.ones(12))


def test_qk_norm_refused_where_absent(sources, tmp_path):
    with pytest.raises(SurgeonError, match="llama has no 'q_norm' norm"):
        convert(sources[("llama", False)], tmp_path / "out", build(COMBOS["gated"], roles=("q_norm",)),
                show_progress=False)
    assert not (tmp_path / "out").exists()


def test_reload_round_trip(sources, tmp_path):
    import surgeon.modeling  # noqa: F401  (registers the surgeon_* families)
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    convert(sources[("mistral", False)], out, build(COMBOS["both"]), show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "SurgeonMistralForCausalLM"
    model.save_pretrained(tmp_path / "again")
    state_a, state_b = model.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert_close_logits(logits(out), logits(tmp_path / "again"), rel=0)


def test_stacking_and_refusing_twice(sources, tmp_path):
    src = sources[("qwen2", True)]
    gated = tmp_path / "gated"
    convert(src, gated, build(COMBOS["gated"]), show_progress=False)
    with pytest.raises(SurgeonError, match="already has gated-norm"):
        convert(gated, tmp_path / "twice", build(COMBOS["gated"]), show_progress=False)
    assert not (tmp_path / "twice").exists()
    both = tmp_path / "both"
    convert(gated, both, build(COMBOS["pre"]), show_progress=False)
    assert_close_logits(logits(src), logits(both))
    block = json.loads((both / "config.json").read_text())["surgeon"]
    assert block["transforms"] == ["gated-norm", "pre-affine"] and len(block["history"]) == 2
    with pytest.raises(SurgeonError, match="already has pre-affine"):
        convert(both, tmp_path / "thrice", build(COMBOS["pre"]), show_progress=False)


def test_bf16_output_is_exact(sources, tmp_path):
    src = sources[("llama", False)]
    out = tmp_path / "out"
    report = convert(src, out, build(COMBOS["both"]), dtype="bf16", verify=True, show_progress=False)
    assert report.verify["ok"] and report.verify["max_abs_diff"] == 0.0
    after = tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    w = tensors(src)["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(after["model.norm.weight"], 2 * w)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_close_logits(logits(src, dtype=torch.bfloat16), logits(out, dtype=torch.bfloat16), rel=0)


def test_sharded_in_and_out(tmp_path):
    src = make_tiny(tmp_path / "src", "qwen3", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    report = convert(src, out, build(COMBOS["gated"]), shard_size="64KB", show_progress=False)
    assert len(report.shards) > 2
    assert report.shards[0] == f"model-00001-of-{len(report.shards):05d}.safetensors"
    assert_close_logits(logits(src), logits(out))


def test_bin_source_is_read_without_unpickling(tmp_path):
    from safetensors.torch import load_file

    src = make_tiny(tmp_path / "src", "llama")  # transformers 5 writes safetensors only: make the .bin by hand
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    convert(src, out, build(COMBOS["pre"]), show_progress=False)
    assert_close_logits(logits(src), logits(out))
    assert not list(out.glob("*.bin"))


def test_verify_catches_a_wrong_rewrite(sources, tmp_path, monkeypatch):
    """A GatedNorm that forgets λ ← 2λ halves every norm output: --verify must fail and write nothing."""
    monkeypatch.setattr("surgeon.plan.Plan.rewrite", lambda self, name, fn: None)
    with pytest.raises(SurgeonError, match="verification failed"):
        convert(sources[("llama", False)], tmp_path / "out", build(COMBOS["gated"]), verify=True,
                show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(sources, tmp_path, monkeypatch):
    src = sources[("llama", False)]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    calls = []

    def flaky(self, spec):
        calls.append(spec.name)
        if len(calls) > 3:
            raise OSError("disk full")
        return self.tensors[spec.name].produce()

    monkeypatch.setattr("surgeon.plan.Plan.produce", flaky)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "out", build(COMBOS["gated"]), show_progress=False)
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_force_replaces_existing(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(sources[("llama", False)], out, build(COMBOS["pre"]), force=True, show_progress=False)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


LOAD_WITHOUT_SURGEON = HIDE_SURGEON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.tensor({ids})
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[2])
    assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
    print(type(model).__module__)
""")


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_only_torch_and_transformers(sources, tmp_path, family):
    src = sources[(family, family == "qwen3")]
    out = tmp_path / "out"
    roles = ("residual", "q_norm", "k_norm") if family == "qwen3" else ("residual",)
    convert(src, out, build(COMBOS["both"], roles=roles), show_progress=False)
    ids = input_ids()
    script = LOAD_WITHOUT_SURGEON.format(ids=ids.tolist())
    result = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "logits.pt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout  # the class came from the checkpoint's own modeling file
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert_close_logits(logits(src, ids), remote)
