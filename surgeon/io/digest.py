"""Content digests of a source checkpoint.

Each file's sha256 is the standard one (what `sha256sum` prints, and what the Hugging Face hub stores as a
large file's id); the checkpoint's digest is the sha256 of those lines, `sha256sum`-style, in file order.
Hashing runs in a thread beside the conversion (hashlib releases the GIL), and per-file results are cached by
(path, size, mtime, inode) so converting the same source again costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from ..paths import cache_dir

CHUNK = 1 << 24


def cache_file() -> Path:
    return cache_dir() / "sha256.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cached_file_sha256(path: Path) -> str:
    """file_sha256 through the cache (a large GGUF is hashed once, not at every use)."""
    cache = _load_cache()
    key = _key(path)
    if key not in cache:
        cache[key] = file_sha256(path)
        _save_cache(cache)
    return cache[key]


def checkpoint_digest(file_digests: dict[str, str]) -> str:
    lines = "".join(f"{digest}  {name}\n" for name, digest in file_digests.items())
    return hashlib.sha256(lines.encode()).hexdigest()


class SourceHasher(threading.Thread):
    """Hashes `files` in the background; `result()` joins and returns (checkpoint digest, per-file digests)."""

    def __init__(self, files: list[Path]):
        super().__init__(daemon=True, name="surgeon-sha256")
        self.files = files
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None

    def run(self):
        try:
            cache = _load_cache()
            dirty = False
            for file in self.files:
                key = _key(file)
                if key not in cache:
                    cache[key] = file_sha256(file)
                    dirty = True
                self.digests[file.name] = cache[key]
            if dirty:
                _save_cache(cache)
        except BaseException as err:  # re-raised in the main thread by result()
            self.error = err

    def result(self) -> tuple[str, dict[str, str]]:
        self.join()
        if self.error is not None:
            raise self.error
        return checkpoint_digest(self.digests), dict(self.digests)
