"""Hardening (issue 17): every bad input and I/O fault is one line on stderr, a non-zero exit, no output directory,
no staging directory and the source unchanged — config/tensor mismatches, non-finite weights, EFBIG (a real
file-size limit), ENOSPC / EROFS / EACCES, Ctrl-C, torch errors, bugs; a staging directory left by a killed
process is cleared by the next run to that destination (never a live one's); a SIGKILLed `surgeon train` resumes
with --resume to the uninterrupted run's losses."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny import make_tiny, write_words

from surgeon.cli import main
from surgeon.io.atomic import OWNER_FILE, STAGING_SUFFIX


# surgeon's progress shares stderr with the error line: silenced here so that stderr is the error line alone
QUIET_PROGRESS = "import surgeon.progress\nsurgeon.progress.console.quiet = True\n"


@pytest.fixture(autouse=True)
def quiet_progress(monkeypatch):
    import surgeon.progress

    monkeypatch.setattr(surgeon.progress.console, "quiet", True)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("good") / "llama", "llama")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def assert_one_line(err: str, match: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), err
    assert "Traceback" not in err and match in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.glob(f".{out.name}.*"))


def fails(capsys, argv, match, code=2) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    return assert_one_line(err, match)


def convert_fails(capsys, src, out, match, code=2, extra=()) -> str:
    before = digest(src)
    line = fails(capsys, ["convert", str(src), str(out), "-t", "gated-norm", *extra], match, code)
    assert_nothing_written(out)
    assert digest(src) == before
    return line


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("SURGEON_DEBUG", None)
    return env


CLI_MAIN = "\nimport sys\nfrom surgeon.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def surgeon_subprocess(args, cwd, *, prelude="", preexec_fn=None, timeout=240):
    """`surgeon ARGS` in a fresh process (run from `cwd`, never the repository root), after `prelude`."""
    script = QUIET_PROGRESS + textwrap.dedent(prelude) + CLI_MAIN
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


# ----------------------------------------------------------------------------- what is read is checked first


def test_a_config_that_disagrees_with_its_tensors_is_refused(good, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    edit_config(src, hidden_size=40)
    line = convert_fails(capsys, src, tmp_path / "out", "has shape [128, 48], but config.json")
    assert "makes it [128, 40]" in line and "hidden_size 40" in line


def test_a_config_with_more_layers_than_the_weights_is_refused(good, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    edit_config(src, num_hidden_layers=3)
    convert_fails(capsys, src, tmp_path / "out", "the checkpoint has no tensor 'model.layers.2.")


def test_a_config_transformers_cannot_build_is_refused(good, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    edit_config(src, num_attention_heads=5, head_dim=None)
    convert_fails(capsys, src, tmp_path / "out", "config.json does not describe a buildable llama model")


def test_per_expert_tensors_are_checked_against_the_fused_experts(tmp_path, capsys):
    src = make_tiny(tmp_path / "src", "mixtral")
    capsys.readouterr()  # transformers' own saving bar
    edit_config(src, intermediate_size=64)
    line = convert_fails(capsys, src, tmp_path / "out", "'model.layers.0.block_sparse_moe.experts.0.w1.weight'")
    assert "has shape [96, 48]" in line and "makes it [64, 48]" in line


def test_every_family_and_a_converted_model_pass_the_check(tmp_path):
    from tiny import ALL_FAMILIES

    from surgeon.convert import convert
    from surgeon.io.reader import Checkpoint
    from surgeon.io.validate import check_tensors
    from surgeon.transforms import GatedNorm, PreAffine

    for family in ALL_FAMILIES:
        for tied in (False, True):
            check_tensors(Checkpoint(make_tiny(tmp_path / f"{family}-{tied}", family, tied)))
    convert(tmp_path / "llama-False", tmp_path / "converted", [GatedNorm(rank=4), PreAffine()], show_progress=False)
    check_tensors(Checkpoint(tmp_path / "converted"))  # surgeon_llama: its gates and pre-affines are expected


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_source_tensor_is_named(good, tmp_path, capsys, value):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float(value)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    line = convert_fails(capsys, src, tmp_path / "out", "tensor 'model.layers.1.mlp.up_proj.weight' in "
                                                        "model.safetensors holds a non-finite value")
    assert f"({value} at [3, 5])" in line


# ----------------------------------------------------------------------------- I/O faults while writing


def test_a_file_size_limit_is_one_line_naming_the_shard(good, tmp_path):
    """EFBIG for real: the process's RLIMIT_FSIZE is below the shard (Python ignores SIGXFSZ, so write fails)."""
    out = tmp_path / "out"
    before = digest(good)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = surgeon_subprocess(["convert", good, out, "-t", "gated-norm"], tmp_path, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = assert_one_line(proc.stderr, f"writing {out}/model-00001-of-00001.safetensors: File too large (EFBIG); "
                                        "free space or choose another destination")
    assert "--shard-size" in line
    assert_nothing_written(out)
    assert digest(good) == before


FAULTS = {errno.ENOSPC: "No space left on device (ENOSPC); free space",
          errno.EROFS: "Read-only file system (EROFS); the file system is read-only",
          errno.EACCES: "Permission denied (EACCES); you may not write"}


@pytest.mark.parametrize("code", sorted(FAULTS), ids=lambda c: errno.errorcode[c])
def test_an_os_error_mid_write_is_one_line(good, tmp_path, capsys, monkeypatch, code):
    from surgeon.io import writer

    real = writer._tensor_bytes
    calls = []

    def failing(tensor):  # the third tensor's write fails, as a full disk would
        calls.append(1)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code))
        return real(tensor)

    monkeypatch.setattr(writer, "_tensor_bytes", failing)
    out = tmp_path / "out"
    line = convert_fails(capsys, good, out, f"writing {out}/model-00001-of-00001.safetensors: {FAULTS[code]}", code=1)
    assert line.count(";") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_destination_is_one_line(good, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        convert_fails(capsys, good, parent / "out", "Permission denied (EACCES)", code=1)
    finally:
        parent.chmod(0o755)


def _fault_in_write(monkeypatch, exc):
    from surgeon.io import writer

    def failing(tensor):
        raise exc

    monkeypatch.setattr(writer, "_tensor_bytes", failing)


def test_ctrl_c_is_one_line_and_leaves_nothing(good, tmp_path, capsys, monkeypatch):
    _fault_in_write(monkeypatch, KeyboardInterrupt())
    convert_fails(capsys, good, tmp_path / "out", "interrupted; nothing was written", code=130)


def test_a_torch_error_is_one_line_with_the_debug_hint(good, tmp_path, capsys, monkeypatch):
    _fault_in_write(monkeypatch, RuntimeError("CUDA error: an illegal memory access\nwas encountered"))
    line = convert_fails(capsys, good, tmp_path / "out", "torch failed: CUDA error: an illegal memory access was "
                                                         "encountered", code=1)
    assert line.endswith("run with SURGEON_DEBUG=1 for the traceback")


def test_a_bug_is_one_line_and_surgeon_debug_prints_the_traceback(good, tmp_path, capsys, monkeypatch):
    _fault_in_write(monkeypatch, ZeroDivisionError("division by zero"))
    convert_fails(capsys, good, tmp_path / "out", "unexpected ZeroDivisionError: division by zero; this is a bug",
                  code=1)
    monkeypatch.setenv("SURGEON_DEBUG", "1")
    assert main(["convert", str(good), str(tmp_path / "out"), "-t", "gated-norm"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("surgeon: error: unexpected ")
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- staging left by a killed process


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(dest: Path, tag: str, owner: dict | None) -> Path:
    staging = dest.parent / f".{dest.name}.{tag}{STAGING_SUFFIX}"
    staging.mkdir(parents=True)
    (staging / "model-00001-of-00001.safetensors").write_bytes(b"half a shard")
    if owner is not None:
        (staging / OWNER_FILE).write_text(json.dumps(owner))
    return staging


def test_a_dead_owners_staging_is_cleared_and_a_live_ones_kept(good, tmp_path, capsys):
    import socket

    from surgeon.io.atomic import _start_time

    out = tmp_path / "out"
    host = socket.gethostname()
    dead = _plant(out, "dead1234", {"host": host, "pid": _dead_pid(), "start": "1"})
    reused = _plant(out, "reused12", {"host": host, "pid": os.getpid(), "start": "not-this-process"})
    live = _plant(out, "live1234", {"host": host, "pid": os.getpid(), "start": _start_time(os.getpid())})
    elsewhere = _plant(out, "remote12", {"host": host + "-other", "pid": _dead_pid(), "start": "1"})
    unowned = _plant(out, "unowned1", None)
    assert main(["convert", str(good), str(out), "-t", "gated-norm"]) == 0
    capsys.readouterr()
    assert not dead.exists() and not reused.exists()
    assert live.is_dir() and elsewhere.is_dir() and unowned.is_dir()
    assert OWNER_FILE not in {p.name for p in out.iterdir()}


def test_a_sigkilled_convert_leaves_staging_the_next_run_clears(good, tmp_path):
    out = tmp_path / "out"
    before = digest(good)
    kill = """
        import os, signal
        from surgeon.io import writer
        real = writer._tensor_bytes
        def killed(tensor):  # mid-shard, as a kill -9 or the OOM killer would
            os.kill(os.getpid(), signal.SIGKILL)
        writer._tensor_bytes = killed
    """
    proc = surgeon_subprocess(["convert", good, out, "-t", "gated-norm"], tmp_path, prelude=kill)
    assert proc.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(f".out.*{STAGING_SUFFIX}"))
    assert not out.exists() and len(left) == 1 and (left[0] / OWNER_FILE).is_file()
    proc = surgeon_subprocess(["convert", good, out, "-t", "gated-norm"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not left[0].exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".out.*"))
    assert digest(good) == before


# ----------------------------------------------------------------------------- export and train


RECIPE = """\
seq_len: 32
batch_size: 4
steps: 6
lr: 3.0e-3
lr_new: 1.0e-2
warmup_steps: 2
freeze_base_steps: 2
heldout_every: 10
eval_windows: 8
eval_every: 3
save_every: 2
shuffle_windows: 64
quant_eval: []
objectives: {lm: 1.0}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A converted tiny model and an uninterrupted run on it."""
    from surgeon.convert import convert
    from surgeon.train.loop import train
    from surgeon.transforms import GatedNorm

    root = tmp_path_factory.mktemp("hardening-train")
    make_tiny(root / "src", "llama")
    convert(root / "src", root / "model", [GatedNorm(rank=4)], show_progress=False)
    write_words(root / "text.txt", 300)
    (root / "recipe.yaml").write_text(RECIPE)
    saved = dict(os.environ)
    try:
        train(root / "model", root / "text.txt", root / "run", recipe=root / "recipe.yaml", show_progress=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return root


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def export_fails(capsys, run_dir, out, match):
    before = digest(run_dir)
    fails(capsys, ["export", str(run_dir), str(out), "--no-progress"], match)
    assert_nothing_written(out)
    assert digest(run_dir) == before


@pytest.mark.parametrize("damage", ["truncated", "emptied"])
def test_an_export_of_a_damaged_checkpoint_is_one_line(trained, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    states = next((run_dir / "checkpoints" / tag).glob("*model_states.pt"))
    if damage == "truncated":
        data = states.read_bytes()
        states.write_bytes(data[: len(data) // 3])
        match = f"reading the DeepSpeed checkpoint {states} failed"
    else:
        states.unlink()
        match = "holds no DeepSpeed model states (*model_states.pt); the checkpoint is incomplete"
    export_fails(capsys, run_dir, tmp_path / "out", match)


def test_an_export_whose_model_config_was_edited_is_one_line(trained, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    edit_config(model, intermediate_size=64)
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    run["model"]["path"] = str(model)
    (run_dir / "run.json").write_text(json.dumps(run))
    export_fails(capsys, run_dir, tmp_path / "out", "tensor 'model.layers.0.mlp.down_proj.weight' in "
                 "model-00001-of-00001.safetensors has shape [48, 96], but config.json")


@pytest.mark.usefixtures("restore_environment")
def test_a_sigkilled_train_resumes_to_the_uninterrupted_losses(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    kill = """
        import os, signal
        from surgeon.train import loop
        seed_step = loop._seed_step
        def killed(seed, step, rank):  # during step 4, after the step-2 checkpoint and step 3's record
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            seed_step(seed, step, rank)
        loop._seed_step = killed
    """
    args = ["train", trained / "model", "--data", trained / "text.txt", "--out", run_dir, "--no-progress"]
    proc = surgeon_subprocess([*args, "--recipe", trained / "recipe.yaml"], tmp_path, prelude=kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step2"
    assert sorted(_records(run_dir)) == [0, 1, 2, 3]
    with open(run_dir / "metrics.jsonl", "a") as fh:  # and a record the kill cut in half
        fh.write('{"step": 4, "tot')
    assert main([*map(str, args), "--resume"]) == 0
    capsys.readouterr()
    a, b = _records(trained / "run"), _records(run_dir)
    assert sorted(a) == sorted(b)
    for step in range(1, 7):
        assert b[step]["total"] == a[step]["total"], step
    assert b[6]["eval"]["loss"] == a[6]["eval"]["loss"]
    assert json.loads((run_dir / "run.json").read_text())["resumed"][0]["step"] == 2
