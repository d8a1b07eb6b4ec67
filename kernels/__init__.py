"""Fused GatedNorm / PreAffine-RMSNorm kernels (DESIGN §6) behind one functional API.

    gated_norm(x, weight, w_down, w_up, eps, pre_affine=None, backend="auto")
        σ(W_up silu(W_down y)) ⊙ y,  y = λ ⊙ N(λ1 ⊙ x)
    pre_affine_rms_norm(x, weight, pre_affine, eps, backend="auto")
        λ ⊙ N(λ1 ⊙ x)

x is (..., d); every argument can require grad. The torch reference in surgeon/modeling/modeling_surgeon.py is the
definition; the kernels in `gated_norm_op.py` / `pre_affine_op.py` must match it (tests/test_kernels.py). The op
modules are named apart from the functions, so `surgeon.kernels.gated_norm` is always the function; the launch
helpers both ops share are in `launch.py`.

Backends:
    "auto"     the global default if one is set (`use_backend`, or SURGEON_KERNEL_BACKEND in the environment),
               else Triton on CUDA tensors and the plain torch reference elsewhere
    "triton"   the fused kernels; on CPU tensors only under TRITON_INTERPRET=1 (set before import), for tests
    "torch"    the eager torch reference
    "compile"  the torch reference through torch.compile (one compiled function per op, cached)

The model's SurgeonRMSNorm modules call with backend="auto", so a whole model is switched with
`surgeon.kernels.use_backend("triton")` — a setter that also works as a context manager restoring the previous
default on exit, like torch.set_grad_enabled.
"""

from __future__ import annotations

import os
import threading

if __name__ == "surgeon.kernels":
    from surgeon.modeling.modeling_surgeon import gated_norm_reference, rms_norm_reference
else:
    # Found as a top-level `kernels` (Python run from the repository root), shadowing the PyPI package of that name,
    # which transformers depends on and imports. Hand the name over to the installed package: the import that found
    # this folder returns what sys.modules holds when it ends. Without one, transformers finds no version here and
    # reads `kernels` as not installed. Either way nothing of surgeon is imported (the modeling file is mid-import).
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _repository = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if Path(p or ".").resolve() != _repository])
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _installed
        _spec.loader.exec_module(_installed)

try:  # Triton is a dependency, but a broken install should cost the kernels, not the model code.
    from .gated_norm_op import GatedNormFunction, _gated_norm_fwd_kernel, gated_norm_triton
    from .pre_affine_op import PreAffineRMSNormFunction, pre_affine_rms_norm_triton

    _TRITON_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _TRITON_ERROR = exc

BACKENDS = ("auto", "triton", "torch", "compile")
_ENV_VAR = "SURGEON_KERNEL_BACKEND"

__all__ = [
    "BACKENDS", "gated_norm", "pre_affine_rms_norm", "use_backend", "get_backend", "triton_available",
    "gated_norm_reference", "rms_norm_reference",
]


def _check(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: choose one of {', '.join(map(repr, BACKENDS))}")
    return backend


def _from_environment() -> str:
    name = os.environ.get(_ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{_ENV_VAR}={name!r} is not a kernel backend: choose one of {', '.join(BACKENDS)}")
    return name


_global_default = _from_environment()


def get_backend() -> str:
    """The backend that backend="auto" currently means ("auto" = by device)."""
    return _global_default


class use_backend:
    """Force the backend every backend="auto" call uses, for a whole model.

        surgeon.kernels.use_backend("triton")          # from now on
        with surgeon.kernels.use_backend("compile"):   # inside the block only, then the previous default
            loss = model(**batch).loss
    """

    def __init__(self, backend: str):
        global _global_default
        self.backend = _check(backend)
        self.previous = _global_default
        _global_default = backend

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _global_default
        _global_default = self.previous
        return False

    def __repr__(self):
        return f"use_backend({self.backend!r})"


def triton_available() -> bool:
    return _TRITON_ERROR is None


def _interpreting() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (decided once, when they were decorated)."""
    if _TRITON_ERROR is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gated_norm_fwd_kernel, InterpretedFunction)


def _resolve(backend: str, x) -> str:
    backend = _check(backend)
    if backend == "auto":
        backend = _global_default
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if _TRITON_ERROR is not None:
            raise RuntimeError(f"backend='triton' but Triton could not be imported: {_TRITON_ERROR}")
        if not x.is_cuda and not _interpreting():
            raise RuntimeError("backend='triton' needs CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing "
                               "surgeon to run the kernels in Triton's interpreter (slow; for tests)")
    return backend


_compiled = {}
_compile_lock = threading.Lock()


def _compiled_fn(name, fn):
    """torch.compile'd reference, built on first use (compiling costs seconds; most runs never ask)."""
    if name not in _compiled:
        import torch

        with _compile_lock:
            if name not in _compiled:
                _compiled[name] = torch.compile(fn, dynamic=None)
    return _compiled[name]


def gated_norm(x, weight, w_down, w_up, eps, pre_affine=None, backend="auto"):
    """σ(W_up silu(W_down y)) ⊙ y with y = λ ⊙ N(λ1 ⊙ x); w_down (r, d) and w_up (d, r) as nn.Linear weights."""
    backend = _resolve(backend, x)
    if backend == "triton":
        return gated_norm_triton(x, weight, w_down, w_up, eps, pre_affine=pre_affine)
    if backend == "compile":
        return _compiled_fn("gated_norm", gated_norm_reference)(x, weight, w_down, w_up, eps, pre_affine=pre_affine)
    return gated_norm_reference(x, weight, w_down, w_up, eps, pre_affine=pre_affine)


def pre_affine_rms_norm(x, weight, pre_affine, eps, backend="auto"):
    """λ ⊙ N(λ1 ⊙ x); pre_affine=None gives the plain RMSNorm."""
    backend = _resolve(backend, x)
    if backend == "triton":
        return pre_affine_rms_norm_triton(x, weight, pre_affine, eps)
    if backend == "compile":
        return _compiled_fn("rms_norm", rms_norm_reference)(x, weight, eps, pre_affine=pre_affine)
    return rms_norm_reference(x, weight, eps, pre_affine=pre_affine)
