"""surgeon.train.objectives and surgeon.train.measure on tiny converted models.

Each objective changes what it should: the pressure term alone lowers max/RMS of the linear inputs where an outlier
is planted; distillation is 0, with a 0 gradient, for a converted model against its source; QAT's forward equals
`fake_quantized` and its gradients reach the fp weights (straight-through), with nothing left installed after the
step; the GLU α schedule; measure() finds a planted sink; bad config keys are one-line SurgeonErrors.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import input_ids, make_tiny
from transformers import AutoModelForCausalLM

import surgeon.modeling  # noqa: F401  (registers the converted classes)
from surgeon.convert import convert
from surgeon.errors import SurgeonError
from surgeon.modeling import AnnealedGLUActivation
from surgeon.quant import fake_quantized, quantized_linears
from surgeon.train.measure import measure
from surgeon.train.objectives import ObjectiveConfig, Objectives, glu_alpha, max_rms
from surgeon.transforms import GLU, GatedNorm, PreAffine

SINK = 7


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    src = make_tiny(root / "src", "llama")
    convert(src, root / "gated", [GatedNorm(rank=4), PreAffine()], show_progress=False)
    convert(src, root / "glu", [GLU()], show_progress=False)
    return {"src": src, "gated": root / "gated", "glu": root / "glu"}


def load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def ids(seed=1, batch=2, length=16):
    return input_ids(batch, length, seed)


def plant_norm_outlier(model, k=SINK, factor=20.0):
    """Dimension k of every decoder norm's λ × factor: every linear input then carries an outlier in k."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[k] *= factor


# ----------------------------------------------------------------------------- config


def test_unknown_key_is_one_line_error():
    with pytest.raises(SurgeonError) as err:
        ObjectiveConfig(**{"lm": 1.0, "presure": 0.1})
    message = str(err.value)
    assert "\n" not in message and "'presure'" in message
    assert "pressure" in message and "glu_alpha_steps" in message  # names the valid ones


@pytest.mark.parametrize("settings", [
    {"lm": -1.0}, {"distill": float("nan")}, {"distill_temperature": 0.0}, {"pressure": "a lot"},
    {"qat": "int8"}, {"pressure_on": ("logits",)}, {"glu_alpha_steps": [10, 5]}, {"glu_alpha_steps": [1]},
    {"lm": 0.0}, {"pressure": True}, {"qat": "int4", "qat_fraction": 0.0}, {"qat_fraction": 1.5},
    {"qat_fraction": "half"}, {"qat": []}, {"qat": ["int4", "int8"]}, {"new_learn_from": "fp32"},
    {"new_learn_from": "quantized"},
])
def test_bad_values_are_refused(settings):
    with pytest.raises(SurgeonError) as err:
        ObjectiveConfig(**settings)
    assert "\n" not in str(err.value)


def test_config_defaults_and_round_trip():
    cfg = ObjectiveConfig(pressure_on="residual", qat="none", glu_alpha_steps=[0, 10])
    assert cfg.lm == 1.0 and cfg.distill == 0.0 and cfg.qat is None
    assert cfg.pressure_on == ("residual",) and cfg.glu_alpha_steps == (0, 10)
    assert ObjectiveConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_distill_without_teacher_is_refused(paths):
    model = load(paths["gated"])
    objectives = Objectives(ObjectiveConfig(lm=0.0, distill=1.0), model, teacher=load(paths["src"]))
    assert objectives.needs_teacher
    with pytest.raises(SurgeonError, match="teacher"):
        Objectives(ObjectiveConfig(distill=1.0), model)


# ----------------------------------------------------------------------------- the soft max/RMS


@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0])
def test_max_rms_gradient(temperature):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    x[..., 3] += 4.0
    x.requires_grad_(True)
    # float32 forward inside, so compare against autograd of the same formula rather than gradcheck
    s = max_rms(x, temperature)
    (s * torch.arange(1.0, 6.0)).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    z = y.abs() / (y.pow(2).mean(-1, keepdim=True) + 1e-8).sqrt()
    ref = (torch.softmax(z / temperature, -1) * z).sum(-1) if temperature else z.amax(-1)
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)
    (ref * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
    hard = z.detach().amax(-1)
    assert (s.detach().double() <= hard + 1e-5).all()  # the soft max never exceeds the max


# ----------------------------------------------------------------------------- pressure


def test_pressure_lowers_max_rms_of_linear_inputs(paths):
    model = load(paths["gated"])
    plant_norm_outlier(model)
    batches = [ids(seed=s) for s in (11, 12)]
    before = measure(model, batches)
    assert before["linear_input_max_rms"] > 4.0  # the planted outlier (max possible is sqrt(48) ≈ 6.9)
    objectives = Objectives(ObjectiveConfig(lm=0.0, pressure=1.0, pressure_threshold=2.0), model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    pressures = []
    for step in range(8):
        with objectives.step_context(step, 8):
            loss, terms = objectives.loss(batches[0], model(input_ids=batches[0]))
            assert set(terms) == {"lm", "pressure", "pressure_ratio", "total"}
            assert terms["total"] == pytest.approx(terms["pressure"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        pressures.append(terms["pressure"])
    after = measure(model, batches)
    assert pressures[-1] < 0.5 * pressures[0], pressures
    assert after["linear_input_max_rms"] < before["linear_input_max_rms"] - 1.0, (before, after)
    assert all(not layer._forward_pre_hooks for _, layer in quantized_linears(model))


def test_residual_pressure_reaches_the_residual_stream(paths):
    model = load(paths["gated"])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, SINK] = 1.0  # a residual sink, carried by every layer's output
    objectives = Objectives(ObjectiveConfig(lm=0.0, pressure=1.0, pressure_threshold=2.0,
                                            pressure_on=("residual",)), model)
    with objectives.step_context(0, 1):
        loss, terms = objectives.loss(ids(), model(input_ids=ids()))
        loss.backward()
    assert terms["pressure"] > 0
    assert model.model.embed_tokens.weight.grad[:, SINK].abs().sum() > 0
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_loss_terms_weighting(paths):
    model, teacher = load(paths["gated"]), load(paths["src"])
    cfg = ObjectiveConfig(lm=1.0, distill=0.5, pressure=0.25, pressure_threshold=1.0,
                          pressure_on=("linear_inputs", "residual"))
    objectives = Objectives(cfg, model, teacher=teacher)
    with objectives.step_context(0, 1):
        loss, terms = objectives.loss(ids(), model(input_ids=ids()))
    expected = terms["lm"] + 0.5 * terms["distill"] + 0.25 * terms["pressure"]
    assert terms["total"] == pytest.approx(expected, rel=1e-5) and loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["pressure"] > 0


# ----------------------------------------------------------------------------- distillation


def test_distill_is_zero_with_zero_gradient_at_step_0(paths):
    model, teacher = load(paths["gated"]), load(paths["src"])
    objectives = Objectives(ObjectiveConfig(lm=0.0, distill=1.0, distill_temperature=2.0), model, teacher=teacher)
    batch = ids(length=24)
    with objectives.step_context(0, 10):
        loss, terms = objectives.loss(batch, model(input_ids=batch))
        loss.backward()
    assert abs(terms["distill"]) < 1e-6
    grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-5, max(grads)
    assert all(p.grad is None for p in teacher.parameters())

    # and it is not identically 0: a perturbed student is pulled back
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))
    model.zero_grad()
    with objectives.step_context(1, 10):
        loss, terms = objectives.loss(batch, model(input_ids=batch))
        loss.backward()
    assert terms["distill"] > 1e-3 and model.lm_head.weight.grad.abs().max() > 1e-4


# ----------------------------------------------------------------------------- QAT


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_qat_forward_equals_fake_quantized_and_gradients_reach_fp_weights(paths, fmt):
    model = load(paths["gated"]).eval()
    batch = ids()
    with torch.no_grad():
        fp = model(input_ids=batch).logits
        with fake_quantized(model, fmt):
            reference = model(input_ids=batch).logits
    weights = {name: layer.weight.detach().clone() for name, layer in quantized_linears(model)}
    objectives = Objectives(ObjectiveConfig(qat=fmt), model)
    with objectives.step_context(0, 1):
        outputs = model(input_ids=batch)
        loss, _ = objectives.loss(batch, outputs)
        loss.backward()
    torch.testing.assert_close(outputs.logits, reference, rtol=0, atol=0)
    assert not torch.allclose(outputs.logits, fp)
    for name, layer in quantized_linears(model):
        assert torch.equal(layer.weight.detach(), weights[name])  # the fp weights, untouched ...
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name  # ... get gradients
        assert "forward" not in layer.__dict__ and not layer._forward_pre_hooks  # nothing left installed
    assert model.model.layers[0].input_layernorm.gate_up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits, fp, rtol=0, atol=0)


@pytest.mark.parametrize("fraction, grad_accum, expected", [
    (1.0, 1, [True] * 4), (0.5, 2, [False, True] * 2), (0.25, 1, [False, False, False, True])])
def test_qat_fraction_quantizes_that_share_of_micro_batches(paths, fraction, grad_accum, expected):
    model = load(paths["gated"]).eval()
    batch = ids()
    with torch.no_grad():
        fp = model(input_ids=batch).logits
        with fake_quantized(model, "int4"):
            quantized = model(input_ids=batch).logits
    objectives = Objectives(ObjectiveConfig(qat="int4", qat_fraction=fraction), model)
    seen = []
    for step in range(len(expected) // grad_accum):
        for micro in range(grad_accum):
            with torch.no_grad(), objectives.step_context(step, 8, micro=micro, micro_per_step=grad_accum):
                logits = model(input_ids=batch).logits
            assert torch.equal(logits, quantized) or torch.equal(logits, fp)
            seen.append(torch.equal(logits, quantized))
    assert seen == expected


def test_qat_formats_take_turns_over_the_quantized_micro_batches(paths):
    model = load(paths["gated"]).eval()
    batch = ids()
    with torch.no_grad():
        expected = {}
        for fmt in ("int4", "nvfp4"):
            with fake_quantized(model, fmt):
                expected[fmt] = model(input_ids=batch).logits
    cfg = ObjectiveConfig(qat=["int4", "nvfp4"], qat_fraction=0.5)
    assert cfg.qat_formats == ("int4", "nvfp4") and ObjectiveConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    objectives = Objectives(cfg, model)
    assert [objectives.qat_format(g) for g in range(8)] == [None, "int4", None, "nvfp4"] * 2
    for micro, fmt in ((1, "int4"), (3, "nvfp4")):
        with torch.no_grad(), objectives.step_context(0, 8, micro=micro, micro_per_step=4):
            assert torch.equal(model(input_ids=batch).logits, expected[fmt])


def test_new_parameters_can_learn_from_the_quantized_micro_batches_only(paths):
    """new_learn_from: quantized — a full-precision micro-batch gives the gates and λ1 no gradient (the pretrained
    weights get theirs), a quantized one gives both; nothing stays hooked after the context."""
    model = load(paths["gated"]).train()
    with torch.no_grad():  # gates off their identity init, so every new parameter has a gradient
        for name, p in model.named_parameters():
            if "gate_up" in name:
                p.normal_(0, 0.1)
    batch = ids(batch=2, length=16)
    objectives = Objectives(ObjectiveConfig(qat="int4", qat_fraction=0.5, new_learn_from="quantized"), model)
    new = {n for n, p in model.named_parameters() if any(k in n for k in ("gate_down", "gate_up", "pre_affine"))}
    assert new and {id(p) for n, p in model.named_parameters() if n in new} == set(map(id, objectives.new_parameters))

    def grads(micro):
        model.zero_grad()
        with objectives.step_context(0, 8, micro=micro, micro_per_step=2):
            loss, _ = objectives.loss(batch, model(input_ids=batch))
            loss.backward()
        return {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.grad is not None}

    full, quantized = grads(0), grads(1)
    assert all(full[n] == 0 for n in new) and full["model.embed_tokens.weight"] > 0
    assert all(quantized[n] > 0 for n in new) and quantized["model.embed_tokens.weight"] > 0
    plain = Objectives(ObjectiveConfig(qat="int4", qat_fraction=0.5), model)
    model.zero_grad()
    with plain.step_context(0, 8, micro=0, micro_per_step=2):  # the hooks were removed: "all" sees them again
        plain.loss(batch, model(input_ids=batch))[0].backward()
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n in new)


def kl_quantized_to_fp(model, batch) -> float:
    with torch.no_grad():
        fp = model(input_ids=batch).logits
        with fake_quantized(model, "int4"):
            q = model(input_ids=batch).logits
    q, fp = q.flatten(0, 1), fp.flatten(0, 1)  # mean over positions
    return float(torch.nn.functional.kl_div(q.log_softmax(-1), fp.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


def test_qat_distill_pulls_the_quantized_forward_to_the_full_precision_one(paths):
    """qat_distill = KL(own fp ‖ quantized) on quantized micro-batches only, and training on it alone (qat_lm 0)
    shrinks that gap; full-precision micro-batches keep the plain LM loss."""
    model = load(paths["gated"]).train()
    batch = ids(batch=4, length=32)
    before = kl_quantized_to_fp(model, batch)
    objectives = Objectives(ObjectiveConfig(qat="int4", qat_fraction=0.5, qat_lm=0.0, qat_distill=1.0), model)
    with torch.no_grad(), objectives.step_context(0, 8, micro=0, micro_per_step=2):  # full precision
        _, terms = objectives.loss(batch, model(input_ids=batch))
    assert "qat_distill" not in terms and terms["total"] == terms["lm"]
    with torch.no_grad(), objectives.step_context(0, 8, micro=1, micro_per_step=2):  # quantized
        _, terms = objectives.loss(batch, model(input_ids=batch))
    assert terms["total"] == pytest.approx(terms["qat_distill"]) and terms["qat_distill"] == pytest.approx(before,
                                                                                                          rel=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(8):
        with objectives.step_context(step, 8, micro=1, micro_per_step=2):
            loss, _ = objectives.loss(batch, model(input_ids=batch))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all("forward" not in layer.__dict__ for _, layer in quantized_linears(model))
    assert kl_quantized_to_fp(model.eval(), batch) < 0.5 * before


@pytest.mark.parametrize("settings", [{"qat_distill": 1.0}, {"qat_lm": 0.5}, {"qat": "int4", "qat_distill": -1}])
def test_qat_loss_settings_need_qat(settings):
    with pytest.raises(SurgeonError, match="qat"):
        ObjectiveConfig(**settings)


def test_qat_gradient_is_straight_through():
    """For one linear layer: dL/dW = gᵀ·q(x) and dL/dx = g·q(W) (the gradient at the quantized point)."""
    from surgeon.quant import quantize_activation, quantize_weight
    from surgeon.train.objectives import _qat_forward

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 8)
    x = torch.randn(5, 64, requires_grad=True)
    layer.forward = _qat_forward(layer, "int4")
    g = torch.randn(5, 8)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, g.T @ quantize_activation(x.detach(), "int4"))
    torch.testing.assert_close(x.grad, g @ quantize_weight(layer.weight.detach(), "int4"))


def enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@pytest.mark.parametrize("settings", [{"qat": "int4"}, {"pressure": 1.0, "pressure_threshold": 1.5}])
def test_checkpointing_needs_backward_inside(paths, settings):
    model = load(paths["gated"]).train()
    enable_checkpointing(model)
    objectives = Objectives(ObjectiveConfig(**settings), model)
    with pytest.raises(SurgeonError, match="inside step_context"):
        with objectives.step_context(0, 1):
            loss, _ = objectives.loss(ids(), model(input_ids=ids()))
    with objectives.step_context(1, 1):
        loss, _ = objectives.loss(ids(), model(input_ids=ids()))
        loss.backward()
    assert all("forward" not in layer.__dict__ for _, layer in quantized_linears(model))


# ----------------------------------------------------------------------------- GLU α


def test_glu_alpha_schedule(paths):
    model = load(paths["glu"])
    objectives = Objectives(ObjectiveConfig(glu_alpha_steps=[10, 30]), model)
    acts = [m for m in model.modules() if isinstance(m, AnnealedGLUActivation)]
    assert acts
    for step, alpha in [(0, 0.0), (10, 0.0), (20, 0.5), (25, 0.75), (30, 1.0), (99, 1.0)]:
        with objectives.step_context(step, 100):
            assert all(a.alpha.item() == pytest.approx(alpha) for a in acts), step
            assert model.config.surgeon["glu"]["alpha"] == pytest.approx(alpha)
    assert glu_alpha(5, (5, 5)) == 1.0 and glu_alpha(4, (5, 5)) == 0.0
    with pytest.raises(SurgeonError, match="no annealed GLU"):
        Objectives(ObjectiveConfig(glu_alpha_steps=[0, 1]), load(paths["gated"]))


# ----------------------------------------------------------------------------- measure


def test_measure_finds_a_planted_sink(paths):
    model = load(paths["gated"])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, SINK] = 40.0
    batches = [ids(seed=s) for s in (3, 4)]
    model.train()
    metrics = measure(model, batches)
    assert model.training  # mode restored
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["top_dims"][0] == SINK and len(metrics["top_dims"]) == 4
    assert metrics["sink_abs"][str(SINK)] > 20.0
    assert metrics["sink_first_token_abs"][str(SINK)] > 20.0
    assert len(metrics["residual_max"]) == len(model.model.layers) + 1
    assert metrics["residual_max"][0] == pytest.approx(40.0)
    assert metrics["residual_peak"] == max(metrics["residual_max"]) >= 40.0
    assert metrics["linear_input_max_rms"] <= metrics["linear_input_max_rms_worst"] <= 48 ** 0.5 + 1e-3
    assert metrics["tokens"] == 2 * 2 * 15 and metrics["ppl"] == pytest.approx(2.718281828 ** metrics["loss"])

    chosen = measure(model, batches, sink_dims=[SINK, 0])
    assert set(chosen["sink_abs"]) == {str(SINK), "0"}
    assert chosen["sink_abs"][str(SINK)] == pytest.approx(metrics["sink_abs"][str(SINK)])
    assert all(not layer._forward_pre_hooks for _, layer in quantized_linears(model))


def test_measure_loss_matches_the_model(paths):
    model = load(paths["src"]).eval()
    batch = ids()
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert measure(model, [batch])["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_checkpointing_gives_the_same_gradients(paths):
    """Layers recomputed in the backward (non-reentrant, transformers' default) run with the QAT forward and add no
    pressure statistics: gradients equal those of the plain run."""
    cfg = ObjectiveConfig(lm=1.0, pressure=0.5, pressure_threshold=1.5, pressure_on=("linear_inputs", "residual"),
                          qat="int4")
    grads = []
    for checkpointing in (False, True):
        model = load(paths["gated"]).train()
        if checkpointing:
            enable_checkpointing(model)
        objectives = Objectives(cfg, model)
        with objectives.step_context(0, 1):
            loss, terms = objectives.loss(ids(), model(input_ids=ids()))
            loss.backward()
        assert terms["pressure"] > 0
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_share_a_context(paths):
    """Each forward starts its own pressure statistics: forward, loss, forward, loss in one context gives what
    two contexts give."""
    model = load(paths["gated"])
    cfg = ObjectiveConfig(lm=0.0, pressure=1.0, pressure_threshold=1.5, pressure_on=("linear_inputs", "residual"))
    objectives = Objectives(cfg, model)
    a, b = ids(seed=5), ids(seed=6, length=9)
    with objectives.step_context(0, 1):
        together = [objectives.loss(x, model(input_ids=x))[1]["pressure"] for x in (a, b)]
    apart = []
    for x in (a, b):
        with objectives.step_context(0, 1):
            apart.append(objectives.loss(x, model(input_ids=x))[1]["pressure"])
    assert together == pytest.approx(apart) and together[0] != pytest.approx(together[1])
    with pytest.raises(SurgeonError, match="saw no activation"):  # a second loss() without a new forward
        with objectives.step_context(0, 1):
            outputs = model(input_ids=a)
            objectives.loss(a, outputs)
            objectives.loss(a, outputs)
