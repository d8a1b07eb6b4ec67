"""All-or-nothing output directories: build in a hidden temporary sibling, rename into place at the end.

A failure (or Ctrl-C) anywhere before the rename removes the temporary directory, so no half-written output
ever exists under the destination name; the source is only ever read. A process killed outright (SIGKILL, power
loss) cannot clean up: each staging directory holds an owner file (host, pid, the pid's start time), and the next
run to the same destination removes the siblings whose owner is gone, never one a live process still writes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SurgeonError


def check_destination(dest: Path, *, force: bool = False, sources: tuple[Path, ...] = (),
                      exist_ok: bool = False) -> None:
    dest_r = dest.resolve()
    for src in sources:
        src_r = src.resolve()
        if dest_r == src_r or src_r in dest_r.parents:
            raise SurgeonError(f"destination {dest} is inside the source {src}; choose a directory outside it")
        if dest_r in src_r.parents and force:
            raise SurgeonError(f"destination {dest} contains the source {src}; --force would delete it")
    if dest.exists() and not (force or exist_ok):
        raise SurgeonError(f"destination {dest} already exists; remove it or pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise SurgeonError(f"destination {dest} exists and is not a directory; remove it first")


STAGING_SUFFIX = ".surgeon-tmp"
TRASH_SUFFIX = ".surgeon-old"
OWNER_FILE = ".surgeon-owner"  # inside a staging directory; never part of the output (removed before the rename)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a pid reused by another process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _owner_alive(owner: dict) -> bool:
    """Whether the process that made a staging directory may still be using it (unknown counts as alive)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True  # another machine's (a shared file system): no way to tell from here
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    start = _start_time(pid)
    return not (start and owner.get("start") and start != owner["start"])  # the pid now names another process


def clear_stale_staging(dest: Path) -> list[Path]:
    """Remove the staging (and trash) siblings of `dest` left by a process that was killed; return them."""
    cleared = []
    try:
        siblings = list(dest.parent.glob(f".{dest.name}.*"))
    except OSError:
        return cleared
    for sibling in siblings:
        if not sibling.name.endswith((STAGING_SUFFIX, TRASH_SUFFIX)) or not sibling.is_dir():
            continue
        try:
            owner = json.loads((sibling / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # no owner file (yet): just being created, or not ours to judge
        if isinstance(owner, dict) and not _owner_alive(owner):
            shutil.rmtree(sibling, ignore_errors=True)
            cleared.append(sibling)
    return cleared


def _make_owned(dest: Path, suffix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent))
    try:
        (path / OWNER_FILE).write_text(json.dumps(_owner()))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def final_path(path: str | os.PathLike) -> Path:
    """Where `path` will be once every staging directory on it is renamed into place: `.NAME.<random>.surgeon-tmp`
    components become NAME. For what an output records about its inputs (a pipeline exports from a run that is
    still inside its own staging directory)."""
    parts = []
    for part in Path(path).parts:
        if part.startswith(".") and part.endswith(STAGING_SUFFIX) and part.count(".") >= 3:
            part = part[1:-len(STAGING_SUFFIX)].rsplit(".", 1)[0]
        parts.append(part)
    return Path(*parts)


@contextmanager
def staged_directory(dest: Path, *, force: bool = False, sources: tuple[Path, ...] = (),
                     exist_ok: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `dest`; on success it becomes `dest`, on any exception it is
    deleted. An existing `dest` is replaced with `force`, kept with `exist_ok` (a cache entry that a concurrent
    run of the same work finished first), and refused otherwise."""
    dest = Path(dest)
    check_destination(dest, force=force, sources=sources, exist_ok=exist_ok)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_staging(dest)
    tmp = _make_owned(dest, STAGING_SUFFIX)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other directory
        yield tmp
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        if dest.exists() and not force:
            if not exist_ok:
                raise SurgeonError(f"destination {dest} appeared while it was being written; nothing was replaced")
            shutil.rmtree(tmp, ignore_errors=True)
        elif dest.exists():
            trash = _make_owned(dest, TRASH_SUFFIX)
            os.replace(dest, trash / "old")
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
