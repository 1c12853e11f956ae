"""Picard fixed-point solver for DEQ layers: device-side convergence, frozen rows, few
host syncs, optional CUDA-graph capture, and implicit (IFT) backward.

Iteration, per row of ``h: (..., d)`` (a "row" is one ``d``-vector)::

    h_k = f(h_{k-1}),   r_k = ||h_k - h_{k-1}||  (stop_mode "abs"),
                        r_k / (||h_k|| + 1e-9)   ("rel"),  max|h_k - h_{k-1}|  ("max")

Residuals are float32 per row, accumulated in float32 (float64 for float64 iterates).
A row whose residual drops below ``tol`` at step ``k`` keeps ``h_k`` from then on (it is
*frozen* by a device-side mask), so its answer never depends on slower rows as long as
``f`` acts row by row. A row whose residual becomes NaN/Inf is frozen too, at the step
that produced it, so the first bad iteration can be read back later.

Host synchronization. The loop itself never waits for the GPU. Every ``check_every``
iterations (and after the last one) it reads back four numbers in one transfer
(:func:`_host_check`): how many rows are unconverged (all converged -> stop early), and
whether and when a non-finite residual appeared (-> :class:`NonFiniteError`).
``DEFAULT_CHECK_EVERY = 4``: a check costs one sync, i.e. the GPU queue drains and the
CPU must refill it (tens of microseconds on an H100); checking less often wastes up to
``check_every - 1`` iterations after convergence. With n iterations, sync cost s and
iteration cost t the total overhead ``n*s/c + (c-1)*t/2`` is smallest at
``c = sqrt(2*n*s/t)``: for n ~ 20 and s/t between 0.2 (large GPU-bound solves) and 1
(launch-bound ones) that is 3 to 6. 4 also divides the default ``max_iter=20``. It is a
default to be re-measured on the target GPU (``bench/bench_solve.py``).

``graph=True`` (CUDA only) captures the whole ``max_iter`` loop, with its bookkeeping and
the ``info`` statistics, in one CUDA graph and replays it: no early exit (converged rows
are frozen by masks), no host sync at all with ``on_nonconvergence="ignore"``, one at the
end otherwise. Graphs are cached per ``f`` (weakly: a graph dies with its ``f``) and per
``(shape, dtype, device, max_iter, tol, stop_mode)``. Requirements, because a replay
re-runs the recorded kernels on the recorded addresses:

- ``f`` must be capturable: no host syncs (``.item()``, printing tensors,
  data-dependent shapes) and no CPU tensors.
- Every tensor ``f`` reads must live at the same address at every call. Updating
  weights in place (what optimizers do) is fine; rebinding them to new tensors is not.
  Tensors reachable from ``f`` (closure cells, globals it names, default arguments,
  ``functools.partial`` arguments, the parameters, buffers and tensor attributes of an
  ``nn.Module`` that ``f`` is, is bound to, or refers to, and the same for functions it
  refers to, three levels deep) are guarded: if any moved, the graph is re-captured
  (with a warning, since recapturing every call is slow). Tensors ``f`` reaches any
  other way (attributes of plain objects, ``self.x`` inside a module's methods when
  ``x`` is not a tensor attribute of that module) are not guarded.
  Per-call inputs such as a frozen context should be ``copy_``-ed into a persistent
  buffer that ``f`` reads.
- ``f`` must return a new tensor (the solver writes converged rows into it in place).

With a custom adjoint (:func:`solve_fused`'s ``adjoint``), ``graph=True`` also captures the
whole ``b_max_iter`` adjoint solve, the adjoint's set-up included, in a second graph cached
with the first; ``h*``, the incoming gradient and the factory's declared per-call tensors
(``adjoint.extra_inputs``, rebound with ``adjoint.rebind(*static)``) are copied into its
static inputs at each replay, and other tensors the factory closes over are guarded like
``f``'s.

Backward modes (the forward solve runs under ``no_grad`` except for ``"unrolled"``):

- ``"ift"``: exact implicit differentiation. One application ``f_out = f(h_in)``,
  ``h_in = h*.detach().requires_grad_()``, is recorded with autograd. Backward solves
  ``g = (df/dh)^T g + dL/dh*`` with the same device-side iteration (``b_max_iter``,
  ``b_tol``, same stop mode, frozen rows, ``check_every`` syncs; 16-bit gradients are
  iterated in float32), then sends ``g`` through the recorded ``f_out``, which yields the
  parameter gradients (autograd also forms one unused ``(df/dh)^T g`` for ``h_in``).
  Memory: one ``f`` graph plus one copy of ``h*`` (the returned tensor, so that in-place
  use of it cannot corrupt what ``f`` saved), independent of both iteration counts.
- ``"onestep"``: Jacobian-free: gradients of one ``f(h*.detach())``, as if ``h*`` were a
  constant input (JFB / torchdeq's default 1-step gradient).
- ``"unrolled"``: plain autograd through every iteration (memory grows with the
  iteration count; the reference the tests compare against).

The returned ``h_star`` *value* is always the converged iterate ``h_k`` itself, not
``f(h_k)``; with ``"ift"``/``"onestep"`` its gradient flows into the recorded ``f_out``.
``h0`` receives no gradient from ``"ift"``/``"onestep"`` (the fixed point does not
depend on the starting point).

Non-convergence is never silent: ``on_nonconvergence="warn"`` (:class:`ConvergenceWarning`),
``"raise"`` (:class:`ConvergenceError`) or ``"ignore"``. NaN/Inf always raises
:class:`NonFiniteError` (a ``ConvergenceError`` and a ``FloatingPointError``) naming the
first bad iteration -- with one exception: ``graph=True`` together with ``"ignore"``
promises no host sync, so there the blow-up is only reported through ``info``
(``info["nonfinite_iter"] > 0``, NaN ``residual``, ``converged`` False). Inside an
external CUDA-graph capture the solver runs the full ``max_iter`` without checks and
enforces no policy (it cannot sync); read ``info`` afterwards.

Fused steps. :func:`solve_fused` takes ``step(h) -> (h_next, residual)`` for layers whose
kernel already computes the per-row float32 residual (``deqkern.frozen_rmsnorm_update``):
the solver then never recomputes it. Same keyword arguments as :func:`solve`.

Bookkeeping kernel. One Triton kernel per iteration (:func:`_commit_kernel`) freezes
converged rows, computes the residual when the step does not provide one, and updates
the per-row statistics; its eager twin (:func:`_commit_eager`, built on
:func:`deqkern.ops.update.row_residual`) serves float64, autograd (``"unrolled"``) and
CPUs without the Triton interpreter.
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from deqkern import _backend
from deqkern.ops.update import REL_EPS, STOP_MODES, _cdiv, _launch_config, _rows, row_residual

__all__ = [
    "solve",
    "solve_fused",
    "ConvergenceError",
    "NonFiniteError",
    "ConvergenceWarning",
    "clear_graph_cache",
    "DEFAULT_CHECK_EVERY",
]

#: Iterations between host checks when ``check_every`` is None (see the module docstring).
DEFAULT_CHECK_EVERY = 4

_BACKWARD_MODES = ("ift", "onestep", "unrolled")
_POLICIES = ("warn", "raise", "ignore")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A row's residual before its first step. Rows are "active" while tol <= residual <=
# _FLT_MAX: NaN and Inf fail the test, so a row that blew up stays frozen at that step.
_FLT_MAX = torch.finfo(torch.float32).max
_GRAPHS_PER_F = 4

#: ``step(h) -> (h_next, residual_or_None)``; residual: float32, shape ``h.shape[:-1]``.
Step = Callable[[torch.Tensor], "tuple[torch.Tensor, Optional[torch.Tensor]]"]
#: ``adjoint(h_star, v) -> adjoint_step``, ``adjoint_step(g) -> (g_next, residual)`` (see solve_fused).
AdjointFactory = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]]


# --------------------------------------------------------------------------- errors
class ConvergenceError(RuntimeError):
    """The solve did not reach ``tol`` in every row (``on_nonconvergence="raise"``).

    Attributes: ``unconverged`` (row count), ``max_residual`` (float), ``info`` (the
    solve's info dict, device tensors).
    """

    def __init__(self, message: str, *, unconverged: int = 0, max_residual: float = math.nan,
                 info: Optional[dict] = None):
        super().__init__(message)
        self.unconverged = unconverged
        self.max_residual = max_residual
        self.info = info


class NonFiniteError(ConvergenceError, FloatingPointError):
    """An iterate became NaN/Inf. ``iteration`` is the first (1-based) step that produced
    a non-finite residual; ``rows`` the number of rows affected. Always raised, whatever
    ``on_nonconvergence`` says (except ``graph=True`` with ``"ignore"``, see module doc)."""

    def __init__(self, message: str, *, iteration: int, rows: int, info: Optional[dict] = None):
        super().__init__(message, unconverged=rows, info=info)
        self.iteration = iteration
        self.rows = rows


class ConvergenceWarning(RuntimeWarning):
    """Issued by ``on_nonconvergence="warn"`` when some rows did not reach ``tol``."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class _Config:
    max_iter: int
    tol: float
    stop_mode: str
    backward: str
    b_max_iter: int
    b_tol: float
    check_every: int
    graph: bool
    on_nonconvergence: str


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0; got {value!r}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


def _one_of(name: str, value: object, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _validate(
    fn: object, fn_name: str, h0: object, *, max_iter, tol, stop_mode, backward, b_max_iter, b_tol,
    check_every, graph, on_nonconvergence,
) -> _Config:
    """All argument checks, metadata only (no sync)."""
    if not callable(fn):
        raise TypeError(f"{fn_name} must be callable; got {type(fn).__name__}")
    if not isinstance(h0, torch.Tensor):
        raise TypeError(f"h0 must be a torch.Tensor; got {type(h0).__name__}")
    if h0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"h0 must be float16, bfloat16, float32 or float64; got {h0.dtype}")
    if h0.dim() < 1 or h0.shape[-1] < 1:
        raise ValueError(f"h0 must have shape (..., d) with d >= 1; got {tuple(h0.shape)}")
    max_iter = _positive_int("max_iter", max_iter)
    tol = _positive_float("tol", tol)
    _one_of("stop_mode", stop_mode, tuple(STOP_MODES))
    _one_of("backward", backward, _BACKWARD_MODES)
    _one_of("on_nonconvergence", on_nonconvergence, _POLICIES)
    b_max_iter = max_iter if b_max_iter is None else _positive_int("b_max_iter", b_max_iter)
    b_tol = tol if b_tol is None else _positive_float("b_tol", b_tol)
    check_every = DEFAULT_CHECK_EVERY if check_every is None else _positive_int("check_every", check_every)
    if not isinstance(graph, bool):
        raise TypeError(f"graph must be a bool; got {type(graph).__name__}")
    if graph:
        if h0.device.type != "cuda":
            raise ValueError(
                f"graph=True captures the solve in a CUDA graph and needs CUDA tensors; h0 is on "
                f"{h0.device}. Use graph=False on this device."
            )
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("graph=True inside an ongoing CUDA graph capture; use graph=False there "
                             "(the outer capture already records the loop)")
        if backward == "unrolled" and torch.is_grad_enabled():
            raise ValueError("graph=True cannot be combined with backward='unrolled' while grad is enabled "
                             "(autograd cannot record through a graph replay); use 'ift' or 'onestep'")
    return _Config(max_iter, tol, stop_mode, backward, b_max_iter, b_tol, check_every, graph, on_nonconvergence)


def _validate_iterate(name: str, out: object, h: torch.Tensor) -> None:
    """First-call check of what the step returned (metadata only)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor shaped like h; got {type(out).__name__}")
    if out.shape != h.shape:
        raise ValueError(f"{name} must return h's shape {tuple(h.shape)}; got {tuple(out.shape)}")
    if out.dtype != h.dtype:
        raise TypeError(f"{name} must return h's dtype {h.dtype}; got {out.dtype} (under torch.autocast, "
                        f"pass h0 in the dtype {name} returns)")
    if out.device != h.device:
        raise ValueError(f"{name} must return a tensor on h's device {h.device}; got {out.device}")


def _autocast_iterate(f: Callable[[torch.Tensor], torch.Tensor], h0: torch.Tensor):
    """:func:`solve`'s autocast policy: under ``torch.autocast`` for h0's device type the
    iterate is stored in the autocast dtype. ``h0`` is cast once (float64 is left alone,
    as autocast does) and ``f``'s output is cast to the iterate's dtype where it differs
    (an autocast matmul returns bf16, an fp32 residual add returns fp32). Residuals and
    their reductions stay float32. Returns ``(f, h0)`` unchanged outside autocast."""
    device_type = h0.device.type
    if not torch.is_autocast_enabled(device_type) or h0.dtype == torch.float64:
        return f, h0
    dtype = torch.get_autocast_dtype(device_type)

    def f_autocast(h: torch.Tensor) -> torch.Tensor:
        out = f(h)
        if isinstance(out, torch.Tensor) and out.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return out.to(dtype)
        return out

    return f_autocast, h0.to(dtype)


def _validate_residual(name: str, residual: object, h: torch.Tensor) -> None:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name} must return (h_next, residual) with a tensor residual; got {type(residual).__name__}")
    if residual.dtype != torch.float32 or residual.shape != h.shape[:-1] or residual.device != h.device:
        raise ValueError(
            f"{name}'s residual must be float32 of shape {tuple(h.shape[:-1])} on {h.device}; got "
            f"{residual.dtype} of shape {tuple(residual.shape)} on {residual.device}"
        )


# --------------------------------------------------------------------------- per-row state
@dataclass
class _RowState:
    """Device-side bookkeeping, one entry per row, all flat ``(R,)``.

    residual: float32, the residual of the row's current (committed) iterate;
        ``_FLT_MAX`` before the first step.
    prev: float32, the residual one committed step earlier (for ``contraction``).
    lowest: float32, the lowest residual committed so far.
    nstep: int32, steps committed (the step at which the row converged or blew up).
    """

    residual: torch.Tensor
    prev: torch.Tensor
    lowest: torch.Tensor
    nstep: torch.Tensor

    @classmethod
    def start(cls, n_rows: int, device: torch.device) -> "_RowState":
        return cls(
            residual=torch.full((n_rows,), _FLT_MAX, dtype=torch.float32, device=device),
            prev=torch.full((n_rows,), _FLT_MAX, dtype=torch.float32, device=device),
            lowest=torch.full((n_rows,), math.inf, dtype=torch.float32, device=device),
            nstep=torch.zeros((n_rows,), dtype=torch.int32, device=device),
        )


# --------------------------------------------------------------------------- commit
@triton.jit
def _commit_kernel(
    HN, HP, RES_IN, RES, PREV, LOWEST, NSTEP,
    n_rows, d, stride_hn, stride_hp,
    tol, flt_max,
    HAS_RESIDUAL: tl.constexpr, STOP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Commit one Picard step for a tile of BLOCK_M rows x BLOCK_D (>= d) columns.

    A row is active while tol <= RES <= flt_max (NaN/Inf fail both tests). Frozen rows
    copy their previous iterate HP into HN (in place); active rows keep HN and commit the
    new residual: read from RES_IN (HAS_RESIDUAL) or computed here from HN - HP with the
    same definition as ``row_residual`` (float32 accumulation; ``0 * sum(diff^2)`` makes
    the "max" residual NaN for a NaN/Inf row). Only frozen rows' HP and, without
    RES_IN, active rows' HN/HP are read; the statistics are per-row scalars.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]

    r_old = tl.load(RES + rows, mask=row_ok, other=0.0)
    active = row_ok & (r_old >= tol) & (r_old <= flt_max)
    frozen = row_ok & ~active
    frozen_mask = frozen[:, None] & col_ok[None, :]

    if HAS_RESIDUAL:
        hp = tl.load(HP + r64 * stride_hp + c, mask=frozen_mask, other=0.0)
        tl.store(HN + r64 * stride_hn + c, hp, mask=frozen_mask)
        r_new = tl.load(RES_IN + rows, mask=active, other=0.0)
    else:
        active_mask = active[:, None] & col_ok[None, :]
        hp = tl.load(HP + r64 * stride_hp + c, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        tl.store(HN + r64 * stride_hn + c, hp, mask=frozen_mask)
        hn = tl.load(HN + r64 * stride_hn + c, mask=active_mask, other=0.0).to(tl.float32)
        diff = tl.where(active_mask, hn - hp.to(tl.float32), 0.0)
        sq = tl.sum(diff * diff, axis=1)
        if STOP_MODE == 0:
            r_new = tl.sqrt(sq)
        elif STOP_MODE == 1:
            r_new = tl.sqrt(sq) / (tl.sqrt(tl.sum(hn * hn, axis=1)) + 1e-9)
        else:
            r_new = tl.max(tl.abs(diff), axis=1) + 0.0 * sq

    lowest = tl.load(LOWEST + rows, mask=active, other=0.0)
    nstep = tl.load(NSTEP + rows, mask=active, other=0)
    tl.store(RES + rows, r_new, mask=active)
    tl.store(PREV + rows, r_old, mask=active)
    tl.store(LOWEST + rows, tl.where(r_new < lowest, r_new, lowest), mask=active)
    tl.store(NSTEP + rows, nstep + 1, mask=active)


def _commit_triton(
    h: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: _RowState,
    tol: float, stop_mode: str,
) -> torch.Tensor:
    """Launch :func:`_commit_kernel`; returns the committed iterate (``h_next``, written
    in place, made contiguous first if it was not)."""
    d = h.shape[-1]
    out = h_next if h_next.is_contiguous() else h_next.contiguous()
    hn = out.view(-1, d)
    hp = _rows(h, d)
    n_rows = hn.shape[0]
    if n_rows == 0:
        return out
    res_in = state.residual if residual is None else residual.reshape(-1).contiguous()
    block_d, block_m, num_warps = _launch_config(n_rows, d, h.device.type == "cpu")
    _commit_kernel[(_cdiv(n_rows, block_m),)](
        hn, hp, res_in, state.residual, state.prev, state.lowest, state.nstep,
        n_rows, d, hn.stride(0), hp.stride(0),
        float(tol), _FLT_MAX,
        HAS_RESIDUAL=residual is not None, STOP_MODE=STOP_MODES[stop_mode],
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def _commit_eager(
    h: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: _RowState,
    tol: float, stop_mode: str,
) -> torch.Tensor:
    """Same as :func:`_commit_triton` in torch ops, out of place for ``h`` (so autograd
    can differentiate through it in ``"unrolled"`` mode)."""
    if residual is None:
        with torch.no_grad():
            residual = row_residual(h_next, h, stop_mode)
    r_new = residual.detach().reshape(-1)
    r_old = state.residual
    active = (r_old >= tol) & (r_old <= _FLT_MAX)
    state.prev = torch.where(active, r_old, state.prev)
    state.lowest = torch.where(active & (r_new < state.lowest), r_new, state.lowest)
    state.residual = torch.where(active, r_new, r_old)
    state.nstep = state.nstep + active.to(torch.int32)
    return torch.where(active.view(*h.shape[:-1], 1), h_next, h)


def _commit(
    h: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: _RowState,
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
            return _commit_triton(h, h_next, residual, state, tol, stop_mode)
    return _commit_eager(h, h_next, residual, state, tol, stop_mode)


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class _Check:
    unconverged: int
    first_bad_iter: int  # 0: none
    bad_rows: int
    max_residual: float


def _check_vector(state: _RowState, tol: float) -> torch.Tensor:
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


def _host_check(vector: torch.Tensor) -> _Check:
    """The solver's only host synchronization: one device-to-host read of four numbers."""
    unconverged, first_bad, bad_rows, max_residual = vector.tolist()
    return _Check(int(unconverged), int(first_bad), int(bad_rows), max_residual)


def _raise_if_nonfinite(check: _Check, what: str, info: Optional[dict] = None) -> None:
    if check.first_bad_iter:
        raise NonFiniteError(
            f"{what}: non-finite values (NaN/Inf) appeared at iteration {check.first_bad_iter} "
            f"in {check.bad_rows} row(s)",
            iteration=check.first_bad_iter, rows=check.bad_rows, info=info,
        )


def _enforce(check: _Check, cfg_policy: str, what: str, n_rows: int, max_iter: int, tol: float,
             stop_mode: str, info: dict) -> None:
    _raise_if_nonfinite(check, what, info)
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
class _LoopResult:
    h: torch.Tensor
    state: _RowState
    iterations: int
    check: Optional[_Check]
    check_vector: torch.Tensor  # the final state's, on the device


def _picard_loop(
    step: Step, h0: torch.Tensor, *, max_iter: int, tol: float, stop_mode: str,
    check_every: Optional[int], what: str, step_name: str, expects_residual: bool,
) -> _LoopResult:
    """Iterate ``step`` from ``h0`` with frozen rows; ``check_every=None`` never syncs
    (graph capture). The last check, if any, is at ``max_iter`` or where it stopped."""
    state = _RowState.start(h0.shape[:-1].numel(), h0.device)
    h = h0
    check = vector = None
    checked_at = 0
    for k in range(1, max_iter + 1):
        h_next, residual = step(h)
        if k == 1:
            _validate_iterate(step_name, h_next, h)
            if expects_residual:
                _validate_residual(step_name, residual, h)
        h = _commit(h, h_next, residual, state, tol, stop_mode)
        if check_every is not None and (k % check_every == 0 or k == max_iter):
            vector = _check_vector(state, tol)
            check = _host_check(vector)
            checked_at = k
            _raise_if_nonfinite(check, what)
            if check.unconverged == 0:
                break
    if checked_at != k:
        vector = _check_vector(state, tol)
    return _LoopResult(h, state, k, check, vector)


def _row_norm(h: torch.Tensor) -> torch.Tensor:
    """float32 per-row 2-norm, accumulated in float32 (float64 for float64)."""
    if h.dtype == torch.float64:
        return torch.linalg.vector_norm(h, dim=-1).float()
    return torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)


def _summarize(h: torch.Tensor, state: _RowState, check_vector: torch.Tensor, tol: float,
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
            norm = _row_norm(h.detach()) + REL_EPS
            abs_lowest = lowest if stop_mode == "abs" else lowest * norm
            rel_lowest = lowest if stop_mode == "rel" else lowest / norm
        prev = state.prev.view(lead)
        ratio = torch.where((prev > 0) & (prev < _FLT_MAX), residual / prev, 0.0)
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


# --------------------------------------------------------------------------- CUDA graphs
_GRAPHS: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()


def clear_graph_cache() -> None:
    """Drop every cached ``graph=True`` capture (and its memory pool)."""
    _GRAPHS.clear()


def _tensor_guards(fn: Callable) -> tuple:
    """Address, shape, stride and dtype of the tensors reachable from ``fn`` (see the
    module docstring for what is covered). Host metadata only."""
    found: list = []
    seen: set = set()

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append((obj.data_ptr(), tuple(obj.shape), obj.stride(), obj.dtype))
        elif isinstance(obj, torch.nn.Module):
            for t in obj.parameters():
                visit(t, depth + 1)
            for t in obj.buffers():
                visit(t, depth + 1)
            for value in vars(obj).values():
                if isinstance(value, torch.Tensor):
                    visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, depth + 1)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            visit(obj.args, depth + 1)
            visit(obj.keywords, depth + 1)
        elif inspect.ismethod(obj):
            visit(obj.__self__, depth + 1)
            visit(obj.__func__, depth + 1)
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # empty cell
                    pass
            for name in obj.__code__.co_names:
                if name in obj.__globals__:
                    visit(obj.__globals__[name], depth + 1)
            visit(obj.__defaults__ or (), depth + 1)
            visit(obj.__kwdefaults__ or {}, depth + 1)

    visit(fn, 0)
    return tuple(found)


class _CapturedSolve:
    """One captured ``max_iter`` loop. Inputs: ``static_in``. Outputs: one byte buffer
    holding the final iterate and every info tensor, so a replay costs three launches
    (copy in, replay, clone out) plus views."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", static_in: torch.Tensor, packed: torch.Tensor,
                 layout: list, guards: tuple, static_extra: tuple = ()):
        self.graph, self.static_in, self.packed, self.layout, self.guards = graph, static_in, packed, layout, guards
        self.static_extra = static_extra

    def run(self, h0: torch.Tensor, extra: tuple = ()) -> dict[str, torch.Tensor]:
        self.static_in.copy_(h0)
        for static, value in zip(self.static_extra, extra):
            static.copy_(value)
        self.graph.replay()
        out = self.packed.clone()
        return {name: out.narrow(0, offset, nbytes).view(dtype).view(shape)
                for name, offset, nbytes, dtype, shape in self.layout}


def _pack(fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Copy ``fields`` into one uint8 buffer (widest dtypes first, so every field is
    aligned) and return it with its layout."""
    order = sorted(fields, key=lambda name: -fields[name].element_size())
    layout, offset = [], 0
    for name in order:
        t = fields[name]
        nbytes = t.numel() * t.element_size()
        layout.append((name, offset, nbytes, t.dtype, tuple(t.shape)))
        offset += nbytes
    packed = torch.empty(offset, dtype=torch.uint8, device=next(iter(fields.values())).device)
    for name, start, nbytes, _, _ in layout:
        packed.narrow(0, start, nbytes).view(fields[name].dtype).view(fields[name].shape).copy_(fields[name])
    return packed, layout


def _capture(build: Callable[[torch.Tensor, tuple], Step], h0: torch.Tensor, extra: tuple, loop_kwargs: dict,
             tol: float, stop_mode: str, guards: tuple) -> _CapturedSolve:
    """Capture ``_picard_loop(build(static_in, static_extra), static_in)`` and its info.
    ``extra``: further per-call inputs (the adjoint's ``h*``), copied into static buffers
    too; ``build`` makes the step from the static tensors (once for the warm-up, once
    inside the capture)."""
    static_in = torch.empty_like(h0, memory_format=torch.contiguous_format)
    static_in.copy_(h0)
    static_extra = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in extra)
    side = torch.cuda.Stream(device=h0.device)
    side.wait_stream(torch.cuda.current_stream(h0.device))
    with torch.cuda.stream(side), torch.no_grad():
        # Warm-up outside the capture: compiles kernels, creates library handles and
        # validates what the step returns.
        warm = _picard_loop(build(static_in, static_extra), static_in,
                            **{**loop_kwargs, "max_iter": 2, "check_every": None})
        _summarize(warm.h, warm.state, warm.check_vector, tol, stop_mode)
        del warm
    torch.cuda.current_stream(h0.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            result = _picard_loop(build(static_in, static_extra), static_in, **{**loop_kwargs, "check_every": None})
            fields = _summarize(result.h, result.state, result.check_vector, tol, stop_mode)
            fields["h"] = result.h
            fields["_check"] = result.check_vector
            packed, layout = _pack(fields)
            del result, fields
    except RuntimeError as err:
        raise RuntimeError(
            f"deqkern.solve(graph=True): capturing the solve in a CUDA graph failed ({err}). The step must be "
            f"capturable: no host synchronization (.item(), printing tensors, data-dependent shapes) and no "
            f"CPU tensors. Use graph=False for this f."
        ) from err
    return _CapturedSolve(graph, static_in, packed, layout, guards, static_extra)


def _graph_solve(owner_fn: Callable, tag: str, build: Callable[[torch.Tensor, tuple], Step], h0: torch.Tensor,
                 cfg: _Config, loop_kwargs: dict, extra: tuple = (), guarded: tuple = ()) -> dict[str, torch.Tensor]:
    """Replay (capturing first if needed) the cached graph for ``owner_fn`` and this
    problem; returns the packed outputs as views ("h", "_check" and the info tensors).
    ``guarded``: further callables whose tensors must not move (the adjoint factory)."""
    owner, method = (owner_fn.__self__, owner_fn.__func__) if inspect.ismethod(owner_fn) else (owner_fn, None)
    try:
        per_owner = _GRAPHS.get(owner)
        if per_owner is None:
            per_owner = _GRAPHS[owner] = collections.OrderedDict()
    except TypeError as err:
        raise TypeError(
            f"graph=True caches the captured solve per f and needs f (or the object it is bound to) to be "
            f"weak-referenceable; got {type(owner).__name__}"
        ) from err
    key = (tag, method, tuple(h0.shape), h0.dtype, h0.device, loop_kwargs["max_iter"], loop_kwargs["tol"],
           cfg.stop_mode)
    guards = tuple(_tensor_guards(fn) for fn in (owner_fn, *guarded))
    entry = per_owner.get(key)
    if entry is not None and entry.guards != guards:
        warnings.warn(
            "deqkern.solve(graph=True): tensors that f reads moved since the graph was captured; recapturing. "
            "Keep them at fixed addresses (update in place, copy_ per-call inputs into persistent buffers) "
            "to avoid a capture per call.",
            stacklevel=4,
        )
        del per_owner[key]
        entry = None
    if entry is None:
        entry = _capture(build, h0, extra, loop_kwargs, loop_kwargs["tol"], cfg.stop_mode, guards)
        per_owner[key] = entry
        while len(per_owner) > _GRAPHS_PER_F:
            per_owner.popitem(last=False)
    per_owner.move_to_end(key)
    return entry.run(h0, extra)


# --------------------------------------------------------------------------- autograd
class _Adjoint:
    """The IFT backward: solves ``g = (df/dh)^T g + v`` through the recorded ``f_out``."""

    def __init__(self, f_out: torch.Tensor, h_in: torch.Tensor, cfg: _Config, info: dict,
                 custom: Optional[AdjointFactory] = None, owner: Optional[Callable] = None, tag: str = ""):
        self.f_out, self.h_in, self.cfg, self.info, self.custom = f_out, h_in, cfg, info, custom
        self.owner, self.tag = owner, tag

    def solve(self, grad: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # 16-bit gradients are iterated in float32: the sum J^T g + v would otherwise be
        # rounded to 8 (bf16) or 11 (fp16) bits at every iteration.
        v = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        what = "deqkern.solve backward (adjoint solve)"
        capturing = v.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.custom is not None and cfg.graph and v.is_cuda and not capturing:
            return self._graph_solve(grad, v, what)
        if self.custom is not None:
            adjoint_step = self.custom(self.h_in.detach(), v)
        else:
            def adjoint_step(g: torch.Tensor) -> tuple[torch.Tensor, None]:
                (vjp,) = torch.autograd.grad(self.f_out, self.h_in, g, retain_graph=True,
                                             allow_unused=True, materialize_grads=True)
                return torch.add(v, vjp), None

        result = _picard_loop(
            adjoint_step, v, max_iter=cfg.b_max_iter, tol=cfg.b_tol, stop_mode=cfg.stop_mode,
            check_every=None if capturing else cfg.check_every, what=what, step_name="the adjoint step",
            expects_residual=self.custom is not None,
        )
        stats = _summarize(result.h, result.state, result.check_vector, cfg.b_tol, cfg.stop_mode)
        self.info.update({f"b_{name}": value for name, value in stats.items()})
        self.info["b_iterations"] = result.iterations
        if not capturing:
            _enforce(result.check, cfg.on_nonconvergence, what, v.shape[:-1].numel(), cfg.b_max_iter,
                     cfg.b_tol, cfg.stop_mode, self.info)
        return result.h.to(grad.dtype)

    def _graph_solve(self, grad: torch.Tensor, v: torch.Tensor, what: str) -> torch.Tensor:
        """``graph=True`` with a custom adjoint: the whole adjoint solve (the factory's
        set-up included) replays from one CUDA graph, cached with the forward's."""
        cfg, custom = self.cfg, self.custom
        loop_kwargs = dict(max_iter=cfg.b_max_iter, tol=cfg.b_tol, stop_mode=cfg.stop_mode, check_every=None,
                           what=what, step_name="the adjoint step", expects_residual=True)
        # Per-call tensors the adjoint reads besides h* (declared in ``extra_inputs``)
        # are copied into static buffers too, and the adjoint is rebound to them.
        per_call = tuple(getattr(custom, "extra_inputs", ()))

        def build(static_v: torch.Tensor, extra: tuple) -> Step:
            bound = custom.rebind(*extra[1:]) if per_call else custom
            return bound(extra[0], static_v)

        with torch.no_grad():
            out = _graph_solve(self.owner, self.tag + ":adjoint", build, v.contiguous(), cfg, loop_kwargs,
                               extra=(self.h_in.detach(), *per_call), guarded=(custom,))
        g, check_vector = out.pop("h"), out.pop("_check")
        self.info.update({f"b_{name}": value for name, value in out.items()})
        self.info["b_iterations"] = cfg.b_max_iter
        if cfg.on_nonconvergence != "ignore":
            _enforce(_host_check(check_vector), cfg.on_nonconvergence, what, v.shape[:-1].numel(),
                     cfg.b_max_iter, cfg.b_tol, cfg.stop_mode, self.info)
        return g.to(grad.dtype)


class _Equilibrium(torch.autograd.Function):
    """Returns the solved ``h*`` (passed in a list, so autograd treats it as a new output
    rather than a view of an input) with the gradient routed into ``f_out``: through
    the adjoint solve ("ift") or unchanged ("onestep")."""

    @staticmethod
    def forward(ctx, f_out: torch.Tensor, box: list, adjoint: Optional[_Adjoint]) -> torch.Tensor:
        ctx.adjoint = adjoint
        return box[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.adjoint is None:
            return grad, None, None
        return ctx.adjoint.solve(grad), None, None


# --------------------------------------------------------------------------- public API
def _solve(step: Step, grad_fn: Callable[[torch.Tensor], torch.Tensor], owner: Callable, tag: str,
           h0: torch.Tensor, cfg: _Config, step_name: str, expects_residual: bool,
           custom_adjoint: Optional[AdjointFactory] = None) -> tuple[torch.Tensor, dict]:
    what = "deqkern.solve"
    capturing = h0.is_cuda and torch.cuda.is_current_stream_capturing()
    loop_kwargs = dict(max_iter=cfg.max_iter, tol=cfg.tol, stop_mode=cfg.stop_mode,
                       check_every=None if capturing else cfg.check_every, what=what,
                       step_name=step_name, expects_residual=expects_residual)
    n_rows = h0.shape[:-1].numel()
    record = torch.is_grad_enabled() and cfg.backward != "unrolled"

    if cfg.graph:
        with torch.no_grad():
            out = _graph_solve(owner, tag, lambda static_in, extra: step, h0, cfg, loop_kwargs)
        h_star, check_vector = out.pop("h"), out.pop("_check")
        info = {**out, "iterations": cfg.max_iter}
        check = None if cfg.on_nonconvergence == "ignore" else _host_check(check_vector)
    else:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not record):
            result = _picard_loop(step, h0, **loop_kwargs)
        h_star, check = result.h, result.check
        info = _summarize(h_star, result.state, result.check_vector, cfg.tol, cfg.stop_mode)
        info["iterations"] = result.iterations
    if check is not None:
        _enforce(check, cfg.on_nonconvergence, what, n_rows, cfg.max_iter, cfg.tol, cfg.stop_mode, info)
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
            adjoint = _Adjoint(f_out, h_in, cfg, info, custom_adjoint, owner, tag)
        else:
            f_out = grad_fn(h_in)
            adjoint = None
    if not f_out.requires_grad:
        return h_star, info
    return _Equilibrium.apply(f_out, [h_star.clone()], adjoint), info


@torch.compiler.disable(reason="deqkern.solve: the Picard loop's early exit and NaN checks sync with the host")
def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    h0: torch.Tensor,
    *,
    max_iter: int = 20,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    backward: str = "ift",
    b_max_iter: Optional[int] = None,
    b_tol: Optional[float] = None,
    check_every: Optional[int] = None,
    graph: bool = False,
    on_nonconvergence: str = "warn",
) -> tuple[torch.Tensor, dict]:
    """Solve ``h = f(h)`` by Picard iteration, row by row, from ``h0``.

    Args:
        f: ``h -> h_next``, same shape, dtype and device (checked on the first call).
            May close over parameters and a frozen context; those receive gradients.
            Must return a new tensor (converged rows are written into it in place).
        h0: ``(..., d)`` starting point; each ``d``-vector is a row with its own
            convergence test. Receives no gradient under "ift"/"onestep".
        max_iter: forward iterations at most (exactly, with ``graph=True``).
        tol: a row has converged when its residual (float32) is below ``tol``.
        stop_mode: ``"abs"``, ``"rel"`` or ``"max"`` (see the module docstring).
        backward: ``"ift"``, ``"onestep"`` or ``"unrolled"``.
        b_max_iter, b_tol: the adjoint solve's limits ("ift"); default ``max_iter``, ``tol``.
        check_every: iterations between host syncs (early exit + NaN detection);
            default :data:`DEFAULT_CHECK_EVERY`. A check also follows the last iteration.
        graph: capture the whole loop in a CUDA graph (CUDA only; module docstring).
            With :func:`solve_fused`'s ``adjoint``, the adjoint solve is captured too.
        on_nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.

    Returns:
        ``h_star``: ``(..., d)``, ``h0``'s dtype (under ``torch.autocast``: the autocast
        dtype, see :func:`_autocast_iterate`); differentiable per ``backward``.
        ``info``: dict of device tensors (nothing in it forces a sync):

        - ``nstep`` ``(...)`` int32: steps taken by the row (where it converged, else
          ``max_iter``; a row that blew up: the step that produced the NaN/Inf).
        - ``residual`` ``(...)`` float32: the residual of the returned iterate.
        - ``converged`` ``(...)`` bool: ``residual < tol``.
        - ``abs_lowest``, ``rel_lowest`` ``(...)`` float32 (torchdeq's names): the lowest
          residual seen, in absolute and relative terms; the mode that is not
          ``stop_mode`` is converted with the returned iterate's norm. NaN for
          ``stop_mode="max"``.
        - ``max_residual``, ``mean_nstep``, ``converged_fraction`` () float32.
        - ``contraction`` () float32: the largest, over rows, ratio of a row's last two
          residuals -- near convergence an estimate of the local Lipschitz constant of
          ``f`` (>= 1: not contracting); 0 for rows that took one step.
        - ``nonfinite_iter`` () int32: first step with a NaN/Inf residual, 0 if none.
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
    cfg = _validate(f, "f", h0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, backward=backward,
                    b_max_iter=b_max_iter, b_tol=b_tol, check_every=check_every, graph=graph,
                    on_nonconvergence=on_nonconvergence)
    f_iter, h0 = _autocast_iterate(f, h0)

    def step(h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return f_iter(h), None

    return _solve(step, f_iter, f, "f", h0, cfg, "f", expects_residual=False)


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
    differentiable output); ``residual``: float32 ``(...)`` = ``h.shape[:-1]``, per row,
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
    ``h*`` (then recorded without a gradient path to ``h``).
    """
    if adjoint is not None and not callable(adjoint):
        raise TypeError(f"adjoint must be callable or None; got {type(adjoint).__name__}")
    unknown = set(kwargs) - set(_SOLVE_DEFAULTS)
    if unknown:
        raise TypeError(f"solve_fused got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    cfg = _validate(step, "step", h0, **{**_SOLVE_DEFAULTS, **kwargs})

    def grad_fn(h: torch.Tensor) -> torch.Tensor:
        return step(h)[0]

    def checked_step(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = step(h)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"step must return a tuple (h_next, residual); got {type(out).__name__}")
        return out

    return _solve(checked_step, grad_fn, step, "fused", h0, cfg, "step", expects_residual=True,
                  custom_adjoint=adjoint)
