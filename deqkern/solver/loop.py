"""The fixed-point loop every method shares: one contract, device-side per-row
bookkeeping, host checks every ``check_every`` iterations, the non-convergence
policies, and the ``info`` statistics.

The contract. Iteration ``k`` evaluates the step at a point ``x_k`` and gets
``h_next = f(x_k)``; the row's residual is ``h_next`` against ``x_k`` (given by a fused
step, or computed by the bookkeeping kernel) and, while the row is active, ``h_next``
becomes its committed iterate. The method only decides the next point: Picard takes the
committed iterate, Anderson (:mod:`.anderson`) and Broyden (:mod:`.broyden`) a point
built from their per-row histories. A frozen row (converged or blown up) always
proposes its committed iterate, so its answer never changes and, for an ``f`` that acts
row by row, never depends on other rows. The loop returns the last committed iterate
or, with ``return_iterate="lowest"``, each row's lowest-residual one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from deqkern import _backend
from deqkern.ops.commit import RowState, commit_plan, commit_reference, state_backend
from deqkern.ops.launch import compute_dtype
from deqkern.ops.residual import REL_EPS
from deqkern.ops.stats import SUMMARY_SCALARS, check_reference, check_triton, summary_reference, summary_triton
from deqkern.solver.anderson import Anderson
from deqkern.solver.broyden import Broyden
from deqkern.solver.config import PICARD, Method, Step, validate_iterate, validate_residual
from deqkern.solver.errors import ConvergenceError, ConvergenceWarning, NonFiniteError

__all__ = ["commit", "committer", "Check", "checker", "check_vector", "host_check", "raise_if_nonfinite", "enforce",
           "LoopResult", "fixed_point_loop", "row_norm", "summarize", "result_info"]

#: ``commit(x, h_next, residual, state) -> committed iterate``, for one solve.
Commit = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], RowState], torch.Tensor]


def committer(h0: torch.Tensor, tol: float, stop_mode: str, in_place: bool, keep_best: bool) -> Commit:
    """:func:`commit` for iterates shaped like ``h0``, its backend and launch plan chosen
    once (per solve, not per step): the kernel where it can run, the eager twin where it
    cannot -- and for a step autograd records through (``"unrolled"``)."""
    try:
        backend = _backend.select(h0.device, h0.dtype, h0.shape[-1])
    except RuntimeError:
        # DEQKERN_BACKEND=triton on data the kernel cannot take (e.g. float64): the
        # bookkeeping is not a user-facing op, so it falls back instead of failing.
        backend = "eager"

    def eager(x, h_next, residual, state):
        return commit_reference(x, h_next, residual, state, tol, stop_mode)

    if backend == "eager":
        return eager
    plan = commit_plan(h0.shape[:-1].numel(), h0.shape[-1], h0.device, float(tol), stop_mode, in_place, keep_best)
    is_grad_enabled = torch.is_grad_enabled

    def fused(x, h_next, residual, state):
        if is_grad_enabled() and (h_next.requires_grad or x.requires_grad):
            return eager(x, h_next, residual, state)
        return plan(x, h_next, residual, state)

    return fused


def commit(
    x: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str, in_place: bool,
) -> torch.Tensor:
    """Commit one step (:mod:`deqkern.ops.commit`); ``in_place`` only for step outputs
    private to the solver. A loop takes a :func:`committer` once instead."""
    return committer(x, tol, stop_mode, in_place, state.best is not None)(x, h_next, residual, state)


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    unconverged: int
    first_bad_iter: int  # 0: none
    bad_rows: int
    max_residual: float


def checker(device: torch.device) -> Callable[[RowState, float], torch.Tensor]:
    """:func:`check_vector` with its backend chosen once (per solve)."""
    if state_backend(device) == "eager":
        return lambda state, tol: check_reference(state.residual, state.nstep, tol)

    def fused(state: RowState, tol: float) -> torch.Tensor:
        res = state.residual
        return check_triton(res, state.nstep, tol) if res.shape[0] else check_reference(res, state.nstep, tol)

    return fused


def check_vector(state: RowState, tol: float) -> torch.Tensor:
    """float64 ``(4,)`` on the device: unconverged rows, first non-finite iteration (0 if
    none), non-finite rows, max residual (NaN if any row is NaN). One launch where the
    kernels run (:func:`deqkern.ops.stats.check_triton`)."""
    return checker(state.residual.device)(state, tol)


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
    h: torch.Tensor  # the returned iterate: the last committed one or the lowest-residual one
    state: RowState
    iterations: int
    check: Optional[Check]
    check_vector: torch.Tensor  # the final state's, on the device
    lowest: bool = False  # h is the lowest-residual iterate (return_iterate="lowest")
    traces: Optional[torch.Tensor] = None  # (2, R, iterations) float32: abs, rel residual per step
    kept: list = field(default_factory=list)  # (step, iterate) at the steps asked for in ``keep``


def accelerator(method: Method, h0: torch.Tensor, max_iter: int) -> Union[Anderson, Broyden, None]:
    if method.name == "anderson":
        return Anderson(method, h0, max_iter)
    if method.name == "broyden":
        return Broyden(method, h0, max_iter)
    return None


def record_traces(traces: torch.Tensor, k: int, x: torch.Tensor, h_next: torch.Tensor,
                  active: torch.Tensor) -> None:
    """Column ``k - 1`` of the abs/rel traces: the step's 2-norm residuals for active rows,
    the previous column for frozen ones (their committed iterate did not change). Plain
    norms in the compute dtype: a diagnostic, without the overflow guards of the
    convergence test (a row that overflows reads inf or NaN)."""
    with torch.no_grad():
        ct = compute_dtype(x)
        h_next = h_next.detach().to(ct)
        abs_res = row_norm(h_next - x.detach().to(ct)).reshape(-1)
        rel_res = abs_res / (row_norm(h_next).reshape(-1) + REL_EPS)
        for i, new in enumerate((abs_res, rel_res)):
            traces[i, :, k - 1] = new if k == 1 else torch.where(active, new, traces[i, :, k - 2])


def fixed_point_loop(
    step: Step, h0: torch.Tensor, *, max_iter: int, tol: float, stop_mode: str,
    check_every: Optional[int], what: str, step_name: str, expects_residual: bool, method: Method = PICARD,
    in_place: bool = True, return_iterate: str = "last", trace: bool = False, keep: tuple = (),
) -> LoopResult:
    """Iterate ``step`` from ``h0`` with ``method`` and frozen rows (module docstring);
    ``check_every=None`` never syncs (graph capture). The last check, if any, is at
    ``max_iter`` or where it stopped. ``in_place``: the step's outputs are private to
    the solver (the bookkeeping may write into them). ``keep``: steps at which to keep
    a copy of the iterate that would be returned."""
    n_rows = h0.shape[:-1].numel()
    lowest = return_iterate == "lowest"
    state = RowState.start(n_rows, h0.device, best=h0.reshape(n_rows, h0.shape[-1]) if lowest else None)
    commit_step = committer(h0, tol, stop_mode, in_place, lowest)
    check_state = checker(h0.device)
    accel = accelerator(method, h0, max_iter)
    traces = torch.empty(2, n_rows, max_iter, dtype=torch.float32, device=h0.device) if trace else None
    x = h = h0
    kept = []
    check = vector = None
    checked_at = 0
    for k in range(1, max_iter + 1):
        h_next, residual = step(x)
        if k == 1:
            validate_iterate(step_name, h_next, x)
            if expects_residual:
                validate_residual(step_name, residual, x)
        active = state.active(tol) if traces is not None else None
        h = commit_step(x, h_next, residual, state)
        if traces is not None:
            record_traces(traces, k, x, h_next, active)
        if k in keep:
            kept.append((k, (state.best.view(h.shape) if lowest else h).clone()))
        x = h if accel is None else accel.propose(x, h_next, h, state.active(tol))
        if check_every is not None and (k % check_every == 0 or k == max_iter):
            vector = check_state(state, tol)
            check = host_check(vector)
            checked_at = k
            raise_if_nonfinite(check, what)
            if check.unconverged == 0:
                break
    if checked_at != k:
        vector = check_state(state, tol)
    returned = state.best.view(h.shape) if lowest else h
    return LoopResult(returned, state, k, check, vector, lowest, None if traces is None else traces[:, :, :k], kept)


def row_norm(h: torch.Tensor) -> torch.Tensor:
    """float32 per-row 2-norm, accumulated in float32 (float64 for float64)."""
    if h.dtype == torch.float64:
        return torch.linalg.vector_norm(h, dim=-1).float()
    return torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)


def summarize(h: torch.Tensor, state: RowState, check_vector: torch.Tensor, tol: float, stop_mode: str, *,
              lowest: bool = False, traces: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The ``info`` tensors (device, no sync), describing the returned iterate ``h``
    (the lowest-residual one with ``lowest``). See :func:`deqkern.solve` for their meaning;
    :func:`deqkern.ops.stats.summary_reference` defines them. Where the kernels run: the
    row norms (one torch op, not for ``"max"``) and one launch."""
    lead = h.shape[:-1]
    residual = state.lowest if lowest else state.residual  # the state holds no autograd history
    nstep = state.lowest_step if lowest else state.nstep
    norm = None if stop_mode == "max" else row_norm(h.detach()).reshape(-1)
    if residual.shape[0] and state_backend(residual.device) != "eager":
        stats = summary_triton(residual, nstep, state.residual, state.nstep, state.prev, norm, tol, stop_mode)
    else:
        stats = summary_reference(residual, nstep, state.residual, state.prev, norm, check_vector, tol, stop_mode)
    per_row = {"nstep": nstep, "residual": residual, "converged": stats["converged"],
               "abs_lowest": stats["abs_lowest"], "rel_lowest": stats["rel_lowest"]}
    if len(lead) != 1:  # (R,) already for a 2-D h: a view each costs the host microseconds
        per_row = {name: value.view(lead) for name, value in per_row.items()}
    info = {**per_row, **{name: stats[name] for name in (*SUMMARY_SCALARS, "nonfinite_iter")}}
    if traces is not None:
        info["abs_trace"] = traces[0].view(*lead, traces.shape[-1])
        info["rel_trace"] = traces[1].view(*lead, traces.shape[-1])
    return info


def result_info(result: LoopResult, tol: float, stop_mode: str) -> dict[str, torch.Tensor]:
    """:func:`summarize` for a :class:`LoopResult` (its returned iterate and traces)."""
    return summarize(result.h, result.state, result.check_vector, tol, stop_mode, lowest=result.lowest,
                     traces=result.traces)
