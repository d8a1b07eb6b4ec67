"""One exception type for every user-facing failure, and the one line the CLI prints for any failure.

A SurgeonError is bad input (exit 2); an OSError, an interrupt or a torch/DeepSpeed error is a fault of the run's
surroundings (exit 1, 130 for Ctrl-C): each becomes one line naming the problem and the fix, never a traceback
(SURGEON_DEBUG=1 prints it too)."""

from __future__ import annotations

import errno
import os

DEBUG_ENV = "SURGEON_DEBUG"
DEBUG_HINT = f"run with {DEBUG_ENV}=1 for the traceback"


class SurgeonError(Exception):
    """A problem with the user's input or request; the message names the problem and the fix."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line, for quoting inside a SurgeonError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# errno → (what was being done to the file, the fix): the faults a long write meets on a real machine
_OS_FIXES = {
    errno.ENOSPC: ("writing", "free space or choose another destination"),
    errno.EDQUOT: ("writing", "free space within your quota or choose another destination"),
    errno.EFBIG: ("writing", "free space or choose another destination (a file-size limit, `ulimit -f`, or the "
                             "file system's largest file is below a shard: --shard-size makes them smaller)"),
    errno.EROFS: ("writing", "the file system is read-only: choose another destination"),
    errno.EACCES: ("opening", "you may not write or read there: choose another destination or fix its permissions"),
    errno.EPERM: ("opening", "the operation is not permitted there: choose another destination or fix its "
                             "permissions"),
    errno.ENOENT: ("opening", "it is gone: was it removed while surgeon ran?"),
    errno.EIO: ("reading or writing", "the disk reported an I/O error: check it, then run again"),
}


def os_error_line(err: OSError) -> str:
    """'writing out/model-00001.safetensors: File too large (EFBIG); free space or choose another destination'."""
    code = err.errno if isinstance(err.errno, int) else None
    action, fix = _OS_FIXES.get(code, ("accessing", "check the path and the disk, then run again"))
    action = getattr(err, "surgeon_action", action)  # set where surgeon knows (io/writer.py: "writing")
    name = errno.errorcode.get(code, "") if code is not None else ""
    reason = (err.strerror or one_line(err)) + (f" ({name})" if name else "")
    where = f"{action} {err.filename}: " if err.filename else f"{action} a file: "
    return f"{where}{reason}; {fix}"


def describe(exc: BaseException, command: str | None = None) -> tuple[str, int]:
    """The CLI's one line (without the 'surgeon: error: ' prefix) and exit status for any exception."""
    if isinstance(exc, SurgeonError):
        return str(exc).replace("\n", " "), 2
    if isinstance(exc, KeyboardInterrupt):
        if command == "train":
            return "interrupted; continue the run with --resume (from its latest checkpoint)", 130
        return "interrupted; nothing was written", 130
    if isinstance(exc, OSError):
        return os_error_line(exc), 1
    if isinstance(exc, MemoryError):
        return "out of memory; close other programs or use a machine with more memory", 1
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if "OutOfMemory" in name:
        return (f"out of accelerator memory ({one_line(exc, 160)}); lower batch_size (raise grad_accum) or seq_len, "
                "or use a higher ZeRO stage"), 1
    if module.startswith(("torch", "deepspeed")) or isinstance(exc, RuntimeError):
        origin = "DeepSpeed" if module.startswith("deepspeed") or "deepspeed" in str(exc).lower() else "torch"
        return f"{origin} failed: {one_line(exc, 240)}; {DEBUG_HINT}", 1
    return f"unexpected {name}: {one_line(exc, 240)}; this is a bug in surgeon: {DEBUG_HINT}", 1


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
