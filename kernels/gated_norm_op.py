"""Fused GatedNorm (RMSNorm + low-rank sigmoid gate, optionally PreAffine in front) in Triton.

Math (DESIGN §3, §6), per row x ∈ R^d, everything in fp32 whatever the input dtype:

    u    = λ1 ⊙ x                       (PreAffine, optional)
    rstd = 1 / sqrt(mean(u²) + ε)
    n    = u · rstd,   y = λ ⊙ n
    a    = W_down y     (r)             W_down ∈ R^{r×d}
    h    = silu(a)      (r)
    g    = σ(W_up h)    (d)             W_up ∈ R^{d×r}
    out  = g ⊙ y

Backward, per row, given dout:

    dz   = (dout ⊙ y) ⊙ g(1−g)                       dW_up   += dz hᵀ
    da   = (W_upᵀ dz) ⊙ σ(a)(1 + a(1−σ(a)))          dW_down += da yᵀ
    dy   = dout ⊙ g + W_downᵀ da                     dλ      += dy ⊙ n
    dn   = dy ⊙ λ
    c    = mean(dn ⊙ n)
    du   = rstd · (dn − n·c)                         dλ1     += du ⊙ x
    dx   = du ⊙ λ1

The reference (`gated_norm_reference` in surgeon/modeling/modeling_surgeon.py) is the definition; these kernels
compute every step in fp32, so in bf16 they differ from it (the reference rounds n, y, a, h, g to bf16) by a
few bf16 ulps — and sit closer to the exact value.

Kernels, one forward and two backward:

  _gated_norm_fwd_kernel         one row per program at model widths (d ≥ 2048; BLOCK_M rows of a narrow row
                                 tensor per program, see block_m_for), the whole row in registers (BLOCK_D =
                                 next_pow2(d), masked). x is read once and out written once; only rstd (1 fp32)
                                 and a (r fp32) are saved per row. W_down and Wᵀ_up are walked in chunks of
                                 BLOCK_R gate channels, so a program never holds more than a BLOCK_M × BLOCK_R ×
                                 BLOCK_D product tile; all programs read the same 2·r·d weights, which therefore
                                 stay in L1/L2 rather than coming from DRAM each time.
  _gated_norm_bwd_row_kernel     same layout: recomputes y, g from x, rstd, a; produces dx and the two per-row
                                 reductions the weight gradients need — da (r) and c (1), both tiny.
  _gated_norm_bwd_weight_kernel  the four weight gradients. A (column-block × program) grid; each program owns a
                                 range of rows (Liger's fixed grid of programs looping over rows) and a block of
                                 BLOCK_C columns, recomputes dz, dy, du for BLOCK_M rows at a time from x, dout,
                                 rstd, a, da, c, and accumulates dλ, dλ1, dW_down[:, cols], dW_up[cols, :] in
                                 registers as small matrix products (tl.dot, every dim ≥ 16: BLOCK_M = 32,
                                 BLOCK_C = 64, rank padded to ≥ 16). Partials are written once, shape
                                 (programs, …), and summed once by torch. No atomics: deterministic.

Why the weight gradients get their own kernel: accumulating dW_down and dW_up (each r×d) per program in the
row kernel needs 2·r·BLOCK_D fp32 accumulators — 64k registers at d = 2048, r = 16, beyond one SM — whereas a
column block needs 2·r·BLOCK_C. The price is reading x and dout a second time: the backward moves 5 row-sized
tensors instead of the minimal 3, and fwd + bwd moves 7 instead of 5 (1.4× the floor at best).

Design limits worth knowing (no GPU was available when this was written, so they are estimates): the one-row
programs re-read the 2·r·d gate weights for every row from cache (L1/L2), about 32 weight reads per output
element at r = 16. On a GPU that makes the forward and the row backward cache-bandwidth-bound rather than
DRAM-bound. If the GPU benchmark misses its floor target, the next step is row blocks of ≥ 16 rows per program
with tl.dot over d-chunks, which reuses each weight tile across the block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    as_rows,
    block_m_for,
    check_row_width,
    check_vector,
    device_guard,
    num_programs,
    num_warps_for,
)

# Row kernels hold a [BLOCK_M, BLOCK_R, BLOCK_D] product tile at once; this many fp32 elements at most (32
# registers per thread at 8 warps). Tests lower it to exercise the rank loop with a ragged last chunk.
GATE_TILE_BUDGET = 8192
# Weight-gradient kernel tiles: tl.dot needs ≥ 16 in every dimension.
BLOCK_M = 32
BLOCK_C = 64
MIN_DOT = 16


def block_r_for(rank: int, block_m: int, block_d: int) -> int:
    return max(1, min(triton.next_power_of_2(rank), GATE_TILE_BUDGET // (block_m * block_d)))


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _gated_norm_fwd_kernel(
    X, W, PRE, WD, WUT, OUT, RSTD, A,
    stride_x, stride_out, n_rows, n_cols, rank, eps,
    HAS_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # BLOCK_M rows per program: 1 at model widths, a few when rows are narrow (see block_m_for).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows < n_rows
    rows64 = rows.to(tl.int64)  # int64: rows × stride can pass 2^31 at model sizes
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    xmask = mmask[:, None] & cmask[None, :]
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=xmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_PRE:
        u = x * tl.load(PRE + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        u = x
    # Padded columns are 0, so sum/n_cols is the mean over the d real columns.
    rstd = tl.rsqrt(tl.sum(u * u, axis=1) / n_cols + eps)                       # [M]
    y = w[None, :] * (u * rstd[:, None])                                         # [M, D]

    # a = W_down y and z = W_up silu(a), BLOCK_R gate channels at a time: channel j's h_j only feeds z through
    # column j of W_up (row j of Wᵀ_up), so z is accumulated chunk by chunk in this one pass over the weights.
    # Broadcast-multiply-and-sum rather than tl.dot: no ≥ 16 shape rule, so one row per program stays legal.
    rr = tl.arange(0, BLOCK_R)
    z = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ridx = r0 + rr
        rmask = ridx < rank
        wmask = rmask[:, None] & cmask[None, :]
        woffs = ridx[:, None] * n_cols + cols[None, :]
        wd = tl.load(WD + woffs, mask=wmask, other=0.0).to(tl.float32)           # [R, D]
        a = tl.sum(wd[None, :, :] * y[:, None, :], axis=2)                       # [M, R]
        tl.store(A + rows64[:, None] * rank + ridx[None, :], a, mask=mmask[:, None] & rmask[None, :])
        h = a * tl.sigmoid(a)                     # padded channels: a = 0 → h = 0, no contribution
        wut = tl.load(WUT + woffs, mask=wmask, other=0.0).to(tl.float32)         # [R, D]
        z += tl.sum(wut[None, :, :] * h[:, :, None], axis=1)                     # [M, D]
    out = y * tl.sigmoid(z)
    tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=xmask)
    tl.store(RSTD + rows64, rstd, mask=mmask)


@triton.jit
def _gated_norm_bwd_row_kernel(
    DOUT, X, W, PRE, WD, WUT, RSTD, A, DX, DA, C,
    stride_dout, stride_x, stride_dx, n_rows, n_cols, rank,
    HAS_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    xmask = mmask[:, None] & cmask[None, :]
    # Masked rows and columns load 0 (x, dout, rstd, a), so everything derived from them is 0 there too.
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=xmask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + rows64[:, None] * stride_dout + cols[None, :], mask=xmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre = tl.load(PRE + cols, mask=cmask, other=0.0).to(tl.float32)
        u = x * pre[None, :]
    else:
        u = x
    rstd = tl.load(RSTD + rows64, mask=mmask, other=0.0)
    n = u * rstd[:, None]
    y = w[None, :] * n

    # Recompute g from the saved r-vector a (cheaper to keep than the d-vector g).
    rr = tl.arange(0, BLOCK_R)
    z = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ridx = r0 + rr
        rmask = ridx < rank
        a = tl.load(A + rows64[:, None] * rank + ridx[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        wut = tl.load(WUT + ridx[:, None] * n_cols + cols[None, :],
                      mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        z += tl.sum(wut[None, :, :] * (a * tl.sigmoid(a))[:, :, None], axis=1)
    g = tl.sigmoid(z)
    dz = dout * y * g * (1.0 - g)

    # da needs all of dz (a reduction over d), hence this second pass over the gate channels.
    dy = dout * g
    for r0 in range(0, rank, BLOCK_R):
        ridx = r0 + rr
        rmask = ridx < rank
        amask = mmask[:, None] & rmask[None, :]
        wmask = rmask[:, None] & cmask[None, :]
        woffs = ridx[:, None] * n_cols + cols[None, :]
        a = tl.load(A + rows64[:, None] * rank + ridx[None, :], mask=amask, other=0.0)
        s = tl.sigmoid(a)
        wut = tl.load(WUT + woffs, mask=wmask, other=0.0).to(tl.float32)
        # silu'(a) = σ(a)(1 + a(1 − σ(a)))
        da = tl.sum(wut[None, :, :] * dz[:, None, :], axis=2) * (s * (1.0 + a * (1.0 - s)))     # [M, R]
        tl.store(DA + rows64[:, None] * rank + ridx[None, :], da, mask=amask)
        wd = tl.load(WD + woffs, mask=wmask, other=0.0).to(tl.float32)
        dy += tl.sum(wd[None, :, :] * da[:, :, None], axis=1)

    dn = dy * w[None, :]
    c = tl.sum(dn * n, axis=1) / n_cols
    du = rstd[:, None] * (dn - n * c[:, None])
    if HAS_PRE:
        dx = du * pre[None, :]
    else:
        dx = du
    tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=xmask)
    tl.store(C + rows64, c, mask=mmask)


@triton.jit
def _gated_norm_bwd_weight_kernel(
    DOUT, X, W, PRE, WD, WUT, RSTD, A, DA, C,
    DW_PART, DPRE_PART, DWD_PART, DWU_PART,
    stride_dout, stride_x, n_rows, n_cols, rank, rows_per_program,
    HAS_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    rr = tl.arange(0, BLOCK_R)                               # rank padded to ≥ 16 for tl.dot
    rmask = rr < rank
    wmask = rmask[:, None] & cmask[None, :]
    woffs = rr[:, None] * n_cols + cols[None, :]
    # This program's slice of every parameter, read once and kept in registers across all its rows.
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre = tl.load(PRE + cols, mask=cmask, other=0.0).to(tl.float32)
    wd = tl.load(WD + woffs, mask=wmask, other=0.0).to(tl.float32)       # [R, C]
    wut = tl.load(WUT + woffs, mask=wmask, other=0.0).to(tl.float32)     # [R, C]

    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dpre_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dwd_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)              # rows of dW_down, these columns
    dwu_acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)              # these rows of dW_up

    row_start = pid_p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    mm = tl.arange(0, BLOCK_M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + mm
        mmask = rows < row_end
        rows64 = rows.to(tl.int64)
        xmask = mmask[:, None] & cmask[None, :]
        amask = mmask[:, None] & rmask[None, :]
        # Masked rows and columns load 0: then h, da, dout, n are 0 there and contribute nothing below.
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=xmask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + rows64[:, None] * stride_dout + cols[None, :], mask=xmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows64, mask=mmask, other=0.0)
        c = tl.load(C + rows64, mask=mmask, other=0.0)
        a = tl.load(A + rows64[:, None] * rank + rr[None, :], mask=amask, other=0.0)      # [M, R]
        da = tl.load(DA + rows64[:, None] * rank + rr[None, :], mask=amask, other=0.0)    # [M, R]
        if HAS_PRE:
            u = x * pre[None, :]
        else:
            u = x
        n = u * rstd[:, None]
        y = n * w[None, :]
        h = a * tl.sigmoid(a)
        g = tl.sigmoid(tl.dot(h, wut, input_precision=DOT_PRECISION))                    # [M, C]
        dz = dout * y * g * (1.0 - g)
        dy = dout * g + tl.dot(da, wd, input_precision=DOT_PRECISION)
        dw_acc += tl.sum(dy * n, axis=0)
        if HAS_PRE:
            dn = dy * w[None, :]
            du = rstd[:, None] * (dn - n * c[:, None])
            dpre_acc += tl.sum(du * x, axis=0)
        dwu_acc += tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION)                # [C, M] × [M, R]
        dwd_acc += tl.dot(tl.trans(da), y, input_precision=DOT_PRECISION)                # [R, M] × [M, C]

    # Every program writes its whole partial (zeros if it owned no rows), so the buffers can be torch.empty.
    tl.store(DW_PART + pid_p * n_cols + cols, dw_acc, mask=cmask)
    if HAS_PRE:
        tl.store(DPRE_PART + pid_p * n_cols + cols, dpre_acc, mask=cmask)
    part = pid_p.to(tl.int64) * rank * n_cols
    tl.store(DWD_PART + part + woffs, dwd_acc, mask=wmask)
    tl.store(DWU_PART + part + cols[:, None] * rank + rr[None, :], dwu_acc, mask=cmask[:, None] & rmask[None, :])


# ----------------------------------------------------------------------------- autograd


class GatedNormFunction(torch.autograd.Function):
    """out = σ(W_up silu(W_down y)) ⊙ y with y = λ ⊙ N(λ1 ⊙ x); `pre_affine` may be None."""

    @staticmethod
    def forward(ctx, x, weight, w_down, w_up, pre_affine, eps):
        d = x.shape[-1]
        rank = w_down.shape[0]
        check_row_width(d)
        check_vector("weight", weight, d)
        check_vector("pre_affine", pre_affine, d)
        if w_down.dim() != 2 or tuple(w_up.shape) != (d, rank) or w_down.shape[1] != d:
            raise ValueError(f"w_down must be (r, {d}) and w_up ({d}, r); got {tuple(w_down.shape)} and "
                             f"{tuple(w_up.shape)}")
        x2 = as_rows(x, d)
        n_rows = x2.shape[0]
        # The reference's output dtype: y = weight * normed.to(x.dtype), then y * gate with the gate in y's dtype.
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype),
                                        torch.promote_types(w_down.dtype, w_up.dtype))
        out = torch.empty((n_rows, d), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        a = torch.empty((n_rows, rank), dtype=torch.float32, device=x.device)
        w_down = w_down.contiguous()
        # W_up transposed to (r, d) so both weight tiles are read along d, coalesced; r × d is small.
        w_up_t = w_up.t().contiguous()
        block_d = triton.next_power_of_2(d)
        block_m = block_m_for(block_d, n_rows)
        if n_rows:
            with device_guard(x):
                _gated_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                    x2, weight, pre_affine if pre_affine is not None else weight, w_down, w_up_t, out, rstd, a,
                    x2.stride(0), out.stride(0), n_rows, d, rank, eps,
                    HAS_PRE=pre_affine is not None, BLOCK_M=block_m, BLOCK_D=block_d,
                    BLOCK_R=block_r_for(rank, block_m, block_d), num_warps=num_warps_for(block_m * block_d),
                )
        ctx.save_for_backward(x2, weight, pre_affine, w_down, w_up_t, rstd, a)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.w_up_dtype = w_up.dtype
        return out.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, dout):
        x2, weight, pre_affine, w_down, w_up_t, rstd, a = ctx.saved_tensors
        n_rows, d = x2.shape
        rank = w_down.shape[0]
        device = x2.device
        has_pre = pre_affine is not None
        pre_arg = pre_affine if has_pre else weight
        dout2 = as_rows(dout, d)
        block_d = triton.next_power_of_2(d)

        dx = torch.empty((n_rows, d), dtype=ctx.x_dtype, device=device)
        da = torch.empty((n_rows, rank), dtype=torch.float32, device=device)
        c = torch.empty(n_rows, dtype=torch.float32, device=device)

        # Fixed grid for the weight gradients: enough (column-block × row-range) programs to fill the machine,
        # no more, so the (programs, …) partials stay small.
        col_blocks = triton.cdiv(d, BLOCK_C)
        row_blocks = max(1, triton.cdiv(n_rows, BLOCK_M))
        programs = max(1, min(row_blocks, triton.cdiv(2 * num_programs(device), col_blocks)))
        # Whole BLOCK_M tiles per program, so only the last program has a ragged tile.
        rows_per_program = triton.cdiv(row_blocks, programs) * BLOCK_M
        programs = max(1, triton.cdiv(n_rows, rows_per_program))
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=device)
        dpre_part = torch.empty((programs, d), dtype=torch.float32, device=device) if has_pre else dw_part
        dwd_part = torch.empty((programs, rank, d), dtype=torch.float32, device=device)
        dwu_part = torch.empty((programs, d, rank), dtype=torch.float32, device=device)

        if n_rows:
            with device_guard(x2):
                block_m = block_m_for(block_d, n_rows)
                _gated_norm_bwd_row_kernel[(triton.cdiv(n_rows, block_m),)](
                    dout2, x2, weight, pre_arg, w_down, w_up_t, rstd, a, dx, da, c,
                    dout2.stride(0), x2.stride(0), dx.stride(0), n_rows, d, rank,
                    HAS_PRE=has_pre, BLOCK_M=block_m, BLOCK_D=block_d,
                    BLOCK_R=block_r_for(rank, block_m, block_d), num_warps=num_warps_for(block_m * block_d),
                )
                # fp32 inputs get exact fp32 products; for bf16/fp16 inputs (8/11 significant bits) tf32 tensor
                # cores (11 bits) lose nothing that matters. The interpreter computes in full fp32 either way.
                precision = "ieee" if ctx.x_dtype == torch.float32 else "tf32"
                if any(ctx.needs_input_grad[1:5]):  # skipped when every parameter is frozen
                    _gated_norm_bwd_weight_kernel[(col_blocks, programs)](
                        dout2, x2, weight, pre_arg, w_down, w_up_t, rstd, a, da, c,
                        dw_part, dpre_part, dwd_part, dwu_part,
                        dout2.stride(0), x2.stride(0), n_rows, d, rank, rows_per_program,
                        HAS_PRE=has_pre, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
                        BLOCK_R=max(MIN_DOT, triton.next_power_of_2(rank)), DOT_PRECISION=precision,
                        num_warps=4,
                    )
        else:
            for t in (dw_part, dpre_part, dwd_part, dwu_part):
                t.zero_()

        needs = ctx.needs_input_grad
        dweight = dw_part.sum(0).to(weight.dtype) if needs[1] else None
        dw_down = dwd_part.sum(0).to(w_down.dtype) if needs[2] else None
        dw_up = dwu_part.sum(0).to(ctx.w_up_dtype) if needs[3] else None
        dpre = dpre_part.sum(0).to(pre_affine.dtype) if has_pre and needs[4] else None
        return dx.view(ctx.x_shape) if needs[0] else None, dweight, dw_down, dw_up, dpre, None


def gated_norm_triton(x, weight, w_down, w_up, eps, pre_affine=None):
    """σ(W_up silu(W_down y)) ⊙ y, y = λ ⊙ N(λ1 ⊙ x), through the fused kernels (CUDA tensors, or any tensor
    under TRITON_INTERPRET=1)."""
    return GatedNormFunction.apply(x, weight, w_down, w_up, pre_affine, eps)
