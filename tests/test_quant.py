"""Fake quantizers against hand-computed cases; evaluation against a plain perplexity computation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import input_ids, make_tiny

from surgeon.evaluate import evaluate_model, perplexity
from surgeon.quant import fake_quantized, int4, nvfp4, quantized_linears, round_e2m1, round_e4m3


def test_e2m1_grid_and_ties_to_even():
    x = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -5.0, -100.0])
    want = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0, -6.0])
    assert torch.equal(round_e2m1(x), want)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(round_e2m1(grid), grid) and torch.equal(round_e2m1(-grid), -grid)


def test_e4m3_scales():
    # E4M3 has 3 mantissa bits: between 1 and 2 the step is 1/8; 1.0625 is a tie and goes to even (1.0)
    assert round_e4m3(torch.tensor([1.0, 1.0625, 1.1, 1.2, 500.0])).tolist() == [1.0, 1.0, 1.125, 1.25, 448.0]


def test_nvfp4_block_by_hand():
    # one block 1..16: s_t = 16 / (6·448); block scale 16/6/s_t = 448 (exact in E4M3) → step scale = 16/6
    x = torch.arange(1.0, 17.0).reshape(1, 16)
    scale = 16 / 6
    want = round_e2m1(x / scale) * scale
    assert torch.allclose(nvfp4(x, per_row=True), want)
    assert nvfp4(x, per_row=True)[0, -1].item() == pytest.approx(16.0)
    assert nvfp4(x, per_row=True)[0, 0].item() == pytest.approx(0.5 * scale)  # 0.375 → 0.5 on the grid


def test_nvfp4_block_scales_are_e4m3_and_blocks_independent():
    # block 2 is 100× smaller: its own scale keeps its values (an INT4 row scale would zero them)
    x = torch.cat([torch.full((16,), 6.0), torch.tensor([0.06, 0.03] * 8)]).reshape(1, 32)
    q = nvfp4(x, per_row=True)
    assert torch.equal(q[0, :16], x[0, :16])
    s_t = 6.0 / (6 * 448)
    s_b = round_e4m3(torch.tensor(0.06 / 6 / s_t)).item()
    want = round_e2m1(x[0, 16:] / (s_b * s_t)) * s_b * s_t
    assert torch.allclose(q[0, 16:], want)
    assert (q[0, 16:] != 0).all()
    assert (int4(x, group=None)[0, 16:] == 0).all()


def test_per_token_vs_per_tensor_scale():
    x = torch.tensor([[1000.0] * 16, [1.0, 2.0] * 8])
    per_token = nvfp4(x, per_row=True)
    assert torch.allclose(per_token[1], x[1], rtol=0.2)  # its own tensor scale keeps row 2 precise
    assert torch.equal(nvfp4(x[1:], per_row=False), per_token[1:])


def test_ragged_last_block_and_zeros():
    x = torch.randn(3, 37)
    x[1] = 0.0  # an all-zero row / block stays exactly zero (no 0/0)
    for q in (nvfp4(x, per_row=True), nvfp4(x, per_row=False), int4(x, group=32), int4(x, group=None)):
        assert q.shape == (3, 37) and torch.isfinite(q).all() and not q[1].any()


def test_int4_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 7.0, 14.0, -14.0]])
    assert int4(x, group=None).tolist() == [[0.0, 2.0, 4.0, 8.0, 14.0, -14.0]]  # s = 2; 0.5 rounds to even
    g = int4(torch.tensor([[7.0] * 32 + [0.7] * 32]), group=32)
    assert torch.allclose(g, torch.tensor([[7.0] * 32 + [0.7] * 32]))  # each group its own scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path_factory.mktemp("q") / "m", "qwen2")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_unquantized_eval_is_plain_perplexity(tiny):
    windows = [input_ids(2, 16, seed=s) for s in range(3)]
    losses = [tiny(input_ids=w, labels=w).loss.item() for w in windows]
    assert perplexity(tiny, windows)[0] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    result = evaluate_model(tiny, windows, ("none",))
    assert result.perplexity["none"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.tokens == 3 * 2 * 15


def test_fake_quantization_is_applied_and_undone(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    windows = [input_ids(2, 16)]
    names = [n for n, _ in quantized_linears(tiny)]
    assert "lm_head" not in names and len(names) == 2 * 7
    with fake_quantized(tiny, "int4") as n:
        assert n == 14
        w = tiny.model.layers[0].mlp.down_proj.weight
        assert len(torch.unique(w[0, :32])) <= 15  # on a 4-bit grid
        quantized = perplexity(tiny, windows)[0]
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert quantized != perplexity(tiny, windows)[0]
    result = evaluate_model(tiny, windows, ("nvfp4", "int4"))
    assert set(result.perplexity) == {"none", "nvfp4", "int4"} and result.ratio("none") == 1.0


def test_smoothquant_shares_scales_among_readers_of_one_tensor_and_keeps_the_function(tiny, monkeypatch):
    from surgeon import quant

    windows = [input_ids(2, 16, seed=s) for s in range(2)]
    scales = quant.smoothquant_scales(tiny, windows)
    assert set(scales) == {n for n, _ in quantized_linears(tiny)}
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v = (scales[p + f"self_attn.{x}_proj"] for x in "qkv")
        assert q is k is v  # one input tensor, one s (folded into the norm in front)
        assert scales[p + "mlp.gate_proj"] is scales[p + "mlp.up_proj"]
        assert scales[p + "self_attn.o_proj"] is not q and scales[p + "mlp.down_proj"] is not q
    # s_j = max|X_j|^½ / max|W_:,j|^½, by hand for one layer
    amax = []
    hook = tiny.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: amax.append(a[0].abs().reshape(-1, a[0].shape[-1]).amax(0)))
    with torch.no_grad():
        for w in windows:
            tiny(input_ids=w)
    hook.remove()
    a = torch.stack(amax).amax(0)
    w = tiny.model.layers[0].mlp.down_proj.weight.abs().amax(0)
    torch.testing.assert_close(scales["model.layers.0.mlp.down_proj"], (a.sqrt() / w.sqrt()).clamp(min=1e-5))
    # with rounding switched off, x/s · (W·s)ᵀ is the unquantized layer: same logits
    monkeypatch.setitem(quant._QUANTIZERS, "int4", (lambda t: t, lambda t: t))
    with torch.no_grad():
        plain = tiny(input_ids=windows[0]).logits
        with fake_quantized(tiny, "int4", smooth=scales):
            smoothed = tiny(input_ids=windows[0]).logits
    torch.testing.assert_close(smoothed, plain, rtol=1e-5, atol=1e-5)


def test_smoothquant_tames_an_outlier_channel():
    from surgeon.quant import smoothquant_scales

    class OneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(64, 64)
            self.proj = torch.nn.Linear(64, 32, bias=False)
            with torch.no_grad():
                self.embed.weight[:, 5] *= 100  # one activation channel 100× the rest

        def forward(self, input_ids):
            return self.proj(self.embed(input_ids))

    model = OneLinear()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    exact = model(input_ids=ids).detach()
    scales = smoothquant_scales(model, [ids])
    errors = {}
    for label, smooth in (("plain", None), ("smoothquant", scales)):
        with torch.no_grad(), fake_quantized(model, "int4", skip=(), smooth=smooth):
            errors[label] = (model(input_ids=ids) - exact).pow(2).mean().item()
    assert errors["smoothquant"] < errors["plain"] / 4


def test_eval_cli_smoothquant_adds_columns(tmp_path, capsys):
    from surgeon.cli import main

    model = make_tiny(tmp_path / "m", "llama")
    (tmp_path / "t.txt").write_text("to be or not to be that is the question " * 200)
    out = tmp_path / "r.json"
    assert main(["eval", str(model), "--data", str(tmp_path / "t.txt"), "--quant", "int4", "--seq-len", "16",
                 "--windows", "2", "--skip-tokens", "40", "--smoothquant", "--json", str(out)]) == 0
    import json

    ppl = json.loads(out.read_text())[0]["perplexity"]
    assert set(ppl) == {"none", "int4", "int4+sq"} and ppl["int4+sq"] != ppl["int4"]
    assert "SmoothQuant" in capsys.readouterr().out
