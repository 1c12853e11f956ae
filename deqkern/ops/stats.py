"""The solver's statistics over the rows of a :class:`~deqkern.ops.commit.RowState`: the
host check's four numbers and the ``info`` summary, each one launch.

Both walk every row's few per-row scalars in **one program** (no partial sums to add up
in a second launch, no atomics to zero first): a few bytes per row, so even at a
million rows this is tens of microseconds of device time, against an iteration that
reads and writes every row's ``d`` values. What they replace: ``check_vector`` was about
a dozen small torch ops before each host check, ``summarize`` some twenty per solve, each
costing the host a launch (tens of microseconds on a GPU host).

The eager twins (:func:`check_reference`, :func:`summary_reference`) are the definitions
and the fallback. Integer statistics are exact; ``max_residual`` and ``contraction`` are
NaN when any row's value is NaN (as ``torch.amax``); the means are the exact integer
sums divided by the row count in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from deqkern.ops.commit import FLT_MAX, row_block
from deqkern.ops.launch import STOP_MODES, Launch
from deqkern.ops.residual import REL_EPS

__all__ = ["check_triton", "check_reference", "summary_triton", "summary_reference", "SUMMARY_SCALARS"]

#: The float32 scalars of the summary, in the order :func:`summary_triton` returns them.
SUMMARY_SCALARS = ("max_residual", "mean_nstep", "converged_fraction", "contraction")
_INT_MAX = 2147483647


@triton.jit
def _first_bad_tl(res, nstep, ok, flt_max):
    """(non-finite rows among ``ok``, the smallest nstep among them or INT_MAX)."""
    bad = ok & ~(tl.abs(res) <= flt_max)  # NaN and +-inf fail the test
    return bad.to(tl.int32), tl.where(bad, nstep, 2147483647)


@triton.jit
def _check_kernel(RES, NSTEP, OUT, n_rows, tol, flt_max, BLOCK: tl.constexpr):
    """OUT (4,) float64 = (rows with ``~(res < tol)``, the first non-finite row's nstep or 0,
    non-finite rows, max residual: NaN if any row's is NaN). One program, BLOCK rows a step;
    counts in int32."""
    unconverged = tl.zeros([BLOCK], dtype=tl.int32)
    bad_rows = tl.zeros([BLOCK], dtype=tl.int32)
    nan_rows = tl.zeros([BLOCK], dtype=tl.int32)
    first_bad = tl.full([BLOCK], 2147483647, tl.int32)
    largest = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < n_rows
        res = tl.load(RES + r, mask=ok, other=0.0)
        nstep = tl.load(NSTEP + r, mask=ok, other=0)
        bad, first = _first_bad_tl(res, nstep, ok, flt_max)
        unconverged += (ok & ~(res < tol)).to(tl.int32)
        bad_rows += bad
        first_bad = tl.minimum(first_bad, first)
        nan_rows += (ok & (res != res)).to(tl.int32)
        largest = tl.maximum(largest, tl.where(ok & (res == res), res, float("-inf")))
    n_bad = tl.sum(bad_rows, axis=0)
    tl.store(OUT, tl.sum(unconverged, axis=0).to(tl.float64))
    tl.store(OUT + 1, tl.where(n_bad > 0, tl.min(first_bad, axis=0), 0).to(tl.float64))
    tl.store(OUT + 2, n_bad.to(tl.float64))
    tl.store(OUT + 3, tl.where(tl.sum(nan_rows, axis=0) > 0, float("nan"), tl.max(largest, axis=0)).to(tl.float64))


@triton.jit
def _summary_kernel(
    RES, NSTEP, LAST, LAST_NSTEP, PREV, NORM, CONVERGED, ABS_REL, SCALARS, NONFINITE,
    n_rows, tol, flt_max, rel_eps,
    STOP_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """:func:`summary_reference` in one program, BLOCK rows a step. RES, NSTEP: the returned
    iterate's residual and step; LAST, LAST_NSTEP, PREV: the current residual, its step
    and the residual one step earlier; NORM: the returned iterate's row norms (not read
    for "max"). Writes CONVERGED (R,) bool, ABS_REL (2, R) float32, SCALARS (4,) float32
    (SUMMARY_SCALARS) and NONFINITE () int32. Sums and counts in int32."""
    steps = tl.zeros([BLOCK], dtype=tl.int32)
    converged_rows = tl.zeros([BLOCK], dtype=tl.int32)
    nan_res = tl.zeros([BLOCK], dtype=tl.int32)
    nan_ratio = tl.zeros([BLOCK], dtype=tl.int32)
    bad_rows = tl.zeros([BLOCK], dtype=tl.int32)
    first_bad = tl.full([BLOCK], 2147483647, tl.int32)
    largest = tl.full([BLOCK], float("-inf"), tl.float32)
    contraction = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < n_rows
        res = tl.load(RES + r, mask=ok, other=0.0)
        steps += tl.load(NSTEP + r, mask=ok, other=0)
        converged = res < tol
        tl.store(CONVERGED + r, converged, mask=ok)
        converged_rows += (ok & converged).to(tl.int32)
        nan_res += (ok & (res != res)).to(tl.int32)
        largest = tl.maximum(largest, tl.where(ok & (res == res), res, float("-inf")))
        if STOP_MODE == 2:
            abs_res = tl.full([BLOCK], float("nan"), tl.float32)
            rel_res = abs_res
        else:
            norm = tl.load(NORM + r, mask=ok, other=1.0) + rel_eps
            if STOP_MODE == 0:
                abs_res = res
                rel_res = res / norm
            else:
                abs_res = res * norm
                rel_res = res
        tl.store(ABS_REL + r, abs_res, mask=ok)
        tl.store(ABS_REL + n_rows + r, rel_res, mask=ok)
        last = tl.load(LAST + r, mask=ok, other=0.0)
        prev = tl.load(PREV + r, mask=ok, other=0.0)
        since = (prev > 0) & (prev < flt_max)
        ratio = tl.where(since, last / tl.where(since, prev, 1.0), 0.0)
        nan_ratio += (ok & (ratio != ratio)).to(tl.int32)
        contraction = tl.maximum(contraction, tl.where(ok & (ratio == ratio), ratio, float("-inf")))
        bad, first = _first_bad_tl(last, tl.load(LAST_NSTEP + r, mask=ok, other=0), ok, flt_max)
        bad_rows += bad
        first_bad = tl.minimum(first_bad, first)
    tl.store(SCALARS, tl.where(tl.sum(nan_res, axis=0) > 0, float("nan"), tl.max(largest, axis=0)))
    tl.store(SCALARS + 1, tl.sum(steps, axis=0).to(tl.float32) / n_rows)
    tl.store(SCALARS + 2, tl.sum(converged_rows, axis=0).to(tl.float32) / n_rows)
    tl.store(SCALARS + 3, tl.where(tl.sum(nan_ratio, axis=0) > 0, float("nan"), tl.max(contraction, axis=0)))
    tl.store(NONFINITE, tl.where(tl.sum(bad_rows, axis=0) > 0, tl.min(first_bad, axis=0), 0))


@functools.lru_cache(maxsize=256)
def _check_launch(n_rows: int, tol: float, device: torch.device) -> Launch:
    return Launch(_check_kernel, (1,), (n_rows, tol, FLT_MAX, row_block(device)), 8, device)


@functools.lru_cache(maxsize=256)
def _summary_launch(n_rows: int, tol: float, stop_mode: str, device: torch.device) -> Launch:
    return Launch(_summary_kernel, (1,), (n_rows, tol, FLT_MAX, REL_EPS, STOP_MODES[stop_mode], row_block(device)),
                  8, device)


def check_triton(residual: torch.Tensor, nstep: torch.Tensor, tol: float) -> torch.Tensor:
    """:func:`check_reference` in one launch (``residual``, ``nstep``: flat ``(R,)``, R > 0)."""
    out = torch.empty(4, dtype=torch.float64, device=residual.device)
    _check_launch(residual.shape[0], float(tol), residual.device)(residual, nstep, out)
    return out


def check_reference(residual: torch.Tensor, nstep: torch.Tensor, tol: float) -> torch.Tensor:
    """float64 ``(4,)`` on the device: rows not below ``tol`` (NaN rows included), the
    first non-finite row's ``nstep`` (0 if none), non-finite rows, max residual (NaN if
    any row is NaN)."""
    if residual.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=residual.device)
    bad = ~torch.isfinite(residual)
    first_bad = torch.where(bad, nstep, _INT_MAX).amin()
    first_bad = torch.where(bad.any(), first_bad, 0)
    parts = [(~(residual < tol)).sum(), first_bad, bad.sum(), residual.amax()]
    return torch.stack([p.to(torch.float64) for p in parts])


def summary_triton(residual: torch.Tensor, nstep: torch.Tensor, last: torch.Tensor, last_nstep: torch.Tensor,
                   prev: torch.Tensor, norm: Optional[torch.Tensor], tol: float, stop_mode: str) -> dict:
    """:func:`summary_reference` in one launch (all flat ``(R,)``, R > 0; ``norm`` None for
    ``"max"``)."""
    n_rows, device = residual.shape[0], residual.device
    converged = torch.empty(n_rows, dtype=torch.bool, device=device)
    abs_rel = torch.empty((2, n_rows), dtype=torch.float32, device=device)
    scalars = torch.empty(4, dtype=torch.float32, device=device)
    nonfinite = torch.empty((), dtype=torch.int32, device=device)
    _summary_launch(n_rows, float(tol), stop_mode, device)(
        residual, nstep, last, last_nstep, prev, residual if norm is None else norm, converged, abs_rel, scalars,
        nonfinite)
    out = dict(zip(SUMMARY_SCALARS, scalars.unbind()))
    out.update(converged=converged, abs_lowest=abs_rel[0], rel_lowest=abs_rel[1], nonfinite_iter=nonfinite)
    return out


def summary_reference(residual: torch.Tensor, nstep: torch.Tensor, last: torch.Tensor, prev: torch.Tensor,
                      norm: Optional[torch.Tensor], check_vector: torch.Tensor, tol: float, stop_mode: str) -> dict:
    """The per-row and scalar statistics of ``info`` (:func:`deqkern.solve`): ``converged``,
    ``abs_lowest``, ``rel_lowest`` (flat ``(R,)``), ``max_residual``, ``mean_nstep``,
    ``converged_fraction``, ``contraction`` (float32) and ``nonfinite_iter`` (int32) from
    the returned iterate's ``residual``, ``nstep`` and row ``norm`` (None for ``"max"``),
    the current and previous residuals ``last``, ``prev`` and ``check_vector``
    (:func:`check_reference` of the current state)."""
    converged = residual < tol
    if stop_mode == "max":
        abs_res = rel_res = torch.full_like(residual, math.nan)
    else:
        norm = norm + REL_EPS
        abs_res = residual if stop_mode == "abs" else residual * norm
        rel_res = residual if stop_mode == "rel" else residual / norm
    ratio = torch.where((prev > 0) & (prev < FLT_MAX), last / prev, 0.0)
    if residual.numel():
        scalars = (residual.amax(), nstep.float().mean(), converged.float().mean(), ratio.amax())
    else:  # no rows: 0, 0, 1, 0 (float32 scalars on the device, from check_vector's zeros)
        zero = check_vector[0].float()
        scalars = (zero, zero, zero + 1, zero)
    return {"converged": converged, "abs_lowest": abs_res, "rel_lowest": rel_res,
            **dict(zip(SUMMARY_SCALARS, scalars)), "nonfinite_iter": check_vector[1].to(torch.int32)}
