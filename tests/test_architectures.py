"""The architecture data agrees with the real transformers modules and with the modeling file."""

from __future__ import annotations

import pytest
from tiny import tiny_config
from transformers import AutoModelForCausalLM

from surgeon.architectures import for_config, registry, supported
from surgeon.errors import SurgeonError
from surgeon.modeling import BASE_MODEL_TYPES


def test_every_family_has_model_classes():
    assert sorted(BASE_MODEL_TYPES) == supported()


@pytest.mark.parametrize("family", supported())
def test_patterns_name_real_modules(family):
    config = tiny_config(family)
    arch = for_config(config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    for role, pattern in arch.norms.items():
        for name in arch.expand(pattern, config.to_dict()):
            assert name in modules, f"{family}: norm {role} → {name} is not a module"
            assert modules[name].weight.dim() == 1
    for role in arch.residual_readers:
        assert role in arch.norms
    for pattern in arch.residual_writers:
        for name in arch.expand(pattern, config.to_dict()):
            assert name in modules or f"{name}.weight" in params or name in params, f"{family}: writer {name}"
    assert arch.embedding in params


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(SurgeonError, match="unsupported model family 'gpt2'; supported: " + ", ".join(supported())):
        for_config({"model_type": "gpt2"})
    assert set(registry()) == set(supported())
