"""Fused PreAffine-RMSNorm: one Triton forward kernel, one Triton backward kernel, one autograd.Function.

Math (DESIGN §3, §6), per row x ∈ R^d, statistics in fp32:

    u    = λ1 ⊙ x                       (PreAffine; λ1 = 1 is the identity, λ1 absent is plain RMSNorm)
    rstd = 1 / sqrt(mean(u²) + ε)
    n    = u · rstd
    out  = λ ⊙ n

Backward, per row, given dout:

    dλ  += dout ⊙ n                     (summed over rows)
    dn   = dout ⊙ λ
    du   = rstd · (dn − n · mean(dn ⊙ n))
    dλ1 += du ⊙ x                       (summed over rows)
    dx   = du ⊙ λ1

The reference (`surgeon.modeling.modeling_surgeon.rms_norm_reference`) is the definition. It rounds n to x.dtype
before multiplying by λ; these kernels keep n in fp32 until the final store, so in bf16 they differ from the
reference by about one bf16 ulp (and are closer to the exact value).

Layout, after Liger-Kernel's RMSNorm:
  * forward: one row per program at model widths (d ≥ 2048; a few rows per program for narrow rows), the
    whole row in registers (BLOCK_D = next_power_of_2(d), masked), x read once, out written once, and only
    rstd (one fp32 per row) saved for the backward;
  * backward: a fixed grid of P programs, each looping over a contiguous range of rows, keeping dλ and dλ1
    partial sums in registers; each program writes its (d,) partials once into a (P, d) buffer, which torch
    sums once. No atomics, so the result is deterministic.

The launch helpers (row views, block sizes, grids) are in `launch.py`, shared with `gated_norm_op.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import as_rows, block_m_for, check_row_width, check_vector, device_guard, num_programs, num_warps_for


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _pre_affine_rms_norm_fwd_kernel(
    X, W, PRE, OUT, RSTD,
    stride_x, stride_out, n_rows, n_cols, eps,
    HAS_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # BLOCK_M rows per program: 1 at model widths (d ≥ 2048), several for narrow rows so a program has work.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)  # int64: rows × stride can pass 2^31 at 16k tokens × 8k hidden × batch
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_PRE:
        u = x * tl.load(PRE + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        u = x
    # Padded columns are 0, so the sum is over the d real columns; divide by d, not BLOCK_D.
    rstd = tl.rsqrt(tl.sum(u * u, axis=1) / n_cols + eps)
    out = w[None, :] * (u * rstd[:, None])
    tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows64, rstd, mask=rmask)


@triton.jit
def _pre_affine_rms_norm_bwd_kernel(
    DOUT, X, W, PRE, RSTD, DX, DW_PART, DPRE_PART,
    stride_dout, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
    HAS_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    # λ and λ1 are read once per program, not once per row.
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre = tl.load(PRE + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dpre_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    mm = tl.arange(0, BLOCK_M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + mm
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        # Masked rows load x = dout = rstd = 0, so they add nothing to the partial sums.
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + rows64[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        if HAS_PRE:
            u = x * pre[None, :]
        else:
            u = x
        n = u * rstd[:, None]
        dw_acc += tl.sum(dout * n, axis=0)
        dn = dout * w[None, :]
        du = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / n_cols)[:, None])
        if HAS_PRE:
            dpre_acc += tl.sum(du * x, axis=0)
            dx = du * pre[None, :]
        else:
            dx = du
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    # Every program writes its whole partial row, even one that owned no rows (zeros), so the (P, d) buffers
    # can be torch.empty.
    tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=cmask)
    if HAS_PRE:
        tl.store(DPRE_PART + pid * n_cols + cols, dpre_acc, mask=cmask)


# ----------------------------------------------------------------------------- autograd


class PreAffineRMSNormFunction(torch.autograd.Function):
    """out = λ ⊙ N(λ1 ⊙ x); `pre_affine` may be None (plain RMSNorm)."""

    @staticmethod
    def forward(ctx, x, weight, pre_affine, eps):
        d = x.shape[-1]
        check_row_width(d)
        check_vector("weight", weight, d)
        check_vector("pre_affine", pre_affine, d)
        x2 = as_rows(x, d)
        n_rows = x2.shape[0]
        # The reference returns weight * normed.to(x.dtype): the promoted dtype of the two.
        out = torch.empty((n_rows, d), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        block_m = block_m_for(block, n_rows)
        if n_rows:
            with device_guard(x):
                _pre_affine_rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                    x2, weight, pre_affine if pre_affine is not None else weight, out, rstd,
                    x2.stride(0), out.stride(0), n_rows, d, eps,
                    HAS_PRE=pre_affine is not None, BLOCK_M=block_m, BLOCK_D=block,
                    num_warps=num_warps_for(block * block_m),
                )
        ctx.save_for_backward(x2, weight, pre_affine, rstd)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return out.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, dout):
        x2, weight, pre_affine, rstd = ctx.saved_tensors
        n_rows, d = x2.shape
        dout2 = as_rows(dout, d)
        dx = torch.empty((n_rows, d), dtype=ctx.x_dtype, device=x2.device)
        programs = max(1, min(num_programs(x2.device), n_rows))
        rows_per_program = triton.cdiv(n_rows, programs)
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=x2.device)
        dpre_part = torch.empty((programs, d), dtype=torch.float32, device=x2.device) if pre_affine is not None else None
        block = triton.next_power_of_2(d)
        block_m = block_m_for(block, rows_per_program)
        if n_rows:
            with device_guard(x2):
                _pre_affine_rms_norm_bwd_kernel[(programs,)](
                    dout2, x2, weight, pre_affine if pre_affine is not None else weight, rstd, dx,
                    dw_part, dpre_part if dpre_part is not None else dw_part,
                    dout2.stride(0), x2.stride(0), dx.stride(0), n_rows, d, rows_per_program,
                    HAS_PRE=pre_affine is not None, BLOCK_M=block_m, BLOCK_D=block,
                    num_warps=num_warps_for(block * block_m),
                )
        else:
            dw_part.zero_()
            if dpre_part is not None:
                dpre_part.zero_()
        dweight = dw_part.sum(0).to(weight.dtype)
        dpre = dpre_part.sum(0).to(pre_affine.dtype) if pre_affine is not None else None
        return dx.view(ctx.x_shape), dweight, dpre, None


def pre_affine_rms_norm_triton(x, weight, pre_affine, eps):
    """λ ⊙ N(λ1 ⊙ x) through the fused kernels (CUDA tensors, or any tensor under TRITON_INTERPRET=1)."""
    return PreAffineRMSNormFunction.apply(x, weight, pre_affine, eps)
