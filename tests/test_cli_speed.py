"""A CLI that answers at once (issue 17): `surgeon --help`, an argument error of the top-level parser and `surgeon
inspect` import neither torch, transformers nor the model classes (checked in a fresh process: which modules got
imported, not how long it took; benchmarks/bench_cli.py times it); every command's own --help still works; the
header-only view inspect reads agrees with the reader's; `import surgeon.modeling` registers the families;
transformers' bars are off where surgeon loads a model, GGUF's go through surgeon's progress; off a terminal,
progress is plain periodic lines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console
from tiny import make_tiny

from surgeon.cli import COMMANDS, main

HEAVY = ("torch", "transformers", "surgeon.modeling", "surgeon.transforms", "deepspeed")


def imported_after(argv: list[str], cwd, prelude: str = "") -> dict:
    """Run `surgeon ARGV` in a fresh process (from `cwd`, never the repository root, whose kernels/ shadows a
    package transformers probes for); its exit code, stdout and which heavy modules it imported."""
    script = textwrap.dedent(f"""
        import json, sys
        {prelude}
        from surgeon.cli import main
        try:
            code = main({argv!r})
        except SystemExit as exit:
            code = exit.code
        sys.stdout.flush()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "deepspeed")
                       or m.startswith(("surgeon.modeling", "surgeon.transforms", "surgeon.commands.")))
        print("\\n" + json.dumps({{"code": code, "modules": heavy}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)
    *out, last = done.stdout.rstrip("\n").split("\n")
    return {**json.loads(last), "out": "\n".join(out), "err": done.stderr}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cli") / "llama", "llama")


def test_help_imports_no_command_nor_torch(tmp_path):
    run = imported_after(["--help"], tmp_path)
    assert run["code"] == 0, run["err"]
    assert run["modules"] == [], run["modules"]  # not even a command's module
    for name, help_line in COMMANDS.items():
        assert name in run["out"] and help_line.split(" ")[0] in run["out"], name


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--local_rank", "x", "convert"]])
def test_argument_errors_of_the_top_level_parser_import_nothing(tmp_path, argv):
    run = imported_after(argv, tmp_path)
    assert run["code"] == 2 and "usage: surgeon" in run["err"], run
    assert "Traceback" not in run["err"]
    assert run["modules"] == [], run["modules"]


def test_import_surgeon_is_cheap(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys, surgeon; print(sorted(m for m in sys.modules if "
                           "m.split('.')[0] in ('torch', 'transformers')))"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_reads_headers_without_torch(tiny, tmp_path, as_json):
    run = imported_after(["inspect", str(tiny)] + (["--json"] if as_json else []), tmp_path)
    assert run["code"] == 0, run["err"]
    assert run["modules"] == ["surgeon.commands.inspect"], run["modules"]
    if as_json:
        from surgeon.commands.inspect import describe

        assert json.loads(run["out"]) == json.loads(json.dumps(describe(tiny)))
    else:
        assert "llama (model_type llama)" in run["out"] and "float32×" in run["out"]


def test_inspect_error_is_one_line_without_torch(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    run = imported_after(["inspect", str(tmp_path / "model")], tmp_path)
    assert run["code"] == 2, run
    lines = run["err"].strip().splitlines()
    assert len(lines) == 1 and "is not a readable safetensors file" in lines[0], run["err"]
    assert run["modules"] == ["surgeon.commands.inspect"], run["modules"]


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_headers_agree_with_the_reader(tmp_path, layout):
    from surgeon.io import Checkpoint
    from surgeon.io.headers import Headers

    kwargs = {"single": {}, "sharded": {"max_shard_size": "20KB"}, "bin": {"safe_serialization": False}}[layout]
    path = make_tiny(tmp_path / layout, "qwen2", **kwargs)
    if layout == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
    headers, ckpt = Headers(path), Checkpoint(path)
    assert headers.files == ckpt.files and headers.config == ckpt.config
    assert list(headers.tensors) == list(ckpt.tensors)
    for name, entry in headers.tensors.items():
        info = ckpt.tensors[name]
        assert (entry.file, entry.dtype, entry.shape, entry.nbytes) == \
            (info.file, str(info.dtype).removeprefix("torch."), info.shape, info.nbytes), name
    assert (headers.num_parameters, headers.nbytes) == (ckpt.num_parameters, ckpt.nbytes)


def test_every_command_help_works(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        assert exit.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: surgeon {name}"), out[:200]
        assert "options:" in out and len(out.splitlines()) > 4, name


def test_a_command_argument_error_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["inspect"])
    assert exit.value.code == 2
    assert "usage: surgeon inspect" in capsys.readouterr().err


def test_importing_surgeon_modeling_registers_the_families(tmp_path):
    script = ("import surgeon.modeling\nfrom transformers import AutoConfig\n"
              "print(type(AutoConfig.for_model('surgeon_qwen3')).__name__)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.stdout.strip() == "SurgeonQwen3Config", done.stderr


def test_load_model_silences_transformers_bars(tiny):
    from transformers.utils import logging

    from surgeon.sources import load_model

    logging.enable_progress_bar()
    try:
        load_model(tiny)
        assert not logging.is_progress_bar_enabled()
    finally:
        logging.enable_progress_bar()


@pytest.fixture
def log_console(monkeypatch):
    """surgeon's progress console as a CI log sees it: not a terminal."""
    import surgeon.progress

    buffer = io.StringIO()
    monkeypatch.setattr(surgeon.progress, "console", Console(file=buffer, force_terminal=False, width=200))
    return buffer


def test_gguf_tensor_loop_goes_through_surgeon_progress(log_console):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from surgeon.progress import gguf_progress

    original = gguf_utils.tqdm
    with gguf_progress():
        assert gguf_utils.tqdm is not original
        assert list(gguf_utils.tqdm(list(range(7)), desc="Converting and de-quantizing GGUF tensors...")) == \
            list(range(7))
    assert gguf_utils.tqdm is original
    lines = log_console.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("Converting and de-quantizing GGUF tensors: 7/7 (100%)")


def test_off_a_terminal_progress_is_plain_periodic_lines(log_console, monkeypatch):
    import surgeon.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    with progress.progress_bar("writing out", 100_000_000, unit="bytes") as advance:
        for _ in range(100):
            now[0] += 1.0  # 100 s in all: a line per 10% (10 s apart)
            advance(1_000_000)
    lines = log_console.getvalue().splitlines()
    assert len(lines) == 10 and "\x1b" not in log_console.getvalue(), lines
    assert lines[0] == "writing out: 10.0/100.0 MB (10%), 0:10 elapsed"
    assert lines[-1] == "writing out: 100.0/100.0 MB (100%), 1:40 elapsed"


def test_plain_lines_are_rate_limited_and_periodic(log_console, monkeypatch):
    import surgeon.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    with progress.training_progress(1000, start=100) as show:
        for step in range(101, 1001):
            now[0] = (step - 100) / 100 if step < 900 else step - 892  # 8 s for 800 steps, a step a second then
            show(step, f"loss {1000 / step:.2f}")
    lines = log_console.getvalue().splitlines()
    # 10% lines, but 5 s apart (600: t = 5 s; 902: t = 10 s), then one per 30 s (932, 962, 992), and the end
    assert [line.split(" (")[0] for line in lines] == \
        [f"training: {step:,}/1,000 steps" for step in (600, 902, 932, 962, 992, 1000)], lines
    assert lines[-1].endswith("loss 1.00")


def test_a_failure_leaves_the_error_as_the_last_line(log_console):
    from surgeon.progress import progress_bar

    with pytest.raises(RuntimeError), progress_bar("work", 10) as advance:
        advance(3)
        raise RuntimeError("boom")
    assert log_console.getvalue() == ""


def test_run_from_the_repository_root_the_installed_kernels_package_wins(tiny):
    """Python run from the checkout puts its `kernels/` folder first on sys.path; transformers depends on the PyPI
    package of that name and imports it while loading a model. The folder hands the name over to the installed
    package (or, with none installed, reads as not installed), so a command that loads a model works there."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, kernels\n"
                            "try:\n    print(m.version('kernels'), kernels.__file__)\n"
                            "except m.PackageNotFoundError:\n    print('none', kernels.__file__)"],
                           cwd=root, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    version, where = probe.stdout.split()
    assert (Path(where).resolve().parent == root / "kernels") == (version == "none"), probe.stdout
    done = subprocess.run([sys.executable, "-m", "surgeon.cli", "eval", str(tiny), "--help"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = subprocess.run([sys.executable, "-c", "import sys\nsys.path.insert(0, '')\n"
                             "from surgeon.sources import load_model\nload_model(sys.argv[1])\nprint('ok')", str(tiny)],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("ok"), loaded.stderr[-2000:]
