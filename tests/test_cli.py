"""The CLI: the happy path prints a summary; every bad input is one line on stderr, exit 2, nothing written,
and the source untouched."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import make_tiny

from surgeon.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("good") / "llama", "llama")


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_failing(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("surgeon: error: "), err
    assert match in err[0], err[0]
    return err[0]


def test_convert_and_inspect(good, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(good), str(out), "-t", "gated-norm", "-t", "pre-affine", "--rank", "4",
                 "--verify"]) == 0
    text = capsys.readouterr().out
    assert "gated-norm, pre-affine" in text and "ok" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["transforms"] == ["gated-norm", "pre-affine"] and info["gate_rank"] == 4
    assert info["norms"]["final"]["carries"] == ["pre_affine", "gate"]
    assert info["family"] == "llama" and info["model_type"] == "surgeon_llama"
    assert info["absorbed_sinks"] == [] and info["glu_alpha"] is None


def corrupt(kind, src):
    weights = src / "model.safetensors"
    if kind == "missing config":
        (src / "config.json").unlink()
    elif kind == "unsupported family":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
    elif kind.startswith("index"):
        shard = "model-00001-of-00002.safetensors" if kind == "index missing shard" else "../elsewhere.safetensors"
        if kind == "index outside":
            shutil.copy(weights, src.parent / "elsewhere.safetensors")
        weights.unlink()
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            "model.norm.weight": shard}}))


CASES = {
    "missing config": "has no config.json",
    "unsupported family": "unsupported model family 'gpt2'; supported: gemma2, gemma3_text, llama, mistral, mixtral, "
                          "qwen2, qwen2_moe, qwen3, qwen3_moe",
    "truncated": "truncated or corrupt",
    "corrupt header": "truncated or corrupt",
    "index missing shard": "names shard 'model-00001-of-00002.safetensors', which is missing",
    "index outside": "a path outside",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_source(good, tmp_path, capsys, kind):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    corrupt(kind, src)
    before = snapshot(src)
    run_failing(capsys, ["convert", str(src), str(tmp_path / "out"), "-t", "gated-norm"], CASES[kind])
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    assert snapshot(src) == before


def test_destination_exists(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    run_failing(capsys, ["convert", str(good), str(out), "-t", "gated-norm"], "already exists; remove it or pass --force")
    assert list(out.iterdir()) == []


def test_destination_inside_source(good, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    before = snapshot(src)
    run_failing(capsys, ["convert", str(src), str(src / "sub"), "-t", "gated-norm"], "is inside the source")
    assert snapshot(src) == before


def test_bad_options(good, tmp_path, capsys):
    run_failing(capsys, ["convert", str(good), str(tmp_path / "o"), "-t", "gated-norm", "--rank", "0"],
                "gate rank 0 is out of range")
    run_failing(capsys, ["convert", str(good), str(tmp_path / "o"), "-t", "gated-norm", "--shard-size", "lots"],
                "is not a size")
    run_failing(capsys, ["convert", str(good), str(tmp_path / "o"), "-t", "gated-norm", "--targets", "bogus"],
                "llama has no 'bogus' norm")
    run_failing(capsys, ["inspect", str(tmp_path / "nowhere")], "is not a directory")
    assert list(tmp_path.iterdir()) == []
