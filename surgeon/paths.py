"""Where surgeon keeps what it caches: imported GGUF models, the default text, file digests."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root of surgeon's cache, `$SURGEON_CACHE` or `~/.cache/surgeon` (not created here)."""
    if os.environ.get("SURGEON_CACHE"):
        return Path(os.environ["SURGEON_CACHE"]).expanduser()
    return Path.home() / ".cache" / "surgeon"
