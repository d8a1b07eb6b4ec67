"""Training a smoothed model in the source's coordinates (recipe `optimizer_coordinates: source`,
surgeon/train/coordinates.py).

Invariant: smooth stores w = m ⊙ u with m a power of two per channel, and its forward is bit-identical to the
source's, so AdamW stepping u must give, step for step, exactly m ⊙ (the weights of the same run on the unsmoothed
model): the same losses, and the trained weights equal up to the recorded factors. In the stored coordinates the
trajectory differs. Where the optimizer steps flattened copies (ZeRO ≥ 1) and where no factors were recorded, the
run is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_tiny, write_words

from surgeon.errors import SurgeonError

RECIPE = """\
seq_len: 32
batch_size: 4
steps: 4
lr: 3.0e-3
lr_new: 1.0e-2
weight_decay: 0.1
warmup_steps: 1
grad_clip: 0.0
heldout_every: 10
eval_windows: 4
eval_every: 4
save_every: 4
shuffle_windows: 64
quant_eval: []
objectives: {lm: 1.0}
"""

pytestmark = pytest.mark.usefixtures("restore_environment")


def test_rescaled_adamw_steps_the_unscaled_weights_exactly():
    from surgeon.train.coordinates import RescaledAdamW, ToSource

    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 8, generator=g)
    m = torch.exp2(torch.randint(-6, 7, (1, 8), generator=g).float())  # per input channel, as smooth records
    plain, rescaled = torch.nn.Parameter(u.clone()), torch.nn.Parameter(u * m)
    opt_u = torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.1)
    opt_w = RescaledAdamW([rescaled], maps={rescaled: ToSource(m)}, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(5, 8, generator=g)
        for p, opt, inputs in ((plain, opt_u, x), (rescaled, opt_w, x / m)):
            opt.zero_grad()
            (inputs @ p.T).pow(2).sum().backward()
            opt.step()
        assert torch.equal(rescaled.detach(), plain.detach() * m)
    assert not torch.equal(plain.detach(), u)


def test_rescaled_adamw_steps_the_unrotated_weights():
    """w = (u ⊙ m)·H (smooth, then hadamard): the steps on w are AdamW's steps on u, up to the rounding of H."""
    from surgeon.modeling import block_hadamard_reference as rotate
    from surgeon.train.coordinates import RescaledAdamW, ToSource

    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 16, generator=g)
    m = torch.exp2(torch.randint(-6, 7, (1, 16), generator=g).float())
    plain, stored = torch.nn.Parameter(u.clone()), torch.nn.Parameter(rotate(u * m, 8))
    opt_u = torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.1)
    opt_w = RescaledAdamW([stored], maps={stored: ToSource(m, 8)}, lr=1e-2, weight_decay=0.1)
    naive = torch.nn.Parameter(rotate(u * m, 8))
    opt_n = torch.optim.AdamW([naive], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(5, 16, generator=g)
        for p, opt, inputs in ((plain, opt_u, x), (stored, opt_w, rotate(x / m, 8)), (naive, opt_n, rotate(x / m, 8))):
            opt.zero_grad()
            (inputs @ p.T).pow(2).sum().backward()
            opt.step()
        expected = rotate(plain.detach() * m, 8)
        assert torch.allclose(stored.detach(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert not torch.allclose(naive.detach(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from surgeon.convert import convert
    from surgeon.transforms import GatedNorm, Hadamard, Smooth

    root = tmp_path_factory.mktemp("coordinates")
    make_tiny(root / "src", "llama")
    write_words(root / "text.txt", 400)
    convert(root / "src", root / "gated", [GatedNorm(rank=4)], show_progress=False)
    convert(root / "gated", root / "smoothed", [Smooth(data=root / "text.txt", tokens=512, seq_len=32)],
            show_progress=False)
    convert(root / "smoothed", root / "rotated", [Hadamard()], show_progress=False)  # the factors come along
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "recipe-source.yaml").write_text(RECIPE + "optimizer_coordinates: source\n")
    return root


def _trained(root: Path, model: str, recipe: str, name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    from surgeon.export import export
    from surgeon.io import Checkpoint
    from surgeon.train.loop import train

    run = root / name
    if not run.exists():  # one run per name in the module (tests share the unsmoothed one)
        train(root / model, root / "text.txt", run, recipe=root / recipe, show_progress=False)
        export(run, root / f"{name}-model", show_progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm"] for r in records if "lm" in r]
    ckpt = Checkpoint(root / f"{name}-model")
    return losses, {n: ckpt.get(n) for n in ckpt.tensors}


def test_source_coordinates_take_the_unsmoothed_runs_steps(models):
    from surgeon.io.smooth_factors import FACTORS_FILE, load_factors

    losses_u, unsmoothed = _trained(models, "gated", "recipe.yaml", "unsmoothed")
    losses, same = _trained(models, "gated", "recipe-source.yaml", "unsmoothed-source")  # never smoothed: the same
    assert losses == losses_u and all(torch.equal(same[n], t) for n, t in unsmoothed.items())
    losses_s, source = _trained(models, "smoothed", "recipe-source.yaml", "source")
    losses_w, stored = _trained(models, "smoothed", "recipe.yaml", "stored")
    factors = load_factors(models / "smoothed", {n: t.shape for n, t in unsmoothed.items()})
    assert len(factors) == 2 * 10  # per layer: 2 norms, their 2 gate_downs, q, k, v, gate, up (rows and columns), down
    assert losses_s == losses_u and len(losses_u) == 4
    for name, u in unsmoothed.items():
        assert torch.equal(source[name], u * factors.get(name, 1)), name
    assert any(not torch.equal(stored[n], source[n]) for n in factors)  # the stored coordinates train otherwise
    assert (models / "source-model" / FACTORS_FILE).is_file()  # export keeps the way back to the source
    assert losses_w[0] == losses_u[0]  # same model, same first batch


def test_source_coordinates_undo_smooth_and_hadamard(models):
    """Smoothed, then rotated: the run in the source's coordinates follows the unsmoothed, unrotated run (up to the
    rounding of H), and its weights are (that run's weights ⊙ m)·H."""
    from surgeon.modeling import block_hadamard_reference as rotate
    from surgeon.transforms.hadamard import rotated_blocks
    from surgeon.io.smooth_factors import FACTORS_FILE, load_factors

    assert (models / "rotated" / FACTORS_FILE).is_file()
    losses_u, unsmoothed = _trained(models, "gated", "recipe.yaml", "unsmoothed")
    losses_r, rotated = _trained(models, "rotated", "recipe-source.yaml", "rotated-source")
    assert torch.allclose(torch.tensor(losses_r), torch.tensor(losses_u), rtol=1e-4)
    factors = load_factors(models / "smoothed", {n: t.shape for n, t in unsmoothed.items()})
    blocks = rotated_blocks(json.loads((models / "rotated" / "config.json").read_text())["surgeon"], unsmoothed)
    assert len(blocks) == 2 * 7
    for name, u in unsmoothed.items():
        expected = u * factors.get(name, 1)
        if name in blocks:
            expected = rotate(expected, blocks[name])
        assert torch.allclose(rotated[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max()), name
    _, naive = _trained(models, "rotated", "recipe.yaml", "rotated-stored")
    assert any(not torch.allclose(naive[n], rotated[n], rtol=1e-3, atol=1e-4) for n in blocks)


def test_refused_without_factors_or_with_zero_above_0(models, tmp_path, capsys):
    import shutil

    from surgeon.cli import main
    from surgeon.transforms.smooth import FACTORS_FILE

    zero2 = Path(__file__).resolve().parent.parent / "configs" / "zero2.json"
    orphan = tmp_path / "orphan"  # smoothed, but without the record of how
    shutil.copytree(models / "smoothed", orphan)
    (orphan / FACTORS_FILE).unlink()
    for model, extra, expected in ((orphan, [], "has no smooth_factors.safetensors"),
                                   (models / "smoothed", ["--deepspeed", str(zero2)], "needs ZeRO stage 0")):
        out = tmp_path / "run"
        assert main(["train", str(model), "--data", str(models / "text.txt"), "--recipe",
                     str(models / "recipe-source.yaml"), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("surgeon: error: ") and "\n" not in err and expected in err, err
        assert not out.exists()


def test_recipe_checks_the_coordinates():
    from surgeon.train.recipe import make_recipe

    assert make_recipe({}).optimizer_coordinates == "stored"
    with pytest.raises(SurgeonError, match="optimizer_coordinates must be one of stored, source"):
        make_recipe({"optimizer_coordinates": "unsmoothed"})
