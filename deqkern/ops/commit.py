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

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from deqkern.ops.launch import STOP_MODES, cdiv, launch_config, rows
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl

__all__ = ["RowState", "commit_triton", "commit_reference", "FLT_MAX"]

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
        """``best``: ``h0`` as ``(R, d)`` to keep the lowest-residual iterate (copied)."""
        return cls(
            residual=torch.full((n_rows,), FLT_MAX, dtype=torch.float32, device=device),
            prev=torch.full((n_rows,), FLT_MAX, dtype=torch.float32, device=device),
            lowest=torch.full((n_rows,), math.inf, dtype=torch.float32, device=device),
            nstep=torch.zeros((n_rows,), dtype=torch.int32, device=device),
            lowest_step=torch.zeros((n_rows,), dtype=torch.int32, device=device),
            best=None if best is None else best.detach().clone(memory_format=torch.contiguous_format),
        )

    def active(self, tol: float) -> torch.Tensor:
        """``(R,)`` bool: rows still iterating (``tol <= residual <= FLT_MAX``)."""
        return (self.residual >= tol) & (self.residual <= FLT_MAX)


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


def commit_triton(
    x: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str, in_place: bool,
) -> torch.Tensor:
    """Launch :func:`_commit_kernel`; returns the committed iterate: ``h_next`` written in
    place (made contiguous first if it was not) with ``in_place``, else a new tensor."""
    d = x.shape[-1]
    if in_place:
        out = h_next if h_next.is_contiguous() else h_next.contiguous()
        hn = out.view(-1, d)
        out_rows = hn
    else:
        hn = rows(h_next, d)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out_rows = out.view(-1, d)
    xr = rows(x, d)
    n_rows = xr.shape[0]
    if n_rows == 0:
        return out
    res_in = state.residual if residual is None else residual.reshape(-1).contiguous()
    best = state.best if state.best is not None else out_rows
    block_d, block_m, num_warps = launch_config(n_rows, d, x.device.type == "cpu")
    _commit_kernel[(cdiv(n_rows, block_m),)](
        hn, xr, out_rows, res_in, state.residual, state.prev, state.lowest, state.nstep, state.lowest_step, best,
        n_rows, d, hn.stride(0), xr.stride(0), out_rows.stride(0), best.stride(0),
        float(tol), FLT_MAX, REL_EPS,
        HAS_RESIDUAL=residual is not None, IN_PLACE=in_place, KEEP_BEST=state.best is not None,
        LOAD_HN=not (in_place and residual is not None and state.best is None),
        STOP_MODE=STOP_MODES[stop_mode], BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


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
