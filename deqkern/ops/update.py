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

from deqkern.ops.adjoint import rmsnorm_vjp_tl
from deqkern.ops.launch import (AS_IS, GPU_STREAM_TILE, STOP_MODES, Launch, as_rows, cdiv, compute_dtype,
                                launch_config, row_mode, sm_count)
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl

__all__ = ["UpdatePlan", "EagerUpdate", "update_reference", "update_backward_reference", "STOP_MODES"]


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
    DH, S, F, G, RSTD, DZ, DF, DP, DG_OUT, DF_OUT,
    n_rows, d, rows_per_program, df_offset,
    stride_dh, stride_s, stride_f, stride_dz, stride_df, stride_dp,
    damping,
    HAS_DP: tl.constexpr, STORE_DF: tl.constexpr, REDUCE_DF: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward over a contiguous range of rows per program (float32 math).

    With n = z * rstd and dy = damping * dh:
      dz      = rstd * (dy*g - n * mean(dy*g*n))   -> d_signal, and d_frozen per row
      d_h_prev = (1 - damping) * dh
      d_gain  = sum_rows dy * n
      d_frozen (broadcast) = sum_rows dz
    The column sums accumulate in float32 per program. PARTIAL: each program stores its
    sums in row ``pid`` of the float32 partial buffer (d_gain's rows at DG_OUT, d_frozen's
    ``df_offset`` elements further), which :func:`_sum_partials_kernel` reduces in a fixed
    order (deterministic, no atomics); otherwise the grid is one program and it stores the
    final d_gain / d_frozen in their own dtypes.
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
        dz = rmsnorm_vjp_tl(dy * g[None, :], n, rstd, d)
        tl.store(DZ + r64 * stride_dz + c, dz.to(DZ.dtype.element_ty), mask=mask)
        if STORE_DF:
            tl.store(DF + r64 * stride_df + c, dz.to(DF.dtype.element_ty), mask=mask)
        if HAS_DP:
            tl.store(DP + r64 * stride_dp + c, ((1.0 - damping) * dh).to(DP.dtype.element_ty), mask=mask)
        dg_acc += tl.sum(dy * n, axis=0)
        if REDUCE_DF:
            df_acc += tl.sum(dz, axis=0)
    if PARTIAL:
        out = pid * d + cols
    else:
        out = cols
    tl.store(DG_OUT + out, dg_acc.to(DG_OUT.dtype.element_ty), mask=col_ok)
    if REDUCE_DF:
        tl.store(DF_OUT + df_offset + out, df_acc.to(DF_OUT.dtype.element_ty), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    PART, DG, DF, n_parts, d,
    REDUCE_DF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column sums of the ``(n_parts, d)`` float32 partials of d_gain (at PART) and, with
    REDUCE_DF, of d_frozen (the next ``n_parts * d`` values), cast to the outputs' dtypes. One program per BLOCK_C columns;
    the order of the sum is fixed by the grid, so the result is deterministic."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < d
    dg = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    df = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p in range(0, n_parts, BLOCK_P):
        parts = p + tl.arange(0, BLOCK_P)
        mask = (parts < n_parts)[:, None] & col_ok[None, :]
        offs = parts.to(tl.int64)[:, None] * d + cols[None, :]
        dg += tl.load(PART + offs, mask=mask, other=0.0)
        if REDUCE_DF:
            df += tl.load(PART + n_parts * d + offs, mask=mask, other=0.0)
    tl.store(DG + cols, tl.sum(dg, axis=0).to(DG.dtype.element_ty), mask=col_ok)
    if REDUCE_DF:
        tl.store(DF + cols, tl.sum(df, axis=0).to(DF.dtype.element_ty), mask=col_ok)


#: Backward programs per SM: a few resident programs per SM keep enough loads in flight
#: for the row loop to run at memory bandwidth; more would only add partial rows to sum.
BWD_PROGRAMS_PER_SM = 4
#: Under the interpreter each program costs milliseconds: at most this many.
INTERPRETER_BWD_PROGRAMS = 4
#: Partial rows x columns per step of :func:`_sum_partials_kernel` (4K values, like GPU_TILE).
SUM_BLOCK_P, SUM_BLOCK_C = 32, 128


class UpdatePlan:
    """The fused update's host work for one call signature (shapes, strides, dtypes,
    device, eps, damping, stop_mode), done once: how each input becomes kernel rows, the
    output shapes, every launch configuration. ``forward`` / ``backward`` then only
    allocate the outputs and launch (:class:`deqkern.ops.launch.Launch`)."""

    def __init__(self, signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
                 eps: float, damping: float, stop_mode: str):
        d = signal.shape[-1]
        self.d, self.shape, self.lead = d, signal.shape, signal.shape[:-1]
        self.n_rows = n_rows = self.lead.numel()
        self.dtype, self.device, self.damping = signal.dtype, signal.device, damping
        self.frozen_shape, self.frozen_dtype, self.gain_dtype = frozen.shape, frozen.dtype, gain.dtype
        self.broadcast = frozen.dim() == 1
        self.modes = [row_mode(t) for t in (signal, frozen, h_prev, gain)]
        # Row strides after as_rows (COPY: of the copy, which depends on shape and strides only).
        s, f, p = (as_rows(t, mode, d) for t, mode in zip((signal, frozen, h_prev), self.modes))
        self.stride_s, self.stride_f, stride_p = s.stride(0), 0 if self.broadcast else f.stride(0), p.stride(0)
        self.interpreted = signal.device.type == "cpu"
        self.backend = "triton-interpreter" if self.interpreted else "triton"
        self.block_d, self.block_m, self.num_warps = launch_config(n_rows, d, self.interpreted)
        # the forward only streams its rows: smaller tiles in fewer warps (GPU_STREAM_TILE)
        _, block_m, num_warps = launch_config(n_rows, d, self.interpreted, GPU_STREAM_TILE)
        self.forward_launch = Launch(
            _update_fwd_kernel, (cdiv(n_rows, block_m),),
            (n_rows, d, self.stride_s, self.stride_f, stride_p, d, float(eps), float(damping), REL_EPS,
             STOP_MODES[stop_mode], block_m, self.block_d),
            num_warps, signal.device)
        self.backward_launches: dict[tuple[bool, bool], tuple] = {}

    def forward(self, signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h_next (signal's shape and dtype, contiguous), residual and rstd (float32,
        ``signal.shape[:-1]``)."""
        d, (ms, mf, mp, mg) = self.d, self.modes
        h = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        res = torch.empty(self.lead, dtype=torch.float32, device=self.device)
        rstd = torch.empty(self.lead, dtype=torch.float32, device=self.device)
        if self.n_rows:
            self.forward_launch(signal if ms == AS_IS else as_rows(signal, ms, d),
                                frozen if mf == AS_IS else as_rows(frozen, mf, d),
                                h_prev if mp == AS_IS else as_rows(h_prev, mp, d),
                                gain if mg == AS_IS else gain.contiguous(), h, res, rstd)
        return h, res, rstd

    def backward(self, grad_h: torch.Tensor, signal: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor,
                 rstd: torch.Tensor, need_frozen: bool, need_h_prev: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """d_signal, d_frozen (frozen's shape; empty when not needed), d_h_prev (empty when
        not needed) and d_gain (gain's dtype): one launch, two when several programs'
        partial sums must be added."""
        launches = self.backward_launches.get((need_frozen, need_h_prev))
        if launches is None:
            launches = self.backward_launches[(need_frozen, need_h_prev)] = self._backward_launches(
                need_frozen, need_h_prev)
        main, reduce, n_parts = launches
        d, device, (ms, mf, _, mg) = self.d, self.device, self.modes
        store_df, reduce_df = need_frozen and not self.broadcast, need_frozen and self.broadcast
        dz = torch.empty(self.shape, dtype=self.dtype, device=device)
        d_frozen = torch.empty(self.shape if store_df else (d,) if reduce_df else (0,), dtype=self.frozen_dtype,
                               device=device)
        d_h_prev = torch.empty(self.shape if need_h_prev else (0,), dtype=self.dtype, device=device)
        d_gain = torch.empty((d,), dtype=self.gain_dtype, device=device)
        dh = grad_h if grad_h.is_contiguous() else grad_h.contiguous()
        inputs = (dh, as_rows(signal, ms, d), as_rows(frozen, mf, d), gain if mg == AS_IS else gain.contiguous(),
                  rstd if rstd.is_contiguous() else rstd.contiguous(), dz, d_frozen, d_h_prev)
        if reduce is None:
            main(*inputs, d_gain, d_frozen)
        else:
            parts = torch.empty((2 if reduce_df else 1, n_parts, d), dtype=torch.float32, device=device)
            main(*inputs, parts, parts)
            reduce(parts, d_gain, d_frozen)
        return dz, d_frozen, d_h_prev, d_gain

    def _backward_launches(self, need_frozen: bool, need_h_prev: bool) -> tuple:
        n_rows, d, block_m = self.n_rows, self.d, self.block_m
        store_df, reduce_df = need_frozen and not self.broadcast, need_frozen and self.broadcast
        max_programs = (INTERPRETER_BWD_PROGRAMS if self.interpreted
                        else BWD_PROGRAMS_PER_SM * sm_count(self.device.index or 0))
        # As many programs as there are row tiles, up to max_programs: no program without
        # rows, so small N gets few partial rows (one program: no second launch at all).
        n_programs = max(1, min(cdiv(n_rows, block_m), max_programs))
        rows_per_program = cdiv(cdiv(max(n_rows, 1), n_programs), block_m) * block_m
        partial = n_programs > 1
        main = Launch(
            _update_bwd_kernel, (n_programs,),
            (n_rows, d, rows_per_program, n_programs * d if partial else 0, d, self.stride_s, self.stride_f, d, d if store_df else 0,
             d if need_h_prev else 0, float(self.damping),
             need_h_prev, store_df, reduce_df, partial, block_m, self.block_d),
            self.num_warps, self.device)
        if not partial:
            return main, None, 1
        block_c = min(SUM_BLOCK_C, self.block_d)
        reduce = Launch(_sum_partials_kernel, (cdiv(d, block_c),),
                        (n_programs, d, reduce_df, SUM_BLOCK_P, block_c), 4, self.device)
        return main, reduce, n_programs


class EagerUpdate:
    """The eager backend's counterpart of :class:`UpdatePlan` (same methods and outputs)."""

    backend = "eager"

    def __init__(self, eps: float, damping: float, stop_mode: str):
        self.eps, self.damping, self.stop_mode = eps, damping, stop_mode

    def forward(self, signal, frozen, h_prev, gain):
        h, res, rstd = update_reference(signal, frozen, h_prev, gain, self.eps, self.damping, self.stop_mode)
        return h.contiguous(), res, rstd

    def backward(self, grad_h, signal, frozen, gain, rstd, need_frozen, need_h_prev):
        return update_backward_reference(grad_h, signal, frozen, gain, rstd, self.damping, need_frozen, need_h_prev)


def update_reference(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager path: same outputs as :meth:`UpdatePlan.forward`.

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
