"""The Picard loop: device-side per-row bookkeeping, host checks every ``check_every``
iterations, the non-convergence policies, and the ``info`` statistics."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from deqkern import _backend
from deqkern.ops.commit import FLT_MAX, RowState, commit_reference, commit_triton
from deqkern.ops.residual import REL_EPS
from deqkern.solver.config import Step, validate_iterate, validate_residual
from deqkern.solver.errors import ConvergenceError, ConvergenceWarning, NonFiniteError

__all__ = ["commit", "Check", "check_vector", "host_check", "raise_if_nonfinite", "enforce", "LoopResult",
           "picard_loop", "row_norm", "summarize"]


def commit(
    h: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str,
) -> torch.Tensor:
    differentiable = torch.is_grad_enabled() and (h_next.requires_grad or h.requires_grad)
    if not differentiable:
        try:
            backend = _backend.select(h.device, h.dtype, h.shape[-1])
        except RuntimeError:
            # DEQKERN_BACKEND=triton on data the kernel cannot take (e.g. float64): the
            # bookkeeping is not a user-facing op, so it falls back instead of failing.
            backend = "eager"
        if backend != "eager":
            return commit_triton(h, h_next, residual, state, tol, stop_mode)
    return commit_reference(h, h_next, residual, state, tol, stop_mode)


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    unconverged: int
    first_bad_iter: int  # 0: none
    bad_rows: int
    max_residual: float


def check_vector(state: RowState, tol: float) -> torch.Tensor:
    """float64 ``(4,)`` on the device: unconverged rows, first non-finite iteration (0 if
    none), non-finite rows, max residual (NaN if any row is NaN)."""
    res = state.residual
    if res.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=res.device)
    bad = ~torch.isfinite(res)
    first_bad = torch.where(bad, state.nstep, torch.iinfo(torch.int32).max).amin()
    first_bad = torch.where(bad.any(), first_bad, 0)
    parts = [(~(res < tol)).sum(), first_bad, bad.sum(), res.amax()]
    return torch.stack([p.to(torch.float64) for p in parts])


def host_check(vector: torch.Tensor) -> Check:
    """The solver's only host synchronization: one device-to-host read of four numbers."""
    unconverged, first_bad, bad_rows, max_residual = vector.tolist()
    return Check(int(unconverged), int(first_bad), int(bad_rows), max_residual)


def raise_if_nonfinite(check: Check, what: str, info: Optional[dict] = None) -> None:
    if check.first_bad_iter:
        raise NonFiniteError(
            f"{what}: non-finite values (NaN/Inf) appeared at iteration {check.first_bad_iter} "
            f"in {check.bad_rows} row(s)",
            iteration=check.first_bad_iter, rows=check.bad_rows, info=info,
        )


def enforce(check: Check, cfg_policy: str, what: str, n_rows: int, max_iter: int, tol: float,
             stop_mode: str, info: dict) -> None:
    raise_if_nonfinite(check, what, info)
    if check.unconverged == 0 or cfg_policy == "ignore":
        return
    message = (
        f"{what}: {check.unconverged} of {n_rows} row(s) did not converge in {max_iter} iterations "
        f"(max residual {check.max_residual:.3e} >= tol {tol:g}, stop_mode={stop_mode!r}); "
        f"raise max_iter, loosen tol, or make f more contractive (see info['contraction'])"
    )
    if cfg_policy == "raise":
        raise ConvergenceError(message, unconverged=check.unconverged, max_residual=check.max_residual, info=info)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)


# --------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    h: torch.Tensor
    state: RowState
    iterations: int
    check: Optional[Check]
    check_vector: torch.Tensor  # the final state's, on the device


def picard_loop(
    step: Step, h0: torch.Tensor, *, max_iter: int, tol: float, stop_mode: str,
    check_every: Optional[int], what: str, step_name: str, expects_residual: bool,
) -> LoopResult:
    """Iterate ``step`` from ``h0`` with frozen rows; ``check_every=None`` never syncs
    (graph capture). The last check, if any, is at ``max_iter`` or where it stopped."""
    state = RowState.start(h0.shape[:-1].numel(), h0.device)
    h = h0
    check = vector = None
    checked_at = 0
    for k in range(1, max_iter + 1):
        h_next, residual = step(h)
        if k == 1:
            validate_iterate(step_name, h_next, h)
            if expects_residual:
                validate_residual(step_name, residual, h)
        h = commit(h, h_next, residual, state, tol, stop_mode)
        if check_every is not None and (k % check_every == 0 or k == max_iter):
            vector = check_vector(state, tol)
            check = host_check(vector)
            checked_at = k
            raise_if_nonfinite(check, what)
            if check.unconverged == 0:
                break
    if checked_at != k:
        vector = check_vector(state, tol)
    return LoopResult(h, state, k, check, vector)


def row_norm(h: torch.Tensor) -> torch.Tensor:
    """float32 per-row 2-norm, accumulated in float32 (float64 for float64)."""
    if h.dtype == torch.float64:
        return torch.linalg.vector_norm(h, dim=-1).float()
    return torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)


def summarize(h: torch.Tensor, state: RowState, check_vector: torch.Tensor, tol: float,
               stop_mode: str) -> dict[str, torch.Tensor]:
    """The ``info`` tensors (device, no sync). See :func:`solve` for their meaning."""
    lead = h.shape[:-1]
    with torch.no_grad():
        residual = state.residual.view(lead)
        nstep = state.nstep.view(lead)
        converged = residual < tol
        lowest = state.lowest.view(lead)
        if stop_mode == "max":
            abs_lowest = rel_lowest = torch.full_like(lowest, math.nan)
        else:
            norm = row_norm(h.detach()) + REL_EPS
            abs_lowest = lowest if stop_mode == "abs" else lowest * norm
            rel_lowest = lowest if stop_mode == "rel" else lowest / norm
        prev = state.prev.view(lead)
        ratio = torch.where((prev > 0) & (prev < FLT_MAX), residual / prev, 0.0)
        empty = residual.numel() == 0
        return {
            "nstep": nstep,
            "residual": residual,
            "converged": converged,
            "abs_lowest": abs_lowest,
            "rel_lowest": rel_lowest,
            "max_residual": check_vector[3].float(),
            "mean_nstep": nstep.float().mean() if not empty else check_vector[0].float(),
            "converged_fraction": converged.float().mean() if not empty else check_vector[0].float() + 1,
            "contraction": ratio.amax() if not empty else check_vector[0].float(),
            "nonfinite_iter": check_vector[1].to(torch.int32),
        }

