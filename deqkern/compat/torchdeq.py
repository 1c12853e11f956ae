"""deqkern's solvers as torchdeq solvers.

    import deqkern.compat.torchdeq as dk_torchdeq
    dk_torchdeq.register()                       # once, before building the DEQ
    deq = torchdeq.get_deq(f_solver="deqkern_anderson", b_solver="deqkern", f_max_iter=30, f_tol=1e-4)

:func:`register` adds three solvers to torchdeq's registry: ``"deqkern"`` (Picard, in
place of ``fixed_point_iter``), ``"deqkern_anderson"`` (``anderson``) and
``"deqkern_broyden"`` (``broyden``), and makes torchdeq's ``add_deq_args`` accept them
for ``--f_solver`` and ``--b_solver`` (torchdeq restricts ``--b_solver`` to its own
list). Everything else stays torchdeq's: ``get_deq`` and its arguments, ``apply_norm``
/ ``reset_norm``, the gradients (torchdeq runs the solver under ``no_grad`` and builds
the 1-step / phantom / IFT gradient itself; as ``b_solver`` a solver iterates
torchdeq's adjoint function). What changes is the loop: convergence is tested on the
device, the host syncs every ``check_every`` iterations instead of every iteration,
each converged sample is frozen at its own step, Anderson's least squares runs in
float32 for 16-bit states (torchdeq's fails on bfloat16), and nothing is written into
the tensors ``func`` returns.

Shapes. torchdeq hands the solver a batched tensor ``(B, ...)`` and tests convergence
per sample on the flattened sample; here each sample is one row of width
``prod(...)`` for :func:`deqkern.solve` (a 0-d or 1-d tensor: each element is a sample,
as in torchdeq), and it is the row that Anderson and Broyden mix. The returned ``info``
is a ``torchdeq.solver.stat.SolverStat`` with torchdeq's keys, shapes and meanings:
``abs_lowest``, ``rel_lowest``, ``nstep`` (float: the step of the lowest residual) of
shape ``(B,)``; ``abs_trace``, ``rel_trace`` of shape ``(B, max_iter + 1)`` laid out as
torchdeq's (a leading 1e8, one column per step taken, then the lowest value repeated);
``sradius`` torchdeq's placeholder.

Solver arguments (torchdeq's ``solver_kwargs``, names as torchdeq's solvers take them):

- all: ``max_iter``, ``tol``, ``stop_mode``, ``indexing``, ``return_final``;
- ``"deqkern"``: ``tau`` (damping, ``z <- tau f(z) + (1 - tau) z``, as ``fixed_point_iter``);
- ``"deqkern_anderson"``: ``m`` (default 6, as torchdeq), ``lam`` (relative to the mean
  squared residual of the history: see :mod:`deqkern.solver.anderson`), ``tau`` (mixing);
- ``"deqkern_broyden"``: ``LBFGS_thres`` (pairs kept, default ``max_iter`` as torchdeq),
  ``ls`` (``False`` only: a line search needs host syncs);
- deqkern's own: ``check_every``, ``on_nonconvergence`` (default ``"ignore"``,
  torchdeq's behaviour: read ``info``), ``return_iterate`` (default ``"lowest"``,
  torchdeq's), ``trace`` (default True; False skips the per-step residuals).

Any other argument raises a ``TypeError`` naming it (torchdeq's solvers ignore unknown
ones silently).

Differences from torchdeq's solvers (besides speed):

- A sample is frozen at the first iterate whose residual is below ``tol`` (torchdeq keeps
  iterating every sample until all have converged). Results agree to about ``tol``.
- Every evaluation of ``func`` is a step and the iterate a step produces is
  ``func(z_k)``: torchdeq's anderson does not count (or return) its first two steps, its
  broyden returns ``z_k`` and does not count ``func(x0)``.
- ``indexing``: the state kept for step ``s`` is the one that would be returned after
  ``s`` evaluations (torchdeq: the same for ``fixed_point_iter``; its anderson skips
  steps 1-2 and its broyden keeps step ``s - 1``). A state is kept for each requested
  step reached before all samples converged, and the final state if none was, as
  torchdeq does.
- NaN/Inf in an iterate raises :class:`deqkern.NonFiniteError` instead of silently
  propagating.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Optional, Sequence

import torch

from deqkern.solver.api import solve_keeping

__all__ = ["register", "deqkern_solver", "deqkern_anderson", "deqkern_broyden", "SOLVER_NAME", "SOLVERS"]

#: The key under which :func:`register` puts the Picard solver in torchdeq's registry;
#: Anderson and Broyden go under ``SOLVER_NAME + "_anderson"`` / ``"_broyden"``.
SOLVER_NAME = "deqkern"

#: deqkern's own solver arguments, accepted by every solver here.
_DEQKERN_OPTIONS = {"check_every": None, "on_nonconvergence": "ignore", "return_iterate": "lowest", "trace": True}

_registered: list[str] = []


def _torchdeq():
    try:
        import torchdeq
        import torchdeq.solver
        import torchdeq.utils.arg_utils
    except ImportError as err:
        raise ImportError(
            "deqkern.compat.torchdeq needs torchdeq, which is not installed: pip install torchdeq "
            "(or pip install 'deqkern[torchdeq]')"
        ) from err
    return torchdeq


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise ValueError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _solver_stat(info: dict, n_samples: int, max_iter: int, device: torch.device):
    from torchdeq.solver.stat import SolverStat

    stat = {"abs_lowest": info["abs_lowest"], "rel_lowest": info["rel_lowest"], "nstep": info["nstep"].float()}
    for mode in ("abs", "rel"):
        taken = info.get(f"{mode}_trace")
        if taken is None:
            stat[f"{mode}_trace"] = stat[f"{mode}_lowest"].unsqueeze(1)
            continue
        start = torch.full((n_samples, 1), 1e8, device=device)
        pad = stat[f"{mode}_lowest"].unsqueeze(1).expand(n_samples, max(max_iter - taken.shape[1], 0))
        stat[f"{mode}_trace"] = torch.cat([start, taken, pad], dim=1)
    return SolverStat(**stat)


def _solve(method: str, solver_name: str, func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
           max_iter: Any, tol: float, stop_mode: str, indexing: Optional[Sequence[int]], return_final: bool,
           damping: float, method_kwargs: dict, options: dict, unknown: dict) -> tuple[torch.Tensor, list, Any]:
    """The three solvers' common body (module docstring)."""
    if unknown:
        raise TypeError(f"{solver_name} got unexpected solver argument(s): {', '.join(sorted(unknown))}")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor; got {type(x0).__name__}")
    max_iter = _as_int("max_iter", max_iter)
    options = {**_DEQKERN_OPTIONS, **options}
    shape = x0.shape
    n_samples = shape[0] if x0.dim() >= 2 else x0.numel()
    if max_iter < 1:  # no step, like torchdeq's empty loop
        empty = torch.full((n_samples,), 1e8, device=x0.device)
        z = x0.detach()
        return z, [z] if indexing else [], _solver_stat(
            {"abs_lowest": empty, "rel_lowest": empty.clone(), "nstep": torch.zeros(n_samples, device=x0.device)},
            n_samples, 0, x0.device)
    if return_final:  # every step, the last iterate
        tol, options["return_iterate"] = torch.finfo(torch.float32).tiny, "last"

    def f_rows(z: torch.Tensor) -> torch.Tensor:
        z = z.view(shape)
        out = func(z)
        if damping != 1.0:
            out = damping * out + (1.0 - damping) * z
        return out.reshape(n_samples, -1)

    marks = sorted({_as_int("indexing", k) for k in indexing if 1 <= k <= max_iter}) if indexing else []
    h, info, kept = solve_keeping(f_rows, x0.detach().reshape(n_samples, -1), marks, max_iter=max_iter, tol=tol,
                                  stop_mode=stop_mode, method=method, **method_kwargs, **options)
    trajectory = []
    if kept and h.shape[0]:
        all_converged, last_step = torch.stack([info["converged"].all().to(torch.int64),
                                                info["nstep"].amax().to(torch.int64)]).tolist()
        # torchdeq stops at the step where every sample has converged: no state after it.
        trajectory = [z.reshape(shape) for step, z in kept if not all_converged or step <= last_step]
    z = h.reshape(shape)
    if indexing and not trajectory:
        trajectory.append(z)
    return z, trajectory, _solver_stat(info, n_samples, max_iter, x0.device)


def deqkern_solver(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 50,
                   tol: float = 1e-3, stop_mode: str = "abs", indexing: Optional[Sequence[int]] = None,
                   tau: float = 1.0, return_final: bool = False, **kwargs: Any) -> tuple[torch.Tensor, list, Any]:
    """torchdeq's ``fixed_point_iter`` signature on :func:`deqkern.solve` (Picard).

    Args:
        func: ``z -> f(z)``, ``x0``'s shape.
        x0: ``(B, ...)`` starting point (0-d/1-d: one sample per element).
        max_iter, tol: as torchdeq (``f_max_iter``/``b_max_iter``, ``f_tol``/``b_tol``).
        stop_mode: ``"abs"`` or ``"rel"`` (deqkern also takes ``"max"``).
        indexing: steps at which to return the state (torchdeq's trajectory), or None.
        tau: damping, ``z <- tau * f(z) + (1 - tau) * z``.
        return_final: run all ``max_iter`` steps (no early stop) and return the last.
        **kwargs: deqkern's options (module docstring); anything else is a TypeError.

    Returns:
        ``(z, trajectory, info)``: ``z`` shaped and typed like ``x0``; ``trajectory`` the
        states at ``indexing`` (empty without it); ``info`` torchdeq's ``SolverStat``.
    """
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _DEQKERN_OPTIONS}
    return _solve("picard", "deqkern", func, x0, max_iter, tol, stop_mode, indexing, return_final, tau, {},
                  options, kwargs)


def deqkern_anderson(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 50,
                     tol: float = 1e-3, stop_mode: str = "abs", indexing: Optional[Sequence[int]] = None,
                     m: int = 6, lam: float = 1e-4, tau: float = 1.0, return_final: bool = False,
                     **kwargs: Any) -> tuple[torch.Tensor, list, Any]:
    """torchdeq's ``anderson_solver`` signature on ``deqkern.solve(method="anderson")``:
    ``m`` pairs per sample, ``lam`` relative regularization, ``tau`` mixing (``beta``).
    Other arguments, returns: :func:`deqkern_solver`."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _DEQKERN_OPTIONS}
    return _solve("anderson", "deqkern_anderson", func, x0, max_iter, tol, stop_mode, indexing, return_final, 1.0,
                  {"m": m, "lam": lam, "beta": tau}, options, kwargs)


def deqkern_broyden(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 50,
                    tol: float = 1e-3, stop_mode: str = "abs", indexing: Optional[Sequence[int]] = None,
                    LBFGS_thres: Optional[int] = None, ls: bool = False, return_final: bool = False,  # noqa: N803
                    **kwargs: Any) -> tuple[torch.Tensor, list, Any]:
    """torchdeq's ``broyden_solver`` signature on ``deqkern.solve(method="broyden")``:
    ``LBFGS_thres`` pairs per sample (default ``max_iter``), no line search (``ls``
    must be False). Other arguments, returns: :func:`deqkern_solver`."""
    if ls is not False:
        raise ValueError(f"deqkern_broyden has no line search (it needs a host sync per step); ls must be False, "
                         f"got {ls!r}")
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _DEQKERN_OPTIONS}
    memory = max(_as_int("max_iter", max_iter), 1) if LBFGS_thres is None else LBFGS_thres
    return _solve("broyden", "deqkern_broyden", func, x0, max_iter, tol, stop_mode, indexing, return_final, 1.0,
                  {"m": memory}, options, kwargs)


SOLVERS = {"": deqkern_solver, "_anderson": deqkern_anderson, "_broyden": deqkern_broyden}


def _accept_in_add_deq_args(torchdeq) -> None:
    """Wrap torchdeq's ``add_deq_args`` (where torchdeq exports it) so that the choices of
    ``--b_solver`` include the solvers registered here (``--f_solver`` has none)."""
    original = torchdeq.utils.arg_utils.add_deq_args
    if getattr(original, "_deqkern", False):
        return

    @functools.wraps(original)
    def add_deq_args(parser):
        original(parser)
        for action in parser._actions:
            if action.choices is not None and {"--f_solver", "--b_solver"} & set(action.option_strings):
                action.choices = [*action.choices, *(name for name in _registered if name not in action.choices)]

    add_deq_args._deqkern = True
    for module in (torchdeq.utils.arg_utils, torchdeq.utils, torchdeq):
        if getattr(module, "add_deq_args", None) is original:
            module.add_deq_args = add_deq_args


def register(name: str = SOLVER_NAME) -> None:
    """Register deqkern's solvers in torchdeq's registry: Picard under ``name``, Anderson
    under ``name + "_anderson"``, Broyden under ``name + "_broyden"``, so
    ``torchdeq.get_deq(f_solver=..., b_solver=...)`` and ``torchdeq.add_deq_args`` (call
    it after this, through ``torchdeq.add_deq_args`` or its module) accept them.
    Idempotent.

    Raises ImportError (naming ``pip install torchdeq``) when torchdeq is missing.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str; got {name!r}")
    torchdeq = _torchdeq()
    for suffix, solver in SOLVERS.items():
        torchdeq.solver.register_solver(name + suffix, solver)
        if name + suffix not in _registered:
            _registered.append(name + suffix)
    _accept_in_add_deq_args(torchdeq)
