"""All-or-nothing output directories: build in a hidden temporary sibling, rename into place at the end.

A failure (or Ctrl-C) anywhere before the rename removes the temporary directory, so no half-written output
ever exists under the destination name; the source is only ever read.
"""

from __future__ import annotations

import os
import shutil
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=STAGING_SUFFIX, dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other directory
    try:
        yield tmp
        if dest.exists() and not force:
            if not exist_ok:
                raise SurgeonError(f"destination {dest} appeared while it was being written; nothing was replaced")
            shutil.rmtree(tmp, ignore_errors=True)
        elif dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".surgeon-old", dir=dest.parent))
            os.replace(dest, trash / "old")
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
