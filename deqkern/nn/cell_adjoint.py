"""The fused implicit-backward iteration of the frozen-context cell (the ``adjoint`` of
:func:`deqkern.solve_fused` that :class:`deqkern.nn.FrozenContextDEQ`'s loop path uses)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from deqkern.functional import rmsnorm_adjoint_step
from deqkern.solver.config import ADJOINT_STOP_MODE

__all__ = ["cell_adjoint"]


class cell_adjoint:  # noqa: N801  (used like a function: cell_adjoint(...) -> factory)
    """The fused implicit-backward iteration of the cell
    ``f(h) = (1 - damping) h + damping * gain * RMSNorm(h @ weight.T + frozen)``, as the
    ``adjoint`` argument of :func:`deqkern.solve_fused` (called as ``(h*, v) -> adjoint_step``).

    ``g <- v + J^T g`` with ``J^T g = (1 - damping) g + VJP_z(g) @ W``. The step carries
    ``dz = VJP_z(g)`` from one call to the next, so each iteration is one GEMM
    (``u = dz @ W``) plus one kernel (:func:`deqkern.functional.rmsnorm_adjoint_step`)
    that forms ``g_next``, its residual and the next ``dz``. ``g`` is float32 (the solver
    upcasts 16-bit gradients); ``z``, ``dz`` and the GEMM stay in the weight's dtype.
    ``weight`` ``(d, d)``, ``gain`` ``(d,)``, ``frozen`` ``(..., d)`` as in the forward;
    nothing here is differentiated (the parameter gradients come from the solver's
    recorded application of the cell).

    ``frozen`` changes from call to call (the weights are updated in place), so it is
    declared in ``extra_inputs``: under ``graph=True`` the solver copies it into the
    captured graph's static buffer at each replay and :meth:`rebind` s the adjoint to it.

    The residual it reports is the relative one (``stop_mode="rel"``, what the solver's
    adjoint solve tests, :data:`deqkern.solver.config.ADJOINT_STOP_MODE`).
    """

    def __init__(self, weight: torch.Tensor, gain: torch.Tensor, frozen: torch.Tensor, *, damping: float,
                 eps: float):
        self.weight, self.gain, self.frozen = weight.detach(), gain.detach(), frozen.detach()
        self.damping, self.eps = damping, eps

    @property
    def extra_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.frozen,)

    def rebind(self, frozen: torch.Tensor) -> "cell_adjoint":
        return cell_adjoint(self.weight, self.gain, frozen, damping=self.damping, eps=self.eps)

    def __call__(self, h_star: torch.Tensor, v: torch.Tensor) -> Callable:
        weight, gain, damping, stop_mode = self.weight, self.gain, self.damping, ADJOINT_STOP_MODE
        d = weight.shape[-1]
        with torch.no_grad():
            z = (F.linear(h_star, weight).float() + self.frozen.float()).reshape(-1, d)
            rstd = torch.rsqrt(z.pow(2).mean(-1) + self.eps)
            z = z.to(weight.dtype)
            v_rows = v.reshape(-1, d)
            # dz of the starting iterate g = v: one kernel call from g_prev = 0.
            _, dz, _ = rmsnorm_adjoint_step(None, torch.zeros_like(v_rows), v_rows, z, rstd, gain,
                                            damping=damping, stop_mode=stop_mode)
        carried = [dz]

        def adjoint_step(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = carried[0] @ weight
            g_next, carried[0], residual = rmsnorm_adjoint_step(
                u, g.reshape(-1, d), v_rows, z, rstd, gain, damping=damping, stop_mode=stop_mode,
            )
            return g_next.view(g.shape), residual.view(g.shape[:-1])

        return adjoint_step
