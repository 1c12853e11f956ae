"""The solver's per-iteration bookkeeping: one Triton kernel that commits a Picard step.

Per row, a row is *active* while ``tol <= residual <= FLT_MAX`` (NaN and Inf fail both
tests, so a row that blew up stays frozen at the step that produced it). For each row of
``h_next`` (the step's output) against ``h`` (the committed iterate):

- frozen rows: ``h_next[row] <- h[row]`` (written in place);
- active rows: keep ``h_next``, commit the new residual (given by a fused step, or
  computed here with :func:`deqkern.ops.residual.row_residual_tl`), and update the
  per-row statistics of :class:`RowState` (previous residual, lowest, step count).

:func:`commit_reference` is the same in torch ops (out of place, so autograd can
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
    """Device-side bookkeeping, one entry per row, all flat ``(R,)``.

    residual: float32, the residual of the row's current (committed) iterate;
        ``FLT_MAX`` before the first step.
    prev: float32, the residual one committed step earlier (for ``contraction``).
    lowest: float32, the lowest residual committed so far.
    nstep: int32, steps committed (the step at which the row converged or blew up).
    """

    residual: torch.Tensor
    prev: torch.Tensor
    lowest: torch.Tensor
    nstep: torch.Tensor

    @classmethod
    def start(cls, n_rows: int, device: torch.device) -> "RowState":
        return cls(
            residual=torch.full((n_rows,), FLT_MAX, dtype=torch.float32, device=device),
            prev=torch.full((n_rows,), FLT_MAX, dtype=torch.float32, device=device),
            lowest=torch.full((n_rows,), math.inf, dtype=torch.float32, device=device),
            nstep=torch.zeros((n_rows,), dtype=torch.int32, device=device),
        )


# --------------------------------------------------------------------------- commit
@triton.jit
def _commit_kernel(
    HN, HP, RES_IN, RES, PREV, LOWEST, NSTEP,
    n_rows, d, stride_hn, stride_hp,
    tol, flt_max, rel_eps,
    HAS_RESIDUAL: tl.constexpr, STOP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Commit one Picard step for a tile of BLOCK_M rows x BLOCK_D (>= d) columns.

    A row is active while tol <= RES <= flt_max (NaN/Inf fail both tests). Frozen rows
    copy their previous iterate HP into HN (in place); active rows keep HN and commit the
    new residual: read from RES_IN (HAS_RESIDUAL) or computed here from HN - HP with the
    same definition as ``row_residual``. Only frozen rows' HP and, without
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
        r_new = row_residual_tl(diff, hn, rel_eps, STOP_MODE)

    lowest = tl.load(LOWEST + rows, mask=active, other=0.0)
    nstep = tl.load(NSTEP + rows, mask=active, other=0)
    tl.store(RES + rows, r_new, mask=active)
    tl.store(PREV + rows, r_old, mask=active)
    tl.store(LOWEST + rows, tl.where(r_new < lowest, r_new, lowest), mask=active)
    tl.store(NSTEP + rows, nstep + 1, mask=active)


def commit_triton(
    h: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str,
) -> torch.Tensor:
    """Launch :func:`_commit_kernel`; returns the committed iterate (``h_next``, written
    in place, made contiguous first if it was not)."""
    d = h.shape[-1]
    out = h_next if h_next.is_contiguous() else h_next.contiguous()
    hn = out.view(-1, d)
    hp = rows(h, d)
    n_rows = hn.shape[0]
    if n_rows == 0:
        return out
    res_in = state.residual if residual is None else residual.reshape(-1).contiguous()
    block_d, block_m, num_warps = launch_config(n_rows, d, h.device.type == "cpu")
    _commit_kernel[(cdiv(n_rows, block_m),)](
        hn, hp, res_in, state.residual, state.prev, state.lowest, state.nstep,
        n_rows, d, hn.stride(0), hp.stride(0),
        float(tol), FLT_MAX, REL_EPS,
        HAS_RESIDUAL=residual is not None, STOP_MODE=STOP_MODES[stop_mode],
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def commit_reference(
    h: torch.Tensor, h_next: torch.Tensor, residual: Optional[torch.Tensor], state: RowState,
    tol: float, stop_mode: str,
) -> torch.Tensor:
    """Same as :func:`commit_triton` in torch ops, out of place for ``h`` (so autograd
    can differentiate through it in ``"unrolled"`` mode)."""
    if residual is None:
        with torch.no_grad():
            residual = row_residual(h_next, h, stop_mode)
    r_new = residual.detach().reshape(-1)
    r_old = state.residual
    active = (r_old >= tol) & (r_old <= FLT_MAX)
    state.prev = torch.where(active, r_old, state.prev)
    state.lowest = torch.where(active & (r_new < state.lowest), r_new, state.lowest)
    state.residual = torch.where(active, r_new, r_old)
    state.nstep = state.nstep + active.to(torch.int32)
    return torch.where(active.view(*h.shape[:-1], 1), h_next, h)

