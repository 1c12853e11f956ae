"""Fused frozen-context RMSNorm update: Triton kernels, their launchers, and the eager math.

One Picard step of the frozen-context cell, per row of ``d`` features::

    z      = signal + frozen                       # frozen: injection + context + bias
    rstd   = 1 / sqrt(mean(z**2) + eps)
    y      = gain * z * rstd
    h_next = (1 - damping) * h_prev + damping * y
    residual = deqkern.ops.residual: ||h_next - h_prev|| ("abs"), that over ||h_next||
               ("rel"), or max |h_next - h_prev| ("max"); overflow-safe, NaN for a bad row

All arithmetic, and every reduction, is float32 whatever the storage dtype (float64 in
the eager path for float64 inputs). The residual is computed from the float32 value of
``h_next`` before it is rounded to the storage dtype, and is NaN for a row holding any
NaN or Inf, so a device-side convergence test can never mistake a blow-up for
convergence.

``update_reference`` / ``update_backward_reference`` are the eager path and the single
source of truth that tests compare the kernels with (in float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.ops.launch import STOP_MODES, cdiv, compute_dtype, frozen_rows, launch_config, rows, sm_count
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl

__all__ = ["update_forward_triton", "update_backward_triton", "update_reference", "update_backward_reference",
           "STOP_MODES"]


@triton.jit
def _update_fwd_kernel(
    S, F, P, G, H, RES, RSTD,
    n_rows, d,
    stride_s, stride_f, stride_p, stride_h,
    eps, damping, rel_eps,
    STOP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: a tile of BLOCK_M rows x BLOCK_D (>= d) columns per program.

    Reads signal, frozen (row stride 0 when broadcast), h_prev and gain once; writes
    h_next, the per-row residual and rstd (both float32). Math in float32.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]

    s = tl.load(S + r64 * stride_s + c, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + r64 * stride_f + c, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + r64 * stride_p + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)

    z = s + f
    rstd = tl.rsqrt(tl.sum(z * z, axis=1) / d + eps)
    y = z * rstd[:, None] * g[None, :]
    h = (1.0 - damping) * p + damping * y
    tl.store(H + r64 * stride_h + c, h.to(H.dtype.element_ty), mask=mask)

    diff = tl.where(mask, h - p, 0.0)
    res = row_residual_tl(diff, tl.where(mask, h, 0.0), rel_eps, STOP_MODE)
    tl.store(RES + rows, res, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _update_bwd_kernel(
    DH, S, F, G, RSTD, DZ, DF, DP, DG_PART, DF_PART,
    n_rows, d, rows_per_program,
    stride_dh, stride_s, stride_f, stride_dz, stride_df, stride_dp,
    damping,
    HAS_DP: tl.constexpr, STORE_DF: tl.constexpr, REDUCE_DF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward over a contiguous range of rows per program (float32 math).

    With n = z * rstd and dy = damping * dh:
      dz      = rstd * (dy*g - n * mean(dy*g*n))   -> d_signal, and d_frozen per row
      d_h_prev = (1 - damping) * dh
      d_gain  = sum_rows dy * n                     -> this program's fp32 partial
      d_frozen (broadcast) = sum_rows dz            -> this program's fp32 partial
    Partials are summed on the host side of the launch: deterministic, no atomics.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    c = cols[None, :]
    g = tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)
    dg_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    df_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dh = tl.load(DH + r64 * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + r64 * stride_s + c, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(F + r64 * stride_f + c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        n = (s + f) * rstd[:, None]
        dy = damping * dh
        dyg = dy * g[None, :]
        proj = tl.sum(dyg * n, axis=1) / d
        dz = rstd[:, None] * (dyg - n * proj[:, None])
        tl.store(DZ + r64 * stride_dz + c, dz.to(DZ.dtype.element_ty), mask=mask)
        if STORE_DF:
            tl.store(DF + r64 * stride_df + c, dz.to(DF.dtype.element_ty), mask=mask)
        if HAS_DP:
            tl.store(DP + r64 * stride_dp + c, ((1.0 - damping) * dh).to(DP.dtype.element_ty), mask=mask)
        dg_acc += tl.sum(dy * n, axis=0)
        if REDUCE_DF:
            df_acc += tl.sum(dz, axis=0)
    tl.store(DG_PART + pid * d + cols, dg_acc, mask=col_ok)
    if REDUCE_DF:
        tl.store(DF_PART + pid * d + cols, df_acc, mask=col_ok)


def update_forward_triton(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns h_next (signal's shape and dtype), residual and
    rstd (float32, shape ``signal.shape[:-1]``)."""
    d = signal.shape[-1]
    lead = signal.shape[:-1]
    s, p = rows(signal, d), rows(h_prev, d)
    f, stride_f = frozen_rows(frozen, d)
    g = gain.contiguous()
    n_rows = s.shape[0]
    h = torch.empty((n_rows, d), dtype=signal.dtype, device=signal.device)
    res = torch.empty(n_rows, dtype=torch.float32, device=signal.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=signal.device)
    if n_rows > 0:
        block_d, block_m, num_warps = launch_config(n_rows, d, signal.device.type == "cpu")
        grid = (cdiv(n_rows, block_m),)
        _update_fwd_kernel[grid](
            s, f, p, g, h, res, rstd,
            n_rows, d,
            s.stride(0), stride_f, p.stride(0), h.stride(0),
            float(eps), float(damping), REL_EPS,
            STOP_MODE=STOP_MODES[stop_mode], BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=num_warps,
        )
    if len(lead) == 1:
        return h, res, rstd
    return h.view(*lead, d), res.view(lead), rstd.view(lead)


def update_backward_triton(
    grad_h: torch.Tensor, signal: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor,
    rstd: torch.Tensor, damping: float, need_frozen: bool, need_h_prev: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns d_signal, d_frozen (frozen's shape; empty when
    not needed), d_h_prev (empty when not needed) and d_gain (gain's dtype)."""
    d = signal.shape[-1]
    lead = signal.shape[:-1]
    device = signal.device
    dh, s = rows(grad_h, d), rows(signal, d)
    f, stride_f = frozen_rows(frozen, d)
    n_rows = s.shape[0]
    broadcast = frozen.dim() == 1
    store_df = need_frozen and not broadcast
    reduce_df = need_frozen and broadcast
    dz = torch.empty((n_rows, d), dtype=signal.dtype, device=device)
    df = torch.empty((n_rows, d) if store_df else (0,), dtype=frozen.dtype, device=device)
    dp = torch.empty((n_rows, d) if need_h_prev else (0,), dtype=grad_h.dtype, device=device)

    interpreted = device.type == "cpu"
    block_d, block_m, num_warps = launch_config(n_rows, d, interpreted)
    max_programs = 4 if interpreted else 4 * sm_count(device.index or 0)
    n_programs = max(1, min(cdiv(n_rows, block_m), max_programs))
    rows_per_program = cdiv(cdiv(max(n_rows, 1), n_programs), block_m) * block_m
    dg_part = torch.empty((n_programs, d), dtype=torch.float32, device=device)
    df_part = torch.empty((n_programs, d) if reduce_df else (0,), dtype=torch.float32, device=device)
    _update_bwd_kernel[(n_programs,)](
        dh, s, f, gain.contiguous(), rstd.reshape(-1).contiguous(), dz, df, dp, dg_part, df_part,
        n_rows, d, rows_per_program,
        dh.stride(0), s.stride(0), stride_f, dz.stride(0), d if store_df else 0, d if need_h_prev else 0,
        float(damping),
        HAS_DP=need_h_prev, STORE_DF=store_df, REDUCE_DF=reduce_df,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    d_gain = dg_part.sum(0).to(gain.dtype)
    if reduce_df:
        d_frozen = df_part.sum(0).to(frozen.dtype)
    elif store_df:
        d_frozen = df.view(*lead, d)
    else:
        d_frozen = df
    return dz.view(*lead, d), d_frozen, dp.view(*lead, d) if need_h_prev else dp, d_gain


def update_reference(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager path: same outputs as :func:`update_forward_triton`.

    Differentiable by torch autograd, which the tests use (in float64) to check both
    backward implementations.
    """
    ct = compute_dtype(signal)
    p = h_prev.to(ct)
    z = signal.to(ct) + frozen.to(ct)
    rstd = torch.rsqrt(z.pow(2).mean(-1) + eps)
    y = z * rstd.unsqueeze(-1) * gain.to(ct)
    h = (1.0 - damping) * p + damping * y
    return h.to(signal.dtype), row_residual(h, p, stop_mode).detach(), rstd  # float64 stays float64: backward reuses it


def update_backward_reference(
    grad_h: torch.Tensor, signal: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor,
    rstd: torch.Tensor, damping: float, need_frozen: bool, need_h_prev: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager backward, the same closed form as the kernel (see its docstring)."""
    ct = compute_dtype(signal)
    rs = rstd.to(ct).unsqueeze(-1)
    n = (signal.to(ct) + frozen.to(ct)) * rs
    dy = damping * grad_h.to(ct)
    dyg = dy * gain.to(ct)
    dz = rs * (dyg - n * (dyg * n).mean(-1, keepdim=True))
    d_gain = (dy * n).reshape(-1, signal.shape[-1]).sum(0).to(gain.dtype)
    empty = signal.new_empty((0,))
    if not need_frozen:
        d_frozen = empty.to(frozen.dtype)
    elif frozen.dim() == 1:
        d_frozen = dz.reshape(-1, signal.shape[-1]).sum(0).to(frozen.dtype)
    else:
        d_frozen = dz.to(frozen.dtype, copy=True)
    # A fresh empty tensor, not `empty` again: a custom op's outputs must not alias.
    d_h_prev = ((1.0 - damping) * grad_h.to(ct)).to(grad_h.dtype) if need_h_prev else grad_h.new_empty((0,))
    return dz.to(signal.dtype), d_frozen, d_h_prev, d_gain
