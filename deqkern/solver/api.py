"""The public entry points :func:`solve` and :func:`solve_fused` (and
:func:`solve_keeping`, the torchdeq adapter's trajectory solve)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch

from deqkern.solver.adjoint import Adjoint, Equilibrium
from deqkern.solver.capture import graph_solve
from deqkern.solver.config import AdjointFactory, Config, Step, autocast_iterate, validate
from deqkern.solver import loop
from deqkern.solver.loop import enforce, fixed_point_loop, result_info

__all__ = ["solve", "solve_fused", "solve_keeping"]


def _forward(step: Step, owner: Callable, tag: str, h0: torch.Tensor, cfg: Config, step_name: str,
             expects_residual: bool, in_place: bool, keep: tuple = ()) -> tuple[torch.Tensor, dict, list]:
    """The forward solve (graph or loop), its ``info`` and the non-convergence policy;
    autograd as the caller set it. Returns ``(h_star, info, kept)``."""
    what = "deqkern.solve"
    capturing = h0.is_cuda and torch.cuda.is_current_stream_capturing()
    loop_kwargs = dict(max_iter=cfg.max_iter, tol=cfg.tol, stop_mode=cfg.stop_mode,
                       check_every=None if capturing else cfg.check_every, what=what,
                       step_name=step_name, expects_residual=expects_residual, method=cfg.method,
                       in_place=in_place, return_iterate=cfg.return_iterate, trace=cfg.trace)
    kept: list = []
    if cfg.graph:
        with torch.no_grad():
            h_star, check_vector, info = graph_solve(owner, tag, lambda static_in, extra: step, h0, cfg, loop_kwargs)
        dict.__setitem__(info, "iterations", cfg.max_iter)  # the other keys stay deferred (Info)
        check = None if cfg.on_nonconvergence == "ignore" else loop.host_check(check_vector)
    else:
        result = fixed_point_loop(step, h0, keep=keep, **loop_kwargs)
        h_star, check, kept = result.h, result.check, result.kept
        info = result_info(result, cfg.tol, cfg.stop_mode)
        info["iterations"] = result.iterations
    if check is not None:
        enforce(check, cfg.on_nonconvergence, what, h0.shape[:-1].numel(), cfg.max_iter, cfg.tol, cfg.stop_mode,
                info)
    return h_star, info, kept


def _as_step(f: Callable[[torch.Tensor], torch.Tensor]) -> Step:
    """A plain ``f`` as a step without a residual (the bookkeeping computes it)."""
    return lambda h: (f(h), None)


def _solve(step: Step, grad_fn: Callable[[torch.Tensor], torch.Tensor], owner: Callable, tag: str,
           h0: torch.Tensor, cfg: Config, step_name: str, expects_residual: bool, in_place: bool,
           custom_adjoint: Optional[AdjointFactory] = None) -> tuple[torch.Tensor, dict]:
    record = torch.is_grad_enabled() and cfg.backward != "unrolled"
    if custom_adjoint is not None and cfg.b_method.name != "picard" and not getattr(custom_adjoint, "stateless", False):
        # Its step may carry state that assumes each call's g is the previous call's
        # output (as deqkern.nn.cell_adjoint does): exact only for Picard.
        custom_adjoint = None
    with torch.set_grad_enabled(torch.is_grad_enabled() and not record):
        h_star, info, _ = _forward(step, owner, tag, h0, cfg, step_name, expects_residual, in_place)
    if not record:
        return h_star, info

    # The value returned is h_star itself; autograd sees one recorded application of f
    # at it. The returned tensor is a copy, so that the caller may modify it in place
    # without touching what f's recorded graph saved (and it is never a view or h0).
    h_in = h_star.detach()
    with torch.enable_grad():
        if cfg.backward == "ift":
            # A custom adjoint supplies the (df/dh)^T products itself: f's recorded
            # application then needs no gradient path to h_in (one GEMM less).
            h_in.requires_grad_(custom_adjoint is None)
            f_out = grad_fn(h_in)
            adjoint = Adjoint(f_out, h_in, cfg, info, custom_adjoint, owner, tag)
        else:
            f_out = grad_fn(h_in)
            adjoint = None
    if not f_out.requires_grad:
        return h_star, info
    return Equilibrium.apply(f_out, [h_star.clone()], adjoint), info


@torch.compiler.disable(reason="deqkern.solve: the solver loop's early exit and NaN checks sync with the host")
def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    h0: torch.Tensor,
    *,
    max_iter: int = 20,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    method: str = "picard",
    m: Optional[int] = None,
    lam: Optional[float] = None,
    beta: Optional[float] = None,
    return_iterate: str = "last",
    trace: bool = False,
    backward: str = "ift",
    b_method: Optional[str] = None,
    b_max_iter: Optional[int] = None,
    b_tol: Optional[float] = None,
    check_every: Optional[int] = None,
    graph: bool = False,
    on_nonconvergence: str = "warn",
) -> tuple[torch.Tensor, dict]:
    """Solve ``h = f(h)`` row by row from ``h0``, by Picard iteration, Anderson
    acceleration or Broyden's method.

    Args:
        f: ``h -> h_next``, same shape, dtype and device (checked on the first call).
            May close over parameters and a frozen context; those receive gradients.
            The solver never writes into what ``f`` returns (nor into ``h0``).
        h0: ``(..., d)`` starting point; each ``d``-vector is a row with its own
            convergence test (and, for Anderson/Broyden, its own history). Receives no
            gradient under "ift"/"onestep".
        max_iter: forward iterations (evaluations of ``f``) at most (exactly, with
            ``graph=True``).
        tol: a row has converged when its residual (float32) is below ``tol``.
        stop_mode: ``"abs"``, ``"rel"`` or ``"max"`` (see the module docstring).
        method: ``"picard"``, ``"anderson"`` or ``"broyden"`` (module docstring).
        m: Anderson's history per row (default :data:`DEFAULT_M`); Broyden's (default:
            every step; with fewer the oldest pair is overwritten, as torchdeq's
            ``LBFGS_thres``, which can make it diverge).
        lam: Anderson's regularization, relative to the mean squared residual in the
            history (default :data:`DEFAULT_LAM`).
        beta: Anderson's mixing (torchdeq's ``tau``): 1 (default) takes the mix of
            ``f`` values, ``beta < 1`` damps it towards the mix of the points.
        return_iterate: ``"last"`` (the last committed iterate, default) or
            ``"lowest"`` (each row's lowest-residual iterate, torchdeq's choice). For a
            converged row both are the iterate at which it converged.
        trace: also return the per-step residuals (``abs_trace``, ``rel_trace``).
        backward: ``"ift"``, ``"onestep"`` or ``"unrolled"`` (``method="picard"`` only).
        b_method: the adjoint solve's method ("ift"); default ``method``.
        b_max_iter, b_tol: the adjoint solve's limits ("ift"); default ``max_iter``, ``tol``.
        check_every: iterations between host syncs (early exit + NaN detection);
            default :data:`DEFAULT_CHECK_EVERY`. A check also follows the last iteration.
        graph: capture the whole loop in a CUDA graph (CUDA only; module docstring).
            With :func:`solve_fused`'s ``adjoint``, the adjoint solve is captured too.
        on_nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.

    Returns:
        ``h_star``: ``(..., d)``, ``h0``'s dtype (under ``torch.autocast``: the autocast
        dtype, see :func:`autocast_iterate`); differentiable per ``backward``.
        ``info``: dict of device tensors (nothing in it forces a sync), describing the
        returned iterate:

        - ``nstep`` ``(...)`` int32: the step that produced the returned iterate. With
          ``"last"``: steps taken by the row (where it converged, else ``max_iter``; a
          row that blew up: the step that produced the NaN/Inf). With ``"lowest"``: the
          step of the lowest residual (torchdeq's ``nstep``).
        - ``residual`` ``(...)`` float32: the residual of the returned iterate.
        - ``converged`` ``(...)`` bool: ``residual < tol``.
        - ``abs_lowest``, ``rel_lowest`` ``(...)`` float32 (torchdeq's names): the
          returned iterate's residual in absolute and relative terms; the mode that
          is not ``stop_mode`` is converted with the returned iterate's norm. NaN for
          ``stop_mode="max"``.
        - ``max_residual``, ``mean_nstep``, ``converged_fraction`` () float32.
        - ``contraction`` () float32: the largest, over rows, ratio of a row's last two
          residuals -- near convergence of a Picard solve an estimate of the local
          Lipschitz constant of ``f`` (>= 1: not contracting); 0 for rows that took
          one step. (For Anderson/Broyden: their convergence rate.)
        - ``nonfinite_iter`` () int32: first step with a NaN/Inf residual, 0 if none.
        - ``abs_trace``, ``rel_trace`` ``(..., iterations)`` float32, with ``trace``: per
          step, the residual of the row's committed iterate (a frozen row repeats its
          last value). In 2-norms whatever ``stop_mode``.
        - ``iterations`` (Python int): loop iterations run (host-side, free).
        - after ``backward()`` with "ift": the same keys prefixed ``b_`` for the adjoint
          solve (``b_nstep``, ``b_residual``, ``b_converged``, ...).

    Raises:
        ConvergenceError: ``on_nonconvergence="raise"`` and some row did not converge.
        NonFiniteError: an iterate became NaN/Inf (names the first such iteration).
        ValueError, TypeError: bad arguments, or ``f`` returned the wrong shape, dtype or
            device.

    Under ``torch.compile`` the solve is one eager region (one graph break): its early
    exit and NaN checks read device values on the host, which a graph cannot hold. The
    code around it is compiled; ``f`` runs as given (pass ``torch.compile(f)`` to
    compile the step itself).
    """
    cfg = validate(f, "f", h0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, method=method, m=m, lam=lam,
                    beta=beta, return_iterate=return_iterate, trace=trace, backward=backward, b_method=b_method,
                    b_max_iter=b_max_iter, b_tol=b_tol, check_every=check_every, graph=graph,
                    on_nonconvergence=on_nonconvergence)
    f_iter, h0 = autocast_iterate(f, h0)
    return _solve(_as_step(f_iter), f_iter, f, "f", h0, cfg, "f", expects_residual=False, in_place=False)


_SOLVE_DEFAULTS = {name: p.default for name, p in inspect.signature(solve).parameters.items() if name not in ("f", "h0")}


def solve_fused(
    step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    h0: torch.Tensor,
    *,
    adjoint: Optional[AdjointFactory] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict]:
    """:func:`solve` for a step that also returns its own residual.

    ``step(h) -> (h_next, residual)``: ``h_next`` as ``f(h)`` in :func:`solve` (its
    differentiable output), a new tensor *private to the solver*: it writes converged
    rows into it in place (one write less per iteration than :func:`solve`'s copy;
    deqkern's fused ops return such tensors); ``residual``: float32 ``(...)`` = ``h.shape[:-1]``, per row,
    of ``h_next`` against ``h`` in the same ``stop_mode`` as passed here, NaN for a row
    holding NaN/Inf -- exactly what ``deqkern.frozen_rmsnorm_update(...,
    stop_mode=stop_mode)`` returns with ``h_prev=h``. The solver uses it instead of
    recomputing the residual. Keyword arguments, return value and errors as
    :func:`solve`; ``graph=True`` caches per ``step``.

    ``adjoint`` (``backward="ift"`` only): a layer's own adjoint step, for layers that
    can form ``(df/dh)^T g`` faster than autograd (``deqkern.nn.FrozenContextDEQ``: one
    GEMM plus one fused kernel). ``adjoint(h_star, v)`` is called once per backward with
    the fixed point (detached) and the incoming gradient ``v`` (float32 for 16-bit
    iterates) and returns
    ``adjoint_step(g) -> (v + (df/dh)^T g, residual)``, the residual as ``step``'s, of
    the returned value against ``g``. The adjoint iteration starts at ``g = v``. The
    parameter gradients still come from one recorded application of ``step`` at
    ``h*`` (then recorded without a gradient path to ``h``). An adjoint step may carry
    state from one call to the next on the assumption that each call's ``g`` is the
    previous call's output (Picard; ``deqkern.nn.cell_adjoint`` does): with a
    ``b_method`` other than ``"picard"`` the solver uses ``adjoint`` only if it declares
    ``stateless = True``, and the autograd products otherwise.
    """
    if adjoint is not None and not callable(adjoint):
        raise TypeError(f"adjoint must be callable or None; got {type(adjoint).__name__}")
    unknown = set(kwargs) - set(_SOLVE_DEFAULTS)
    if unknown:
        raise TypeError(f"solve_fused got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    cfg = validate(step, "step", h0, **{**_SOLVE_DEFAULTS, **kwargs})

    def grad_fn(h: torch.Tensor) -> torch.Tensor:
        return step(h)[0]

    def checked_step(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = step(h)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"step must return a tuple (h_next, residual); got {type(out).__name__}")
        return out

    return _solve(checked_step, grad_fn, step, "fused", h0, cfg, "step", expects_residual=True, in_place=True,
                  custom_adjoint=adjoint)


def solve_keeping(f: Callable[[torch.Tensor], torch.Tensor], h0: torch.Tensor, keep: Sequence[int],
                  **kwargs: Any) -> tuple[torch.Tensor, dict, list]:
    """:func:`solve` without gradients (as torchdeq runs its solvers) that also returns
    copies of the iterate it would return, taken at the steps in ``keep`` that the loop
    reached: ``(h_star, info, [(step, iterate), ...])``. ``graph=True`` is refused
    (the copies are taken on the host's schedule). Serves the torchdeq adapter's
    ``indexing``."""
    unknown = set(kwargs) - set(_SOLVE_DEFAULTS)
    if unknown:
        raise TypeError(f"solve_keeping got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    cfg = validate(f, "f", h0, **{**_SOLVE_DEFAULTS, **kwargs})
    if cfg.graph:
        raise ValueError("solve_keeping takes copies of the iterate between steps; use graph=False")
    f_iter, h0 = autocast_iterate(f, h0)
    with torch.no_grad():
        return _forward(_as_step(f_iter), f, "f", h0, cfg, "f", expects_residual=False, in_place=False,
                        keep=tuple(keep))

