"""Reading a DeepSpeed checkpoint (`surgeon train`'s checkpoints/<tag>) as one fp32 state dict, weights-only.

The weights are the full fp32 state of any ZeRO stage — stage 0: the model-states file's `module`; stages 1–3: the
fp32 master weights, gathered by DeepSpeed's own zero_to_fp32 in lazy mode (one tensor materialized at a time).

Nothing is ever unpickled beyond tensors: DeepSpeed calls torch.load(weights_only=False) internally, so while it
reads, TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch use its weights-only unpickler anyway, with only the few plain
DeepSpeed classes its checkpoints pickle (SAFE_DEEPSPEED_GLOBALS) allowed on top of tensors and containers.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import SurgeonError, one_line

WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# (module, name) of the classes DeepSpeed pickles into its checkpoints, found by loading stage 0-3 checkpoints with
# the weights-only unpickler: the loss scaler (its plain attributes), the ZeRO stage enum and the tensor-fragment
# address named tuple of the optimizer states. Nothing with code runs on unpickling them.
SAFE_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_deepspeed_globals() -> list:
    import importlib

    found = []
    for module, name in SAFE_DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: a checkpoint that pickles it then fails to load, safely
    return found


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside runs the weights-only unpickler, even one that passes weights_only=False (as
    DeepSpeed's do), with only SAFE_DEEPSPEED_GLOBALS allowed beyond tensors and plain containers."""
    saved = {k: os.environ.get(k) for k in (WEIGHTS_ONLY_ENV, NO_WEIGHTS_ONLY_ENV)}
    os.environ[WEIGHTS_ONLY_ENV] = "1"
    os.environ.pop(NO_WEIGHTS_ONLY_ENV, None)  # torch refuses the two together
    try:
        with torch.serialization.safe_globals(_safe_deepspeed_globals()):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_deepspeed():
    if not torch.cuda.is_available():  # as surgeon.train.engine: before DeepSpeed probes for accelerators
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    return zero_to_fp32


def _load_error(path: Path, err: BaseException) -> SurgeonError:
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err).lower() \
            or "GLOBAL" in str(err):
        return SurgeonError(f"{path} pickles an object outside the allowed tensors and DeepSpeed classes "
                            f"({one_line(err, 200)}); refusing to unpickle it")
    return SurgeonError(f"reading the DeepSpeed checkpoint {path} failed ({one_line(err, 200)}); it is incomplete "
                        "or not a DeepSpeed checkpoint")


def load_checkpoint(checkpoints: Path, tag: str) -> tuple[dict, int, dict]:
    """(full state dict, ZeRO stage, client state) of DeepSpeed checkpoint `checkpoints/tag`, read weights-only.

    The state dict's values are fp32 tensors or DeepSpeed's lazy gathered tensors (`.contiguous()` realizes one):
    ZeRO 1–3 are consolidated by deepspeed.utils.zero_to_fp32 in lazy mode (the optimizer files memory-mapped, one
    tensor materialized at a time)."""
    folder = checkpoints / tag
    states = sorted(folder.glob("*model_states.pt"))
    if not states:
        raise SurgeonError(f"{folder} holds no DeepSpeed model states (*model_states.pt); the checkpoint is "
                           "incomplete")
    optim = sorted(folder.glob("*optim_states.pt"))
    zero_to_fp32 = _import_deepspeed() if optim else None
    with weights_only_loads():
        try:
            model_states = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise _load_error(states[0], err) from None
        client = {k: model_states.get(k) for k in ("step", "position", "sink_dims", "global_steps")}
        stage = int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
        if not optim:
            module = model_states.get("module")
            if not isinstance(module, Mapping) or not module:
                raise SurgeonError(f"{states[0]} holds no module weights (ZeRO stage {stage} without optimizer "
                                   "states); the checkpoint is incomplete")
            if stage:
                raise SurgeonError(f"{folder} is a ZeRO-{stage} checkpoint without its *optim_states.pt files, "
                                   "which hold the fp32 weights; copy the whole checkpoint directory")
            return dict(module), 0, client
        del model_states
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag,
                                                                              lazy_mode=True)
        except Exception as err:
            raise _load_error(folder, err) from None
    return dict(state), stage, client


def checkpoint_layout(model_dir: Path, state: dict) -> dict:
    """The state dict in the layout of the model directory's files: transformers 5 loads some checkpoints through a
    conversion (MoE experts stored one tensor per expert are fused into one parameter) and `save_pretrained` reverts
    it; the same revert is applied here, on a model skeleton built on the meta device. It needs every tensor at
    once (the whole model in memory), so it runs only when the names differ. Pure reshaping: values are unchanged."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.core_model_loading import revert_weight_conversion

        from ..modeling import register

        register()
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        return dict(revert_weight_conversion(skeleton, {k: v.contiguous() for k, v in state.items()}))
    except (ImportError, ValueError, KeyError, RuntimeError, OSError):
        return state  # the name check that follows reports what differs
