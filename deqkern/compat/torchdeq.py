"""deqkern's Picard solver as a torchdeq solver.

    import deqkern.compat.torchdeq as dk_torchdeq
    dk_torchdeq.register()                       # once, before building the DEQ
    deq = torchdeq.get_deq(f_solver="deqkern", b_solver="deqkern", f_max_iter=30, f_tol=1e-4)

Everything else stays torchdeq's: ``get_deq`` and its arguments, ``apply_norm`` /
``reset_norm``, the gradient (torchdeq runs the solver under ``no_grad`` and builds the
1-step / phantom / IFT gradient itself; as ``b_solver`` this solver iterates torchdeq's
adjoint function). What changes is the loop: convergence is tested on the device and
the host syncs every ``check_every`` iterations instead of every iteration, and each
converged sample is frozen at its own step.

Shapes. torchdeq hands the solver a batched tensor ``(B, ...)`` and tests convergence
per sample on the flattened sample; here each sample is one row of width
``prod(...)`` for :func:`deqkern.solve` (a 0-d or 1-d tensor: each element is a sample,
as in torchdeq). The returned ``info`` is a ``torchdeq.solver.stat.SolverStat`` with
torchdeq's keys and shapes: ``abs_lowest``, ``rel_lowest``, ``nstep`` (float) of shape
``(B,)``; ``abs_trace``, ``rel_trace`` of shape ``(B, 1)`` (the lowest residuals: the
device-side loop keeps no per-iteration trace, like torchdeq's
``solver_stat_from_final_step``); ``sradius`` torchdeq's placeholder.

Differences from ``torchdeq.solver.fixed_point_iter`` (besides speed):

- A sample is frozen at the first iterate whose residual is below ``tol`` (torchdeq
  keeps iterating every sample until all have converged and returns each sample's
  lowest-residual iterate); an unconverged sample returns its last iterate, which for a
  contracting ``f`` is also its lowest-residual one. Results agree to about ``tol``.
- ``indexing`` (``core="indexing"`` training) is served by solving in segments that
  end at the requested steps; a state is returned for each requested step reached
  before all samples converged, and the final state if none was, as torchdeq does.
- NaN/Inf in an iterate raises :class:`deqkern.NonFiniteError` instead of silently
  propagating.

Extra keyword arguments (through torchdeq's ``solver_kwargs``): ``check_every`` and
``on_nonconvergence`` (default ``"ignore"``, torchdeq's behaviour: read ``info``) are
passed to :func:`deqkern.solve`; any other is ignored, as torchdeq's solvers do.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence

import torch

from deqkern.solver import solve

__all__ = ["register", "deqkern_solver", "SOLVER_NAME"]

#: The key under which :func:`register` puts the solver in torchdeq's registry.
SOLVER_NAME = "deqkern"

_PASSED_THROUGH = ("check_every", "on_nonconvergence")


def _torchdeq_solver_module():
    try:
        import torchdeq.solver
    except ImportError as err:
        raise ImportError(
            "deqkern.compat.torchdeq needs torchdeq, which is not installed: pip install torchdeq "
            "(or pip install 'deqkern[torchdeq]')"
        ) from err
    return torchdeq.solver


def register(name: str = SOLVER_NAME) -> None:
    """Register :func:`deqkern_solver` under ``name`` in torchdeq's solver registry, so
    ``torchdeq.get_deq(f_solver=name, b_solver=name)`` uses it. Idempotent.

    Raises ImportError (naming ``pip install torchdeq``) when torchdeq is missing.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str; got {name!r}")
    _torchdeq_solver_module().register_solver(name, deqkern_solver)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise ValueError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _solver_stat(info: dict, nstep: torch.Tensor):
    from torchdeq.solver.stat import SolverStat

    abs_lowest, rel_lowest = info["abs_lowest"], info["rel_lowest"]
    return SolverStat(
        abs_lowest=abs_lowest, rel_lowest=rel_lowest,
        abs_trace=abs_lowest.unsqueeze(1), rel_trace=rel_lowest.unsqueeze(1),
        nstep=nstep.float(),
    )


def deqkern_solver(
    func: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    indexing: Optional[Sequence[int]] = None,
    tau: float = 1.0,
    return_final: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, list, dict]:
    """torchdeq's solver signature on :func:`deqkern.solve` (see the module docstring).

    Args:
        func: ``z -> f(z)``, ``x0``'s shape; must return a new tensor.
        x0: ``(B, ...)`` starting point (0-d/1-d: one sample per element).
        max_iter, tol: as torchdeq (``f_max_iter``/``b_max_iter``, ``f_tol``/``b_tol``).
        stop_mode: ``"abs"`` or ``"rel"`` (deqkern also takes ``"max"``).
        indexing: steps at which to return the state (torchdeq's trajectory), or None.
        tau: damping, ``z <- tau * f(z) + (1 - tau) * z``.
        return_final: run all ``max_iter`` steps (no early stop).

    Returns:
        ``(z, trajectory, info)``: ``z`` shaped and typed like ``x0``; ``trajectory`` the
        states at ``indexing`` (empty without it); ``info`` torchdeq's ``SolverStat``.
    """
    options = {key: kwargs[key] for key in _PASSED_THROUGH if key in kwargs}
    options.setdefault("on_nonconvergence", "ignore")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor; got {type(x0).__name__}")
    max_iter = _as_int("max_iter", max_iter)
    shape = x0.shape
    n_samples = shape[0] if x0.dim() >= 2 else x0.numel()
    rows0 = x0.detach().reshape(n_samples, -1)
    if return_final:
        tol = torch.finfo(torch.float32).tiny

    def f_rows(z: torch.Tensor) -> torch.Tensor:
        z = z.view(shape)
        out = func(z)
        if tau != 1.0:
            out = tau * out + (1.0 - tau) * z
        return out.reshape(n_samples, -1)

    marks = sorted({_as_int("indexing", k) for k in indexing if 1 <= k <= max_iter}) if indexing else []
    ends = marks if marks and marks[-1] == max_iter else [*marks, max_iter]
    trajectory: list[torch.Tensor] = []
    h, done, nstep, info = rows0, 0, None, None
    with torch.no_grad():
        for end in ends:
            if end <= done:
                continue
            h, info = solve(f_rows, h, max_iter=end - done, tol=tol, stop_mode=stop_mode,
                            backward="onestep", **options)
            nstep = info["nstep"] if nstep is None else nstep + info["nstep"]
            all_converged, last_step = (torch.stack([info["converged"].all().to(torch.int64),
                                                     info["nstep"].amax().to(torch.int64)]).tolist()
                                        if h.shape[0] else (True, 0))
            if end in marks and (not all_converged or done + last_step == end):
                trajectory.append(h.reshape(shape).to(x0.dtype))
            done = end
            if all_converged:
                break
    z = h.reshape(shape).to(x0.dtype)
    if indexing and not trajectory:
        trajectory.append(z)
    if info is None:  # max_iter < 1: no step taken, like torchdeq's empty loop
        empty = torch.full((n_samples,), 1e8, device=x0.device)
        return z, trajectory, _solver_stat({"abs_lowest": empty, "rel_lowest": empty.clone()},
                                           torch.zeros(n_samples, device=x0.device))
    return z, trajectory, _solver_stat(info, nstep)
