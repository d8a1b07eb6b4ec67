"""The hadamard pass (transforms/hadamard.py): the dense linears read x·H and store W·H.

Invariant: logits equal the source's within fp32 rounding on every dense family, alone and after the other passes;
every rotated weight is the source weight times the block-diagonal Sylvester matrix (built here independently, from
its formula); a rotated linear's input is the source's input times H, rotated once per group; a planted spike is
spread; refusals (twice, smooth after it, MoE)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import FAMILIES, HIDE_SURGEON, input_ids, logits, make_tiny, write_words
from transformers import AutoModelForCausalLM

from surgeon.cli import main
from surgeon.convert import convert
from surgeon.errors import SurgeonError
from surgeon.io import Checkpoint
from surgeon.modeling import modeling_surgeon
from surgeon.quant import quantize_activation
from surgeon.transforms import AbsorbSinks, GatedNorm, Hadamard, PreAffine, Smooth

# tiny models: hidden 48 (blocks of 16: q/k/v, o, gate/up read 48 features), intermediate 96 (blocks of 32: down)
BLOCKS = {"attention_in": 16, "attention_out": 16, "mlp_in": 16, "mlp_out": 32}
ROTATED = {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 16, "gate_proj": 16, "up_proj": 16, "down_proj": 32}


def sylvester_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `rows` of H_n: H[i, j] = (−1)^popcount(i & j) / √n, the Sylvester matrix written out, not built
    recursively."""
    bits = torch.bitwise_and(rows[:, None], torch.arange(n)[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double() / math.sqrt(n)


def sylvester_formula(n: int) -> torch.Tensor:
    return sylvester_rows(torch.arange(n), n)


def block_diagonal(d: int, block: int) -> torch.Tensor:
    return torch.block_diag(*[sylvester_formula(block)] * (d // block))


def tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.tensors}


def assert_close_logits(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    assert (a - b).abs().max() <= rel * a.abs().max(), (a - b).abs().max()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hadamard-sources")
    return {f: make_tiny(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_words(tmp_path_factory.mktemp("text") / "words.txt", 200)


def test_sylvester_matches_the_formula():
    for n in (1, 2, 16, 64, 128, 1024):
        assert torch.allclose(modeling_surgeon._sylvester(n), sylvester_formula(n), rtol=0, atol=1e-15)
    x = torch.randn(3, 5, 1536, dtype=torch.float64)
    for block in (16, 64, 512):  # one matmul, and the Kronecker path above 64
        y = modeling_surgeon.block_hadamard_reference(x, block)
        assert torch.allclose(y, x @ block_diagonal(1536, block), rtol=0, atol=1e-12)
        assert torch.allclose(modeling_surgeon.block_hadamard_reference(y, block), x, rtol=0, atol=1e-12)  # H⁻¹ = H
    for n in (4096, 16384):  # the largest two-matmul block, and the recursion above it: rows j of H, by formula
        j = torch.tensor([0, 1, 5, n // 3, n - 1])
        basis = torch.zeros(len(j), n, dtype=torch.float64)
        basis[torch.arange(len(j)), j] = 1.0
        rows = modeling_surgeon.block_hadamard_reference(basis, n)
        assert torch.allclose(rows, sylvester_rows(j, n), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not tile"):
        modeling_surgeon.block_hadamard_reference(x, 1024)


@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserved_and_weights_rotated(sources, tmp_path, family):
    src, out = sources[family], tmp_path / "out"
    convert(src, out, [Hadamard()], verify=True, show_progress=False)
    assert_close_logits(logits(src), logits(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"surgeon_{family}" and "auto_map" in config  # the model computes x·H
    groups = config["surgeon"]["hadamard"]["groups"]
    assert {g: v["block"] for g, v in groups.items()} == BLOCKS
    before, after = tensors(src), tensors(out)
    rotated = 0
    for name, t in before.items():
        kind = name.split(".")[-2]
        if kind in ROTATED and name.endswith(".weight"):
            expected = (t.double() @ block_diagonal(t.shape[1], ROTATED[kind])).float()
            assert torch.allclose(after[name], expected, rtol=1e-6, atol=1e-7), name
            rotated += 1
        else:
            assert torch.equal(after[name], t), name  # norms, embeddings, biases, LM head untouched
    assert rotated == 2 * 7


def captured_inputs(path, modules: list[str]) -> dict[str, torch.Tensor]:
    """What each module multiplies: its input as a (later registered) forward pre-hook sees it, as a quantizer's."""
    import surgeon.modeling  # noqa: F401  (registers the surgeon_* families)

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = {}
    for name in modules:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, a[0]))
    with torch.no_grad():
        model(input_ids=input_ids())
    return seen


def test_a_rotated_linear_reads_x_times_h_rotated_once_per_group(sources, tmp_path, monkeypatch):
    src, out = sources["llama"], tmp_path / "out"
    convert(src, out, [Hadamard()], show_progress=False)
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    plain, rotated = captured_inputs(src, modules), captured_inputs(out, modules)
    for name in modules:
        block = ROTATED[name.split(".")[-1]]
        x = plain[name].double()
        assert torch.allclose(rotated[name].double(), x @ block_diagonal(x.shape[-1], block), atol=1e-5), name

    import surgeon.modeling  # noqa: F401  (registers the surgeon_* families)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    calls = []
    original = modeling_surgeon.block_hadamard_reference
    monkeypatch.setattr(modeling_surgeon, "block_hadamard_reference", lambda x, b: calls.append(b) or original(x, b))
    with torch.no_grad():
        model(input_ids=input_ids())
        model(input_ids=input_ids())
    assert sorted(calls) == sorted([16, 16, 16, 32] * 2 * 2)  # q/k/v once, o, gate/up once, down: 2 layers, 2 runs


def test_spike_is_spread_over_its_block():
    """Tokens whose down_proj input spikes to 40× its RMS in one channel: INT4's one scale per token rounds the
    rest of each token to 0 or ±40/7; rotated, the spike is ÷√512 and the token's other values keep their digits."""
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 40.0
    plain = (quantize_activation(x, "int4") - x).norm() / x.norm()
    y = modeling_surgeon.block_hadamard_reference(x, 512)
    rotated = (modeling_surgeon.block_hadamard_reference(quantize_activation(y, "int4"), 512) - x).norm() / x.norm()
    assert rotated < plain / 3, (rotated, plain)


def test_after_the_other_passes_with_verify(sources, corpus, tmp_path):
    out = tmp_path / "out"
    passes = [GatedNorm(rank=4), PreAffine(), AbsorbSinks(sinks="7", scale="4"),
              Smooth(data=corpus, tokens=512, seq_len=32), Hadamard()]
    report = convert(sources["qwen2"], out, passes, verify=True, show_progress=False)
    assert report.verify["ok"] and report.verify["max_rel_diff"] < 1e-5
    assert_close_logits(logits(sources["qwen2"]), logits(out))
    block = json.loads((out / "config.json").read_text())["surgeon"]
    assert block["transforms"] == ["gated-norm", "pre-affine", "absorb-sinks", "smooth", "hadamard"]
    assert (out / "smooth_factors.safetensors").is_file()  # as smooth wrote it: the source coordinates undo both


def test_groups_subset_and_cli(sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(sources["mistral"]), str(out), "-t", "hadamard", "--hadamard-groups", "mlp_out",
                 "--verify"]) == 0
    block = json.loads((out / "config.json").read_text())["surgeon"]["hadamard"]
    assert list(block["groups"]) == ["mlp_out"] and block["targets"] == ["model.layers.*.mlp.down_proj"]
    before, after = tensors(sources["mistral"]), tensors(out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "hadamard" in capsys.readouterr().out


def test_refusals(sources, corpus, tmp_path):
    out = tmp_path / "rotated"
    convert(sources["llama"], out, [Hadamard()], show_progress=False)
    with pytest.raises(SurgeonError, match="already has hadamard"):
        convert(out, tmp_path / "twice", [Hadamard()], show_progress=False)
    with pytest.raises(SurgeonError, match="smooth must come before hadamard"):
        convert(out, tmp_path / "smoothed", [Smooth(data=corpus, tokens=256, seq_len=32)], show_progress=False)
    with pytest.raises(SurgeonError, match="unknown hadamard group 'mlp'"):
        Hadamard(groups="mlp")
    moe = make_tiny(tmp_path / "mixtral", "mixtral")
    with pytest.raises(SurgeonError, match="hadamard does not support mixtral"):
        convert(moe, tmp_path / "moe", [Hadamard()], show_progress=False)
    assert not (tmp_path / "twice").exists() and not (tmp_path / "moe").exists()


LOAD_WITHOUT_SURGEON = HIDE_SURGEON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor({ids})).logits, sys.argv[2])
    assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
""")


def test_loads_with_only_torch_and_transformers(sources, tmp_path):
    out = tmp_path / "out"
    convert(sources["qwen3"], out, [GatedNorm(rank=4), Hadamard()], show_progress=False)
    ids = input_ids()
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SURGEON.format(ids=ids.tolist()), str(out),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_logits(logits(sources["qwen3"], ids), torch.load(tmp_path / "logits.pt", weights_only=True))


def test_earlier_smooth_factors_come_along_only_when_hadamard_is_first(sources, corpus, tmp_path):
    from safetensors.torch import load_file

    from surgeon.transforms.smooth import FACTORS_FILE

    smoothed = tmp_path / "smoothed"
    convert(sources["llama"], smoothed, [Smooth(data=corpus, tokens=256, seq_len=32)], show_progress=False)
    convert(smoothed, tmp_path / "rotated", [Hadamard()], show_progress=False)
    carried, original = load_file(tmp_path / "rotated" / FACTORS_FILE), load_file(smoothed / FACTORS_FILE)
    assert carried.keys() == original.keys() and all(torch.equal(carried[k], original[k]) for k in original)
    convert(smoothed, tmp_path / "gated", [GatedNorm(rank=4), Hadamard()], show_progress=False)  # λ rewritten first
    assert not (tmp_path / "gated" / FACTORS_FILE).exists()


def test_max_block_caps_every_rotation_and_keeps_the_function(sources, tmp_path, capsys):
    """--hadamard-max-block 16: NVFP4's block size; every group rotates in blocks of 16, weights as the formula."""
    out = tmp_path / "out"
    assert main(["convert", str(sources["llama"]), str(out), "-t", "hadamard", "--hadamard-max-block", "16",
                 "--verify"]) == 0
    assert_close_logits(logits(sources["llama"]), logits(out))
    groups = json.loads((out / "config.json").read_text())["surgeon"]["hadamard"]["groups"]
    assert {g: v["block"] for g, v in groups.items()} == {g: min(b, 16) for g, b in BLOCKS.items()}
    before, after = tensors(sources["llama"]), tensors(out)
    w = before["model.layers.0.mlp.down_proj.weight"]
    expected = (w.double() @ block_diagonal(w.shape[1], 16)).float()
    assert torch.allclose(after["model.layers.0.mlp.down_proj.weight"], expected, rtol=1e-6, atol=1e-7)
    for bad in (12, 1):
        with pytest.raises(SurgeonError, match=f"--hadamard-max-block {bad} is not a power of two"):
            Hadamard(max_block=bad)
