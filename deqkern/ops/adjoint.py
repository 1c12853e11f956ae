"""Fused adjoint step of the frozen-context cell's implicit backward.

The cell is ``f(h) = (1 - damping) * h + damping * gain * n(z)`` with
``z = h @ W.T + frozen`` and ``n(z) = z * rstd``, ``rstd = 1/sqrt(mean(z**2) + eps)``.
The implicit-function-theorem adjoint solves ``g = J^T g + grad_out`` with
``J^T g = (1 - damping) * g + VJP_z(g) @ W``, where, for ``dy = damping * g``,

    VJP_z(g) = rstd * (dy*gain - n * mean(dy*gain*n))          (the RMSNorm VJP)

One adjoint iteration is then one GEMM (``u = dz @ W``) plus this kernel, which in a
single pass over the rows forms

    g_next   = (1 - damping) * g_prev + u + grad_out
    residual = per-row residual of g_next against g_prev      (abs / rel / max)
    dz_next  = VJP_z(g_next)                                   (input of the next GEMM)

from the saved per-row statistics (``z`` at the fixed point and its ``rstd``). Math and
reductions in float32; ``dz`` is stored in the GEMM's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deqkern.ops.launch import STOP_MODES, Launch, as_rows, cdiv, compute_dtype, launch_config, row_mode
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl


@triton.jit
def rmsnorm_vjp_tl(dyg, n, rstd, d):
    """RMSNorm's vector-Jacobian product at ``n = z * rstd`` for the cotangent already
    scaled by the gain (``dyg = dy * gain``), float32 tiles: ``rstd * (dyg - n *
    mean(dyg * n))`` per row. The one device definition: the update's backward, this
    adjoint step and the persistent adjoint call it."""
    proj = tl.sum(dyg * n, axis=1) / d
    return rstd[:, None] * (dyg - n * proj[:, None])


@triton.jit
def _adjoint_kernel(
    U, GP, GO, Z, RSTD, GAIN, GN, DZ, RES,
    n_rows, d,
    stride_u, stride_gp, stride_go, stride_z, stride_gn, stride_dz,
    damping, rel_eps,
    HAS_U: tl.constexpr, STOP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g_next = (1-damping)*g_prev + u + grad_out; its residual; dz = RMSNorm-VJP(g_next)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]

    gp = tl.load(GP + r64 * stride_gp + c, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(GO + r64 * stride_go + c, mask=mask, other=0.0).to(tl.float32)
    gn = (1.0 - damping) * gp + go
    if HAS_U:
        gn += tl.load(U + r64 * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(GN + r64 * stride_gn + c, gn.to(GN.dtype.element_ty), mask=mask)

    diff = tl.where(mask, gn - gp, 0.0)
    res = row_residual_tl(diff, tl.where(mask, gn, 0.0), rel_eps, STOP_MODE)
    tl.store(RES + rows, res, mask=row_ok)

    z = tl.load(Z + r64 * stride_z + c, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    g = tl.load(GAIN + cols, mask=col_ok, other=0.0).to(tl.float32)
    dz = rmsnorm_vjp_tl(damping * gn * g[None, :], z * rstd[:, None], rstd, d)
    tl.store(DZ + r64 * stride_dz + c, dz.to(DZ.dtype.element_ty), mask=mask)


class AdjointPlan:
    """The adjoint kernel's launch for one call signature (shapes, strides, dtypes,
    device, damping, stop_mode), planned once; calling it allocates the outputs and
    launches (same arguments and outputs as :func:`adjoint_step_triton`)."""

    def __init__(self, u: torch.Tensor | None, g_prev: torch.Tensor, grad_out: torch.Tensor, z: torch.Tensor,
                 rstd: torch.Tensor, gain: torch.Tensor, damping: float, stop_mode: str):
        d = z.shape[-1]
        self.d, self.n_rows = d, z.numel() // d
        self.g_dtype, self.z_dtype, self.device = g_prev.dtype, z.dtype, z.device
        self.backend = "triton-interpreter" if z.device.type == "cpu" else "triton"
        self.modes = [row_mode(t) for t in (u if u is not None else g_prev, g_prev, grad_out, z)]
        uu, gp, go, zz = (as_rows(t, mode, d) for t, mode in zip((u if u is not None else g_prev, g_prev, grad_out, z),
                                                                 self.modes))
        block_d, block_m, num_warps = launch_config(self.n_rows, d, z.device.type == "cpu")
        self.launch = Launch(
            _adjoint_kernel, (cdiv(self.n_rows, block_m),),
            (self.n_rows, d, uu.stride(0), gp.stride(0), go.stride(0), zz.stride(0), d, d, float(damping), REL_EPS,
             u is not None, STOP_MODES[stop_mode], block_m, block_d),
            num_warps, z.device)

    def __call__(self, u: torch.Tensor | None, g_prev: torch.Tensor, grad_out: torch.Tensor, z: torch.Tensor,
                 rstd: torch.Tensor, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, n_rows, device, (mu, mg, mo, mz) = self.d, self.n_rows, self.device, self.modes
        g_next = torch.empty((n_rows, d), dtype=self.g_dtype, device=device)
        dz = torch.empty((n_rows, d), dtype=self.z_dtype, device=device)
        res = torch.empty(n_rows, dtype=torch.float32, device=device)
        if n_rows:
            gp = as_rows(g_prev, mg, d)
            self.launch(gp if u is None else as_rows(u, mu, d), gp, as_rows(grad_out, mo, d), as_rows(z, mz, d),
                        rstd if rstd.dim() == 1 and rstd.is_contiguous() else rstd.reshape(-1).contiguous(),
                        gain if gain.is_contiguous() else gain.contiguous(), g_next, dz, res)
        return g_next, dz, res


def adjoint_step_triton(
    u: torch.Tensor | None, g_prev: torch.Tensor, grad_out: torch.Tensor, z: torch.Tensor,
    rstd: torch.Tensor, gain: torch.Tensor, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the adjoint kernel on (rows, d) tensors (planned for this one call).
    ``u=None`` means ``u = 0``. Returns ``g_next`` (g_prev's dtype), ``dz`` (z's dtype)
    and the float32 residual."""
    return AdjointPlan(u, g_prev, grad_out, z, rstd, gain, damping, stop_mode)(u, g_prev, grad_out, z, rstd, gain)


class EagerAdjoint:
    """The eager backend's counterpart of :class:`AdjointPlan`."""

    backend = "eager"

    def __init__(self, damping: float, stop_mode: str):
        self.damping, self.stop_mode = damping, stop_mode

    def __call__(self, u, g_prev, grad_out, z, rstd, gain):
        return adjoint_step_reference(u, g_prev, grad_out, z, rstd, gain, self.damping, self.stop_mode)


def adjoint_step_reference(
    u: torch.Tensor | None, g_prev: torch.Tensor, grad_out: torch.Tensor, z: torch.Tensor,
    rstd: torch.Tensor, gain: torch.Tensor, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager path of :func:`adjoint_step_triton` (same math, same outputs)."""
    ct = compute_dtype(z)
    gp = g_prev.to(ct)
    gn = (1.0 - damping) * gp + grad_out.to(ct)
    if u is not None:
        gn = gn + u.to(ct)
    rs = rstd.to(ct).unsqueeze(-1)
    n = z.to(ct) * rs
    dyg = damping * gn * gain.to(ct)
    dz = rs * (dyg - n * (dyg * n).mean(-1, keepdim=True))
    d = z.shape[-1]
    return gn.to(g_prev.dtype).reshape(-1, d), dz.to(z.dtype).reshape(-1, d), row_residual(gn, gp, stop_mode).reshape(-1)
