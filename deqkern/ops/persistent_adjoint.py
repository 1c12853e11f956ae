"""The adjoint solve of the frozen-context cell's implicit backward in one launch: the
persistent kernel, its launcher and its eager twin (the design: :mod:`deqkern.ops.persistent`).

At ``h*``, from ``g = v``: ``g <- v + J^T g`` with ``J^T g = (1 - damping) g + VJP_z(g) @ W``,
``VJP_z(g) = rstd * (dyg - n * mean(dyg * n))``, ``dyg = damping * gain * g``,
``n = z * rstd``, ``z = h* @ W.T + frozen`` (recomputed at the start, float32). ``g`` is
float32; ``dz = VJP_z(g)`` is rounded to W's dtype before its GEMM (as
:class:`deqkern.nn.cell_adjoint`). The stop test is always the relative residual, so it
does not depend on the loss's scale. The outputs also give the parameter gradients
without a recorded application of the cell: ``d_frozen = dz``, ``d_weight = dz.T @ h*``,
``d_gain = damping * sum_rows g * n``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from deqkern.ops.adjoint import rmsnorm_vjp_tl
from deqkern.ops.commit import FLT_MAX, RowState, commit_reference
from deqkern.ops.launch import cdiv, compute_dtype, frozen_rows, rows
from deqkern.ops.persistent import (any_active, block_check_tl, cell_rstd, cell_z, commit_state_tl, config_for,
                                    dot_args, init_state_tl, new_row_state, product_tl)
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl

__all__ = ["Adjoint", "adjoint_triton", "adjoint_reference"]

_REL: tl.constexpr = tl.constexpr(1)  # deqkern.ops.launch.STOP_MODES["rel"]


@triton.jit
def _vjp(g, z, rstd, gain, damping, d):
    """RMSNorm's VJP of the cell at ``z``: ``rstd * (dyg - n * mean(dyg * n))``."""
    return rmsnorm_vjp_tl(damping * g * gain[None, :], z * rstd[:, None], rstd, d)


@triton.jit
def _adjoint_kernel(
    HS, W, F, GAIN, V, G, DZ, Z, U, RSTD, RES, PREV, LOWEST, NSTEP, DGAIN_PART, CHECK,
    n_rows, d, stride_hs, stride_w, stride_f, stride_v,
    eps, damping, tol, max_iter, flt_max, rel_eps,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SUB_M: tl.constexpr, STAGES_B: tl.constexpr,
):
    """The adjoint solve of BLOCK_M rows (module docstring). First z* = h* W^T + frozen
    (Z, float32) and rstd* (RSTD) at h* = HS; then, from G = V, phase A forms
    U = DZ @ W (float32 scratch) and phase B the new G, its relative residual, the commit
    and DZ = VJP(G) (W's dtype). Finally this program's part of
    d_gain = damping * sum_rows G * n (DGAIN_PART[pid], float32) and of the host check (CHECK)."""
    pid = tl.program_id(0)
    first = pid * BLOCK_M
    block = first + tl.arange(0, BLOCK_M)
    block_ok = block < n_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    c = cols[None, :]

    product_tl(HS, stride_hs, W, stride_w, 1, F, stride_f, Z, block, block_ok, d,
               True, PRECISION, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    for s in range(0, BLOCK_M, SUB_M):
        r = first + s + tl.arange(0, SUB_M)
        ok = r < n_rows
        r64 = r.to(tl.int64)[:, None]
        m = ok[:, None] & col_ok[None, :]
        z = tl.load(Z + r64 * d + c, mask=m, other=0.0)
        rstd = tl.rsqrt(tl.sum(z * z, axis=1) / d + eps)
        tl.store(RSTD + r, rstd, mask=ok)
        v = tl.load(V + r64 * stride_v + c, mask=m, other=0.0).to(tl.float32)
        tl.store(G + r64 * d + c, v, mask=m)
        gain = tl.load(GAIN + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DZ + r64 * d + c, _vjp(v, z, rstd, gain, damping, d).to(DZ.dtype.element_ty), mask=m)
        init_state_tl(RES, PREV, LOWEST, NSTEP, r, ok, flt_max, SUB_M)
    tl.debug_barrier()

    k = tl.full((), 0, tl.int32)
    pending = tl.full((), 1, tl.int32)
    while pending > 0:
        product_tl(DZ, d, W, 1, stride_w, F, 0, U, block, block_ok, d,
                   False, PRECISION, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
        n_active = tl.full((), 0, tl.int32)
        for s in tl.range(0, BLOCK_M, SUB_M, num_stages=STAGES_B):
            r = first + s + tl.arange(0, SUB_M)
            ok = r < n_rows
            r64 = r.to(tl.int64)[:, None]
            res_old = tl.load(RES + r, mask=ok, other=0.0)
            active = ok & (res_old >= tol) & (res_old <= flt_max)
            am = active[:, None] & col_ok[None, :]
            g = tl.load(G + r64 * d + c, mask=am, other=0.0)
            v = tl.load(V + r64 * stride_v + c, mask=am, other=0.0).to(tl.float32)
            u = tl.load(U + r64 * d + c, mask=am, other=0.0)
            g_next = v + (1.0 - damping) * g + u
            res = row_residual_tl(g_next - g, g_next, rel_eps, _REL)
            z = tl.load(Z + r64 * d + c, mask=am, other=0.0)
            rstd = tl.load(RSTD + r, mask=active, other=0.0)
            gain = tl.load(GAIN + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(G + r64 * d + c, g_next, mask=am)
            tl.store(DZ + r64 * d + c, _vjp(g_next, z, rstd, gain, damping, d).to(DZ.dtype.element_ty), mask=am)
            commit_state_tl(RES, PREV, LOWEST, NSTEP, r, active, res_old, res)
            n_active += tl.sum((active & (res >= tol) & (res <= flt_max)).to(tl.int32), axis=0)
        tl.debug_barrier()
        k += 1
        pending = tl.where(k < max_iter, n_active, 0)

    d_gain = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, BLOCK_M, SUB_M):
        r = first + s + tl.arange(0, SUB_M)
        ok = r < n_rows
        r64 = r.to(tl.int64)[:, None]
        m = ok[:, None] & col_ok[None, :]
        g = tl.load(G + r64 * d + c, mask=m, other=0.0)
        z = tl.load(Z + r64 * d + c, mask=m, other=0.0)
        rstd = tl.load(RSTD + r, mask=ok, other=0.0)
        d_gain += tl.sum(g * z * rstd[:, None], axis=0)
    tl.store(DGAIN_PART + pid * d + cols, damping * d_gain, mask=col_ok)
    block_check_tl(RES, NSTEP, CHECK, pid, first, n_rows, tol, flt_max, BLOCK_M)


# --------------------------------------------------------------------------- launcher
class Adjoint(NamedTuple):
    """The adjoint solve's outputs."""

    g: torch.Tensor  #: (R, d) float32 (float64 for float64)
    state: RowState
    dz: torch.Tensor  #: (R, d) VJP_z(g) in W's dtype
    rstd: torch.Tensor  #: (R,) at h_star
    d_gain: torch.Tensor  #: (d,) damping * sum_rows g * n, float32 (float64 for float64)
    check: Optional[torch.Tensor]
    d_gain_cast: Optional[torch.Tensor] = None  #: d_gain rounded to h*'s dtype, where the kernel wrote it too

    def gain_grad(self, dtype: torch.dtype) -> torch.Tensor:
        """d_gain in ``dtype`` (the kernel's rounded copy where it has that dtype: no cast launched)."""
        cast = self.d_gain_cast
        return cast if cast is not None and cast.dtype == dtype else self.d_gain.to(dtype)


def adjoint_triton(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h_star: torch.Tensor, v: torch.Tensor,
    eps: float, damping: float, max_iter: int, tol: float,
) -> Adjoint:
    """Launch the adjoint solve at ``h_star`` ``(..., d)`` for the incoming gradient ``v``
    (same shape, any float dtype, read into float32); ``tol`` and ``max_iter`` are the adjoint's."""
    d = weight.shape[0]
    hs, vv = rows(h_star, d), rows(v, d)
    f, stride_f = frozen_rows(frozen, d)
    n_rows = hs.shape[0]
    device = h_star.device

    def buffer(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    g, dz, rstd = buffer(n_rows, d), buffer(n_rows, d, dtype=weight.dtype), buffer(n_rows)
    state = new_row_state(n_rows, device)
    cfg = config_for(n_rows, d, h_star)
    n_programs = cdiv(n_rows, cfg["BLOCK_M"])
    check = buffer(n_programs, 5)
    if n_rows == 0:
        return Adjoint(g, state, dz, rstd, torch.zeros(d, dtype=torch.float32, device=device), check)
    d_gain_part = buffer(n_programs, d)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    _adjoint_kernel[(n_programs,)](
        hs, w, f, gain.contiguous(), vv, g, dz, buffer(n_rows, d), buffer(n_rows, d), rstd,
        state.residual, state.prev, state.lowest, state.nstep, d_gain_part, check,
        n_rows, d, hs.stride(0), w.stride(0), stride_f, vv.stride(0),
        float(eps), float(damping), float(tol), int(max_iter), FLT_MAX, REL_EPS,
        **dot_args(weight), **cfg,
    )
    d_gain = d_gain_part[0] if n_programs == 1 else d_gain_part.sum(0)
    return Adjoint(g, state, dz, rstd, d_gain, check)


# --------------------------------------------------------------------------- eager twin
def adjoint_reference(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h_star: torch.Tensor, v: torch.Tensor,
    eps: float, damping: float, max_iter: int, tol: float,
) -> Adjoint:
    """:func:`adjoint_triton` in torch ops (float64 for float64 tensors); ``check`` is None."""
    d = weight.shape[0]
    ct = compute_dtype(h_star)
    w = weight.to(ct)
    z = cell_z(rows(h_star, d), w, frozen.to(ct).reshape(-1, d))
    rstd = cell_rstd(z, eps)
    n = z * rstd
    gain_c = gain.to(ct)

    def vjp(g: torch.Tensor) -> torch.Tensor:
        dyg = damping * g * gain_c
        return (rstd * (dyg - n * (dyg * n).mean(-1, keepdim=True))).to(weight.dtype)

    vv = v.reshape(-1, d).to(ct)
    g, dz = vv, vjp(vv)
    state = RowState.start(g.shape[0], g.device)
    for _ in range(max_iter):
        g_next = vv + (1.0 - damping) * g + dz.to(ct) @ w
        g = commit_reference(g, g_next, row_residual(g_next, g, "rel"), state, tol, "rel")
        dz = vjp(g)
        if not any_active(state, tol):
            break
    return Adjoint(g.clone(), state, dz, rstd.squeeze(-1), damping * (g * n).sum(0), None)
