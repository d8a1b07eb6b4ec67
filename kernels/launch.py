"""Launch helpers shared by the fused norm ops (pre_affine_op.py, gated_norm_op.py): row views, block sizes,
warp counts, grid sizes, argument checks. Plain Python around the launches; no Triton kernels here.
"""

from __future__ import annotations

import contextlib

import torch
import triton

# A row wider than this does not fit one program's registers; Liger draws the same line.
MAX_FUSED_SIZE = 65536


def num_warps_for(block: int) -> int:
    """More warps for wider rows, so each thread holds a bounded slice of the row (Liger's heuristic)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def num_programs(device: torch.device) -> int:
    """Programs for the persistent backward grids: one per SM on a GPU. Under TRITON_INTERPRET programs run one
    after the other in Python, so a few suffice and keep the ragged last-program case exercised."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make that the tensor's device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) as a (rows, d) view with unit column stride (a copy only when needed); the row stride is free."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# A program's row tile is BLOCK_M × BLOCK_D; BLOCK_M rows while the tile stays within this many elements, so
# d ≥ 2048 gets exactly one row per program (as DESIGN §6 says) and narrow rows get several (Liger's small-row
# trick: otherwise a program would do almost nothing; it also keeps the CPU interpreter bearable).
ROW_TILE_BUDGET = 2048
MAX_BLOCK_M = 32


def block_m_for(block_d: int, n_rows: int) -> int:
    return max(1, min(MAX_BLOCK_M, ROW_TILE_BUDGET // block_d, triton.next_power_of_2(max(n_rows, 1))))


def check_vector(name: str, t: torch.Tensor | None, d: int):
    if t is not None and tuple(t.shape) != (d,):
        raise ValueError(f"{name} must have shape ({d},), got {tuple(t.shape)}")


def check_row_width(d: int):
    if triton.next_power_of_2(d) > MAX_FUSED_SIZE:
        raise ValueError(f"hidden size {d} is wider than the fused kernels support ({MAX_FUSED_SIZE})")
