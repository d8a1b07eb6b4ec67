"""The smooth factors file of a model directory: key `<tensor>@<axis>` → f, with smoothed tensor = source tensor × f
along that axis (written by the smooth pass, read back by its later rounds, hadamard, training and export)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SurgeonError

FACTORS_FILE = "smooth_factors.safetensors"
FACTORS_FORMAT = "surgeon smooth factors: <tensor>@<axis> -> f, smoothed tensor = source tensor x f along axis"


def read_factor_entries(model_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The FACTORS_FILE's entries ({"<tensor>@<axis>": f}) of a model directory; None when it has none."""
    from safetensors import safe_open

    path = Path(model_dir) / FACTORS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if (fh.metadata() or {}).get("format") != FACTORS_FORMAT:
            raise SurgeonError(f"{path} is not a surgeon smooth factors file (its metadata names no such format)")
        return {key: fh.get_tensor(key) for key in fh.keys()}


def load_factors(model_dir: str | os.PathLike, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """{tensor name: the factor smooth multiplied it by, shaped to broadcast against it} from the model directory's
    FACTORS_FILE; `shapes` are the model's tensors (names as in the checkpoint)."""
    path = Path(model_dir) / FACTORS_FILE
    entries = read_factor_entries(model_dir)
    if entries is None:
        raise SurgeonError(f"{model_dir} has no {FACTORS_FILE}: only a model written by `surgeon convert -t smooth` "
                           "(or exported from training one) records its smoothing factors (convert the model with "
                           "smooth, or train in the stored coordinates)")
    out: dict[str, torch.Tensor] = {}
    for key, f in entries.items():
        name, _, axis = key.rpartition("@")
        if name not in shapes:
            raise SurgeonError(f"{path} names {name!r}, which the model does not have: the factors belong to "
                               "another model")
        shape = [1] * len(shapes[name])
        axis = int(axis)
        if len(shape) < -axis or shapes[name][axis] != f.numel():
            raise SurgeonError(f"{path}: {key} has {f.numel()} factors for a tensor of shape "
                               f"{tuple(shapes[name])}: the factors belong to another model")
        shape[axis] = -1
        f = f.reshape(shape)
        out[name] = out[name] * f if name in out else f
    return out
