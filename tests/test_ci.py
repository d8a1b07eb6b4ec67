"""CI runs what it claims: .ci/run runs the README's test command, that command installs the embedded defaults
before pytest, and under CI's SURGEON_REQUIRE_DEFAULTS a missing default fails the real-model tests instead of
skipping them (a skip in CI is reserved for a GPU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from real_defaults import REQUIRE_ENV, require_defaults

from surgeon import sources
from surgeon.errors import SurgeonError

ROOT = Path(__file__).resolve().parent.parent


def _ci_command() -> str:
    """The line .ci/run extracts from the README, by .ci/run's own sed."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = next(line for line in script.splitlines() if line.startswith("cmd=$("))[len("cmd=$("):-1]
    return subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_ci_runs_the_readme_test_command_with_the_defaults_installed_and_required():
    cmd = _ci_command()
    assert cmd.index("bash scripts/install_defaults.sh") < cmd.index("pytest")
    assert f"{REQUIRE_ENV}=1" in (ROOT / ".ci" / "run").read_text()
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)


def test_ci_installs_the_second_real_model_and_requires_its_test():
    from real_defaults import require_model

    from surgeon import catalog

    assert "bash scripts/install_defaults.sh --with qwen2.5-0.5b" in _ci_command()
    with pytest.MonkeyPatch.context() as mp:  # not installed: a skip outside CI, a failure in it
        mp.setitem(catalog.MODELS, "qwen2.5-0.5b", catalog.NamedModel(
            "qwen2.5-0.5b", "missing", "q.gguf", (("no_such_part_pkg", "data/part01.bin"),), "0" * 64, "install"))
        mp.delenv(REQUIRE_ENV, raising=False)
        with pytest.raises(pytest.skip.Exception, match="--with qwen2.5-0.5b"):
            require_model("qwen2.5-0.5b")
        mp.setenv(REQUIRE_ENV, "1")
        with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV} is set"):
            require_model("qwen2.5-0.5b")


def _not_installed(*_args, **_kwargs):
    raise SurgeonError("the default model is not installed; run scripts/install_defaults.sh")


def test_missing_defaults_skip_outside_ci_and_fail_in_it(monkeypatch):
    monkeypatch.setattr(sources, "default_model_file", _not_installed)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="install_defaults.sh"):
        require_defaults()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV} is set"):
        require_defaults()
