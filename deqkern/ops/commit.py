"""The solver's per-iteration bookkeeping: one Triton kernel that commits a step.

A step evaluates the map at ``x`` (the solver's proposal; Picard: the committed iterate)
and returns ``h_next = f(x)``. Per row, a row is *active* while
``tol <= residual <= FLT_MAX`` (NaN and Inf fail both tests, so a row that blew up stays
frozen at the step that produced it). For each row:

- active rows: the committed iterate becomes ``h_next``; the new residual (given by a
  fused step, or computed here from ``h_next - x`` with
  :func:`deqkern.ops.residual.row_residual_tl`) and the per-row statistics of
  :class:`RowState` (previous residual, lowest residual and its step, step count) are
  updated; where the residual is the lowest so far, the row is also copied into the
  lowest-residual buffer (``RowState.best``) when the solver keeps one;
- frozen rows: the committed iterate stays ``x`` (for a frozen row the solver always
  proposes its committed iterate).

Two ways to write the result. ``in_place=True`` writes the frozen rows of ``x`` into
``h_next`` and returns it: the cheapest (only frozen rows are written), for steps whose
output is private to the solver (deqkern's own fused steps). ``in_place=False`` writes
every row into a new tensor and never touches ``h_next`` (a user's ``f`` may keep a
reference to what it returned): one more write of the iterate per step.

:func:`commit_reference` is the same in torch ops (always out of place, so autograd can
differentiate through it in ``"unrolled"`` mode); it serves float64 and CPUs without the
Triton interpreter, and is what the tests compare the kernel with.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from deqkern import _backend
from deqkern.ops.launch import GPU_TILE, INTERPRETER_TILE, STOP_MODES, Launch, cdiv, launch_config, rows
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl

__all__ = ["RowState", "CommitPlan", "commit_plan", "commit_triton", "commit_reference", "state_backend", "FLT_MAX"]

#: A row's residual before its first step (see the module docstring).
FLT_MAX = torch.finfo(torch.float32).max


@dataclass
class RowState:
    """Device-side bookkeeping, one entry per row, all flat ``(R,)`` except ``best``.

    residual: float32, the residual of the row's current (committed) iterate;
        ``FLT_MAX`` before the first step.
    prev: float32, the residual one committed step earlier (for ``contraction``).
    lowest: float32, the lowest residual committed so far (``inf`` before the first).
    nstep: int32, steps committed (the step at which the row converged or blew up).
    lowest_step: int32, the step whose residual is ``lowest`` (0 before the first).
    best: ``(R, d)`` in the iterate's dtype, the lowest-residual iterate (starts as
        ``h0``), or None when the solver does not keep it.
    """

    residual: torch.Tensor
    prev: torch.Tensor
    lowest: torch.Tensor
    nstep: torch.Tensor
    lowest_step: Optional[torch.Tensor] = None  # None: not tracked (a solve that returns its last iterate)
    best: Optional[torch.Tensor] = None

    @classmethod
    def start(cls, n_rows: int, device: torch.device, best: Optional[torch.Tensor] = None) -> "RowState":
        """``best``: ``h0`` as ``(R, d)`` to keep the lowest-residual iterate (copied).
        One launch of :func:`_start_kernel` where the Triton kernels run (:func:`state_backend`),
        five fills otherwise."""
        best = None if best is None else best.detach().clone(memory_format=torch.contiguous_format)
        if n_rows and state_backend(device) != "eager":
            fields = [torch.empty((n_rows,), dtype=dt, device=device) for dt in _FIELD_DTYPES]
            _start_launch(n_rows, device)(*fields)
            return cls(*fields, best=best)
        return cls(
            residual=torch.full((n_rows,), FLT_MAX, dtype=torch.float32, device=device),
            prev=torch.full((n_rows,), FLT_MAX, dtype=torch.float32, device=device),
            lowest=torch.full((n_rows,), math.inf, dtype=torch.float32, device=device),
            nstep=torch.zeros((n_rows,), dtype=torch.int32, device=device),
            lowest_step=torch.zeros((n_rows,), dtype=torch.int32, device=device),
            best=best,
        )

    def active(self, tol: float) -> torch.Tensor:
        """``(R,)`` bool: rows still iterating (``tol <= residual <= FLT_MAX``)."""
        return (self.residual >= tol) & (self.residual <= FLT_MAX)


#: The dtypes of RowState's per-row fields, in order (residual, prev, lowest, nstep, lowest_step).
_FIELD_DTYPES = (torch.float32, torch.float32, torch.float32, torch.int32, torch.int32)


def state_backend(device: torch.device) -> str:
    """The backend of the solver's bookkeeping on ``device`` (the per-row statistics are
    float32/int32 whatever the iterate's dtype). Not a user-facing op: where
    ``DEQKERN_BACKEND=triton`` cannot run the kernels it falls back to eager instead of
    failing, and under ``torch.compile`` (a solve traced into a graph, as
    :func:`deqkern.solve_cell`'s statistics are) it is eager torch ops the graph can hold."""
    if torch.compiler.is_compiling():
        return "eager"
    try:
        return _backend.select(device, torch.float32, 1)
    except RuntimeError:
        return "eager"


def row_block(device: torch.device) -> int:
    """Rows per step of a kernel that walks every row's statistics in one program (a few
    scalars a row: one tile's worth of them)."""
    return INTERPRETER_TILE if device.type == "cpu" else GPU_TILE


@triton.jit
def _start_kernel(RES, PREV, LOWEST, NSTEP, LOWEST_STEP, n_rows, flt_max, BLOCK: tl.constexpr):
    """RowState.start: residual and prev flt_max, lowest inf, nstep and lowest_step 0."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    start = tl.zeros([BLOCK], dtype=tl.float32) + flt_max
    tl.store(RES + rows, start, mask=ok)
    tl.store(PREV + rows, start, mask=ok)
    tl.store(LOWEST + rows, tl.full([BLOCK], float("inf"), tl.float32), mask=ok)
    tl.store(NSTEP + rows, tl.zeros([BLOCK], dtype=tl.int32), mask=ok)
    tl.store(LOWEST_STEP + rows, tl.zeros([BLOCK], dtype=tl.int32), mask=ok)


@functools.lru_cache(maxsize=256)
def _start_launch(n_rows: int, device: torch.device) -> Launch:
    block = row_block(device)
    return Launch(_start_kernel, (cdiv(n_rows, block),), (n_rows, FLT_MAX, block), 4, device)


# --------------------------------------------------------------------------- commit
@triton.jit
def _commit_kernel(
    HN, X, OUT, RES_IN, RES, PREV, LOWEST, NSTEP, LOWEST_STEP, BEST,
    n_rows, d, stride_hn, stride_x, stride_out, stride_best,
    tol, flt_max, rel_eps,
    HAS_RESIDUAL: tl.constexpr, IN_PLACE: tl.constexpr, KEEP_BEST: tl.constexpr, LOAD_HN: tl.constexpr,
    STOP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Commit one step for a tile of BLOCK_M rows x BLOCK_D (>= d) columns.

    A row is active while tol <= RES <= flt_max (NaN/Inf fail both tests). Active rows
    take HN (the step's output) and commit the new residual: read from RES_IN
    (HAS_RESIDUAL) or computed here from HN - X with the definition of ``row_residual``;
    frozen rows keep X. IN_PLACE: frozen rows of X are written into HN; otherwise every
    row is written into OUT and HN is only read. KEEP_BEST: rows whose new residual is
    the lowest so far are copied into BEST. Only what a row needs is read (LOAD_HN: the
    host's answer to "is HN read at all"); statistics are per-row scalars, in float32.
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
    active_mask = active[:, None] & col_ok[None, :]

    x_mask = frozen_mask if HAS_RESIDUAL else row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + r64 * stride_x + c, mask=x_mask, other=0.0)
    if LOAD_HN:
        hn = tl.load(HN + r64 * stride_hn + c, mask=active_mask, other=0.0)
    if IN_PLACE:
        tl.store(HN + r64 * stride_hn + c, x, mask=frozen_mask)
    else:
        tl.store(OUT + r64 * stride_out + c, tl.where(active[:, None], hn, x), mask=row_ok[:, None] & col_ok[None, :])

    if HAS_RESIDUAL:
        r_new = tl.load(RES_IN + rows, mask=active, other=0.0)
    else:
        hn32 = hn.to(tl.float32)
        diff = tl.where(active_mask, hn32 - x.to(tl.float32), 0.0)
        r_new = row_residual_tl(diff, hn32, rel_eps, STOP_MODE)

    lowest = tl.load(LOWEST + rows, mask=active, other=0.0)
    nstep = tl.load(NSTEP + rows, mask=active, other=0)
    improved = active & (r_new < lowest)
    if KEEP_BEST:
        tl.store(BEST + r64 * stride_best + c, hn, mask=improved[:, None] & col_ok[None, :])
    tl.store(RES + rows, r_new, mask=active)
    tl.store(PREV + rows, r_old, mask=active)
    tl.store(LOWEST + rows, r_new, mask=improved)
    tl.store(LOWEST_STEP + rows, nstep + 1, mask=improved)
    tl.store(NSTEP + rows, nstep + 1, mask=active)


class CommitPlan:
    """The host work of :func:`commit_triton` for one signature (rows, width, device,
    ``tol``, ``stop_mode``, ``in_place``, whether a lowest-residual copy is kept), done once: the grid and launch configuration, and a cached
    :class:`~deqkern.ops.launch.Launch` per layout of the operands (row strides, the
    step's dtype, whether it gave a residual) -- in a solve, one or two. A solve takes
    its plan once; each step then costs the views and the launch."""

    __slots__ = ("n_rows", "d", "in_place", "keep_best", "grid", "fixed", "num_warps", "device", "launches")

    def __init__(self, n_rows: int, d: int, device: torch.device, tol: float, stop_mode: str, in_place: bool,
                 keep_best: bool):
        self.n_rows, self.d, self.in_place, self.keep_best, self.device = n_rows, d, in_place, keep_best, device
        block_d, block_m, self.num_warps = launch_config(n_rows, d, device.type == "cpu")
        self.grid = (cdiv(n_rows, block_m),)
        self.fixed = (float(tol), FLT_MAX, REL_EPS, STOP_MODES[stop_mode], block_m, block_d)
        self.launches: dict[tuple, Launch] = {}

    def __call__(self, x: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor],
                 state: RowState) -> torch.Tensor:
        """:func:`commit_triton` for ``x`` of this plan's signature."""
        d = self.d
        if self.in_place:
            out = h_next if h_next.is_contiguous() else h_next.contiguous()
            hn = out_rows = out.view(-1, d)
        else:
            hn = rows(h_next, d)
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            out_rows = out.view(-1, d)
        if self.n_rows == 0:
            return out
        xr = rows(x, d)
        best = state.best if self.keep_best else out_rows
        key = (hn.stride(0), xr.stride(0), best.stride(0), hn.dtype, residual is None)
        launch = self.launches.get(key)
        if launch is None:
            launch = self.launches[key] = self._launch(key)
        launch(hn, xr, out_rows, state.residual if residual is None else residual.reshape(-1).contiguous(),
               state.residual, state.prev, state.lowest, state.nstep, state.lowest_step, best)
        return out

    def _launch(self, key: tuple) -> Launch:
        stride_hn, stride_x, stride_best, _, no_residual = key  # the dtype: a compiled kernel per dtype
        tol, flt_max, rel_eps, stop_mode, block_m, block_d = self.fixed
        in_place, has_residual = self.in_place, not no_residual
        stride_out = stride_hn if in_place else self.d
        return Launch(_commit_kernel, self.grid,
                      (self.n_rows, self.d, stride_hn, stride_x, stride_out, stride_best, tol, flt_max, rel_eps,
                       has_residual, in_place, self.keep_best,
                       not (in_place and has_residual and not self.keep_best),  # LOAD_HN
                       stop_mode, block_m, block_d),
                      self.num_warps, self.device)


@functools.lru_cache(maxsize=256)
def commit_plan(n_rows: int, d: int, device: torch.device, tol: float, stop_mode: str, in_place: bool,
                keep_best: bool) -> CommitPlan:
    """The cached :class:`CommitPlan` of a signature (its launches keep their compiled
    kernels from one solve to the next)."""
    return CommitPlan(n_rows, d, device, tol, stop_mode, in_place, keep_best)


def commit_triton(
    x: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str, in_place: bool,
) -> torch.Tensor:
    """Launch :func:`_commit_kernel`; returns the committed iterate: ``h_next`` written in
    place (made contiguous first if it was not) with ``in_place``, else a new tensor."""
    d = x.shape[-1]
    plan = commit_plan(x.shape[:-1].numel(), d, x.device, float(tol), stop_mode, in_place, state.best is not None)
    return plan(x, h_next, residual, state)


def commit_reference(
    x: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str,
) -> torch.Tensor:
    """Same as :func:`commit_triton` in torch ops, always out of place (so autograd can
    differentiate through it in ``"unrolled"`` mode)."""
    if residual is None:
        with torch.no_grad():
            residual = row_residual(h_next, x, stop_mode)
    r_new = residual.detach().reshape(-1)
    r_old = state.residual
    active = state.active(tol)
    improved = active & (r_new < state.lowest)
    if state.best is not None:
        state.best = torch.where(improved.unsqueeze(-1), h_next.reshape(state.best.shape), state.best)
    state.prev = torch.where(active, r_old, state.prev)
    state.lowest = torch.where(improved, r_new, state.lowest)
    state.lowest_step = torch.where(improved, state.nstep + 1, state.lowest_step)
    state.residual = torch.where(active, r_new, r_old)
    state.nstep = state.nstep + active.to(torch.int32)
    return torch.where(active.view(*x.shape[:-1], 1), h_next, x)
