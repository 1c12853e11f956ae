"""The one-launch solves for small batches: each row block's columns split over a group of
programs that meet at a group barrier, so that a few hundred rows still fill the GPU.

The block kernels (:mod:`deqkern.ops.persistent`, :mod:`deqkern.ops.persistent_adjoint`)
give each program whole rows: at R=256 that is 16 programs of 16 rows on a 132-SM GPU, each
streaming all of ``W`` from L2 every iteration. Here a row block of ``BLOCK_M`` rows is
solved by ``SPLIT`` programs, program ``(i, j)`` owning the ``BLOCK_N`` columns ``j`` of rows
``i``: it keeps its slice of the iterate in registers, reads its ``BLOCK_N`` rows of ``W``
(L1-resident across iterations) and the block's full iterate rows (L2), and exchanges
per-row partial sums with the other programs of its group through global scratch.

Per iteration of the forward (two group barriers)::

    z      = h[rows] @ W[cols].T + frozen[rows, cols]       (float32 accumulation)
    partial sum(z**2) -> barrier -> rstd (all programs of the group: identical sums)
    h_next = (1 - damping) * h + damping * gain * z * rstd
    partial residual statistics; h_next written back        -> barrier -> residual, commit

With ``EXCHANGE="z"`` in the configuration (``_solve_split1_kernel``) the forward needs one
group barrier per iteration: each program writes its columns of ``z`` (float32) and their
partial sum of squares; after the barrier every program of the group forms the whole rows
of ``h_next`` from the exchanged ``z`` and iterate, so it takes the residual and the stop
decision without a second exchange, and writes only its own columns. It reads three times
the bytes per iteration. Measured on an H200 (``bench/probe_split.py``, commit 57e0cc0, device
microseconds per iteration): bf16 256x512 7.9 against 7.2 for the two-barrier kernel's best
tile, fp32 256x512 14.8 against 15.9, bf16 1024x1024 42.7 against 19.0 (the larger tile
streams its z rows from L2). The chooser keeps the two-barrier kernel ("h"); "z" is there
to be asked for and measured.

and of the adjoint (``g <- v + J^T g`` at h*, z and n = z * rstd computed once)::

    u      = dz[rows] @ W[:, cols]
    g_next = v + (1 - damping) * g + u
    partial residual statistics and sum(dyg_next * z)       -> barrier -> residual, commit,
    dz     = rstd * (dyg - n * mean(dyg * n)) written back  -> barrier

The residual is :func:`~deqkern.ops.residual.row_residual_tl`'s, assembled from per-program
parts: each part is the column slice's max magnitude ``m``, scaled sum of squares
``sum((x/m)^2)`` and non-finite flag; the row's norm is ``M * sqrt(sum(s * (m/M)^2))``, so it
stays overflow-safe and any NaN/Inf still makes the residual NaN. Every program of a group
reduces the same parts in the same order, so all take the same decisions (which rows are
active, when to stop) and leave the loop together; the bookkeeping lives in registers and
program ``(i, 0)`` writes it out.

The group barrier (``group_sync_tl``) is one int32 word per row block in global memory,
each on its own 128-byte line: an arrival count and a generation, one atomic add per
arrival (acquire-release), one more by the last to arrive, polled with acquire by the
others. Its count returns to zero after every barrier, so one zeroed buffer per device and
stream serves every launch (``_barrier_counters``; a launch being captured in a CUDA graph
gets its own). It
needs the group's programs to be resident together: the launcher keeps the grid within the
GPU's SM count, and a group's programs are adjacent in launch order.

A program that polls ``MAX_SPINS`` times without the group arriving gives up and writes NaN
into its rows (the solve then reports non-finite rows instead of hanging). Such a launch
leaves its group's counters mid-barrier, so it marks the stream's counters unsound: every
later launch on them writes NaN too (never a miscounted barrier) until a solve reports its
non-finite rows to the host and :func:`forget_barriers` drops them. With the grid within the
SM count a group waits only while another kernel holds the SMs it needs; no test or
benchmark has hit the limit.

Under Triton's interpreter, whose programs run one after another, ``SPLIT`` is 1 and only
a CTA barrier remains. ``tests/gpu_compile.py`` compiles the ``SPLIT > 1`` code for sm_90.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from deqkern.ops.commit import FLT_MAX, RowState
from deqkern.ops.launch import STOP_MODES, Launch, cdiv, frozen_rows, next_power_of_2, rows, sm_count, stream_zeros
from deqkern.ops.persistent import Solved, block_check_tl, dot_tuple
from deqkern.ops.persistent_adjoint import Adjoint
from deqkern.ops.residual import REL_EPS

__all__ = ["split_config", "config_of", "use_split", "solve_split", "adjoint_split", "forget_barriers", "KERNEL",
           "BufferState", "row_views"]

#: Which one-launch kernel solves the cell (``DEQKERN_PERSISTENT_KERNEL``): "auto" (the
#: cluster kernel of :mod:`deqkern.ops.persistent_cluster` where it is built and fits, else
#: the split kernel where a GPU would leave at least half its SMs idle with whole-row
#: blocks, else the block kernel), "cluster" (as "auto"), "split" or "block" (these two
#: never the cluster kernel; for tests and benchmarks).
KERNEL = os.environ.get("DEQKERN_PERSISTENT_KERNEL", "auto")
#: Polls of a group barrier before a program gives up (about a second or more).
MAX_SPINS = 1 << 22
#: Statistics per row and program of the residual's parts: diff (m, s, bad), h_next (m, s,
#: bad), and the adjoint's sum(dyg * z).
_NSTAT: tl.constexpr = tl.constexpr(8)
#: int32 words between two groups' barrier words (one 128-byte line each: no two groups'
#: atomics on one line); the soundness flag BAR[0] has the first line.
_BAR_STRIDE: tl.constexpr = tl.constexpr(32)
#: Tiles of at most this many elements keep the loop-invariant frozen (forward) and v
#: (adjoint) tiles in registers; larger ones reload them (registers are short there).
_HOIST: tl.constexpr = tl.constexpr(2048)


# --------------------------------------------------------------------------- device helpers
@triton.jit
def group_sync_tl(GROUP, POISON, alive, SPLIT: tl.constexpr, SPINS: tl.constexpr):
    """A barrier of the group's SPLIT programs on one int32 word ``GROUP``: arrivals in its
    low 16 bits, the barrier's generation in the high 16. Each program arrives with one
    atomic add (acquire-release), whose old value gives the generation it waits on; the
    last to arrive returns the count to 0 and advances the generation in one more add
    (release), which the others poll for (acquire). The count is back at 0 after every
    barrier, so the word is reused from launch to launch without a reset (the generation
    carries on, and wraps: only its change is compared). Returns whether the program is
    still ``alive``: a wait that gives up after ``SPINS`` polls marks the counters unsound
    (``POISON``) and returns False; a program no longer alive passes without waiting. The
    CTA barriers around it order the program's global stores before its arrival and its
    later loads after the group's. With SPLIT 1 only the CTA barrier remains (the parts
    are still exchanged through memory, between the program's own threads)."""
    ok = alive
    tl.debug_barrier()
    if SPLIT > 1:
        if alive:
            old = tl.atomic_add(GROUP, 1, sem="acq_rel", scope="gpu")
            gen = old >> 16
            if (old & 0xFFFF) == SPLIT - 1:
                tl.atomic_add(GROUP, 65536 - SPLIT, sem="release", scope="gpu")
            else:
                seen = tl.atomic_add(GROUP, 0, sem="acquire", scope="gpu") >> 16
                spins = tl.full((), 0, tl.int32)
                while (seen == gen) & (spins < SPINS):
                    seen = tl.atomic_add(GROUP, 0, sem="acquire", scope="gpu") >> 16
                    spins += 1
                ok = seen != gen
                if seen == gen:
                    tl.atomic_xchg(POISON, 1, sem="relaxed", scope="gpu")
        tl.debug_barrier()
    return ok


@triton.jit
def _part_norm(x):
    """Per-row ``(m, s, bad)`` of a float32 tile (masked entries 0): max magnitude, scaled
    sum of squares ``sum((x/m)^2)``, 1.0 if any entry is not finite."""
    m = tl.max(tl.abs(x), axis=1)
    safe = tl.where(m > 0.0, m, 1.0)
    q = x / safe[:, None]
    bad = tl.max(tl.where(tl.abs(x) <= 3.4028234663852886e38, 0.0, 1.0), axis=1)
    return m, tl.sum(q * q, axis=1), bad


@triton.jit
def _combine_parts(m, s):
    """A row's ``(m, s)`` (norm ``m * sqrt(s)``) from its parts ``(BLOCK_M, SPLIT)``:
    ``M = max(m)``, ``sum(s * (m/M)^2)``."""
    big = tl.max(m, axis=1)
    safe = tl.where(big > 0.0, big, 1.0)
    q = m / safe[:, None]
    return big, tl.sum(s * q * q, axis=1)


@triton.jit
def _residual_of(md, sd, bd, mh, sh, bh, rel_eps, STOP_MODE: tl.constexpr):
    """:func:`~deqkern.ops.residual.row_residual_tl` of whole rows from their accumulated
    ``(m, s, bad)`` of the step and of the next iterate."""
    bad = bd
    if STOP_MODE == 2:
        res = md
    else:
        res = md * tl.sqrt(sd)
        if STOP_MODE == 1:
            norm = mh * tl.sqrt(sh)
            bad = tl.maximum(bad, bh)
            res = res / (norm + rel_eps)
            bad = tl.maximum(bad, tl.where(norm <= 3.4028234663852886e38, 0.0, 1.0))
        bad = tl.maximum(bad, tl.where(res <= 3.4028234663852886e38, 0.0, 1.0))
    return tl.where(bad > 0.0, float("nan"), res)


@triton.jit
def _store_parts(ST, r64, ok, pid_s, diff, h_next, extra, SPLIT: tl.constexpr):
    """This program's residual parts of ``diff`` and ``h_next`` and one extra per-row sum."""
    base = ST + (r64 * SPLIT + pid_s) * _NSTAT
    md, sd, bd = _part_norm(diff)
    mh, sh, bh = _part_norm(h_next)
    tl.store(base + 0, md, mask=ok)
    tl.store(base + 1, sd, mask=ok)
    tl.store(base + 2, bd, mask=ok)
    tl.store(base + 3, mh, mask=ok)
    tl.store(base + 4, sh, mask=ok)
    tl.store(base + 5, bh, mask=ok)
    tl.store(base + 6, extra, mask=ok)


@triton.jit
def _load_parts(ST, r64, ok, j, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Statistic ``j`` of every program of the group, ``(BLOCK_M, SPLIT_P2)`` float32 (0 past SPLIT)."""
    sp = tl.arange(0, SPLIT_P2)
    return tl.load(ST + (r64[:, None] * SPLIT + sp[None, :]) * _NSTAT + j, mask=ok[:, None] & (sp < SPLIT)[None, :],
                   other=0.0, cache_modifier=".cg")


@triton.jit
def _residual_from_parts(ST, r64, ok, rel_eps, STOP_MODE: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """:func:`_residual_of` of the whole rows, from the programs' parts (only those the
    stop mode uses are read)."""
    bd = tl.max(_load_parts(ST, r64, ok, 2, SPLIT, SPLIT_P2), axis=1)
    zero = tl.zeros_like(bd)
    md = _load_parts(ST, r64, ok, 0, SPLIT, SPLIT_P2)
    mh, sh, bh = zero, zero, zero
    if STOP_MODE == 2:
        md, sd = tl.max(md, axis=1), zero
    else:
        md, sd = _combine_parts(md, _load_parts(ST, r64, ok, 1, SPLIT, SPLIT_P2))
        if STOP_MODE == 1:
            mh, sh = _combine_parts(_load_parts(ST, r64, ok, 3, SPLIT, SPLIT_P2),
                                    _load_parts(ST, r64, ok, 4, SPLIT, SPLIT_P2))
            bh = tl.max(_load_parts(ST, r64, ok, 5, SPLIT, SPLIT_P2), axis=1)
    return _residual_of(md, sd, bd, mh, sh, bh, rel_eps, STOP_MODE)


@triton.jit
def _slice_product(A, stride_a, W, stride_wn, stride_wk, r64, row_ok, cn, n_ok, d,
                   PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """``A[rows] @ B[:, cols]`` in float32, ``B[k, n]`` at ``W + n * stride_wn + k * stride_wk``;
    ``A`` is read past L1 (other programs of the group write it between barriers)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        k_ok = ck < d
        a = tl.load(A + r64[:, None] * stride_a + ck[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                    cache_modifier=".cg")
        b = tl.load(W + cn[None, :] * stride_wn + ck[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _resident_operand(W, stride_wn, stride_wk, cn, n_ok, d, DOT_F32: tl.constexpr, BLOCK_D: tl.constexpr):
    """``B[:, cols]`` whole (``(BLOCK_D, BLOCK_N)``, ``B[k, n]`` as in ``_slice_product``), loaded
    once before the loop (ONE_DOT)."""
    kk = tl.arange(0, BLOCK_D)
    b = tl.load(W + cn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=(kk < d)[:, None] & n_ok[None, :],
                other=0.0)
    if DOT_F32:
        b = b.to(tl.float32)
    return b


@triton.jit
def _product(A, stride_a, W, stride_wn, stride_wk, b, r64, row_ok, cn, n_ok, d,
             PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ONE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``A[rows] @ B[:, cols]``: ONE_DOT, one ``tl.dot`` of the whole rows (one load, one
    latency) with the resident operand ``b``; else ``_slice_product``'s loop over K tiles."""
    if ONE_DOT:
        kk = tl.arange(0, BLOCK_D)
        a = tl.load(A + r64[:, None] * stride_a + kk[None, :], mask=row_ok[:, None] & (kk < d)[None, :], other=0.0,
                    cache_modifier=".cg")
        if DOT_F32:
            a = a.to(tl.float32)
        acc = tl.dot(a, b, input_precision=PRECISION)
    else:
        acc = _slice_product(A, stride_a, W, stride_wn, stride_wk, r64, row_ok, cn, n_ok, d, PRECISION, DOT_F32,
                             BLOCK_M, BLOCK_N, BLOCK_K)
    return acc


@triton.jit
def _commit_rows(active, res, res_old, prev, lowest, nstep, tol, flt_max):
    """One iteration's bookkeeping of the active rows (previous and lowest residual, steps,
    residual) and the counts of rows it committed and of rows still above ``tol``."""
    prev = tl.where(active, res_old, prev)
    lowest = tl.where(active & (res < lowest), res, lowest)
    nstep = tl.where(active, nstep + 1, nstep)
    res_old = tl.where(active, res, res_old)
    n_commit = tl.sum(active.to(tl.int32), axis=0)
    n_active = tl.sum((active & (res >= tol) & (res <= flt_max)).to(tl.int32), axis=0)
    return prev, lowest, nstep, res_old, n_commit, n_active


@triton.jit
def _frozen_tile(F, r64, stride_f, cn, m):
    """The program's tile of ``frozen`` (or another per-row input) in float32."""
    return tl.load(F + r64[:, None] * stride_f + cn[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _write_state(RES, PREV, LOWEST, NSTEP, CHECK, r, ok, pid_m, first, n_rows, res, prev, lowest, nstep, tol, flt_max,
                 BLOCK_M: tl.constexpr):
    """Program ``(i, 0)``: the row block's bookkeeping and its part of the host check."""
    tl.store(RES + r, res, mask=ok)
    tl.store(PREV + r, prev, mask=ok)
    tl.store(LOWEST + r, lowest, mask=ok)
    tl.store(NSTEP + r, nstep, mask=ok)
    tl.debug_barrier()
    block_check_tl(RES, NSTEP, CHECK, pid_m, first, n_rows, tol, flt_max, BLOCK_M)


@triton.jit
def _finish_forward(H, here, m, alive, RES, PREV, LOWEST, NSTEP, CHECK, r, ok, pid_s, pid_m, first, n_rows, res_old,
                    prev, lowest, nstep, tol, flt_max, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward's end: NaN rows where a barrier gave up (here or in an earlier launch;
    reported at step >= 1), then program ``(i, 0)`` writes the row state."""
    if not alive:
        tl.store(H + here, tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.float32).to(H.dtype.element_ty), mask=m)
        res_old = tl.full([BLOCK_M], float("nan"), tl.float32)
        nstep = tl.maximum(nstep, 1)
    if pid_s == 0:
        _write_state(RES, PREV, LOWEST, NSTEP, CHECK, r, ok, pid_m, first, n_rows, res_old, prev, lowest, nstep,
                     tol, flt_max, BLOCK_M)


@triton.jit
def _tile(n_rows, d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``(j, i)``'s part: its group index j and row block i, the block's first row,
    rows ``r`` (and int64), columns ``cn``, their masks, and the offsets of its tile in an
    ``(R, d)`` row-major buffer. A group's programs are adjacent in launch order (axis 0)."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    first = pid_m * BLOCK_M
    r = first + tl.arange(0, BLOCK_M)
    ok = r < n_rows
    r64 = r.to(tl.int64)
    cn = pid_s * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cn < d
    return pid_s, pid_m, first, r, ok, r64, cn, n_ok, ok[:, None] & n_ok[None, :], r64[:, None] * d + cn[None, :]


@triton.jit
def _buffers(BUF, n_rows, BLOCK_M: tl.constexpr):
    """The layout of the float32 buffer ``BUF`` (:func:`_views` on the host): the row state
    (residual, prev, lowest, nstep as int32), rstd, the host check ``(row blocks, 5)``, and
    where the kernel's own scratch starts."""
    check = BUF + 5 * n_rows
    nstep = (BUF + 3 * n_rows).to(tl.pointer_type(tl.int32), bitcast=True)
    return BUF, BUF + n_rows, BUF + 2 * n_rows, nstep, BUF + 4 * n_rows, check, check + 5 * tl.cdiv(n_rows, BLOCK_M)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _solve_split_kernel(
    H0, W, F, GAIN, H, BUF, BAR,
    n_rows, d, stride_h0, stride_w, stride_f,
    eps, damping, tol, max_iter, flt_max, rel_eps,
    STOP_MODE: tl.constexpr, WITH_RSTD: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, SPINS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_DOT: tl.constexpr,
):
    """The forward solve of rows ``i`` and columns ``j`` for program ``(i, j)`` (module
    docstring). H (R, d) holds the iterate; BUF (float32) the row state, rstd, host check
    and the exchanged parts (``_buffers``); BAR (2 * row blocks,) int32 the group
    barriers. WITH_RSTD: iterate until an iteration commits nothing, whose rstd is h*'s."""
    RES, PREV, LOWEST, NSTEP, RSTD, CHECK, SS = _buffers(BUF, n_rows, BLOCK_M)
    ST = SS + n_rows * SPLIT
    pid_s, pid_m, first, r, ok, r64, cn, n_ok, m, here = _tile(n_rows, d, BLOCK_M, BLOCK_N)
    bar = BAR + _BAR_STRIDE * (1 + pid_m)  # BAR[0]: set when a launch gave up waiting (group_sync_tl)

    h = tl.load(H0 + r64[:, None] * stride_h0 + cn[None, :], mask=m, other=0.0)
    tl.store(H + here, h, mask=m)
    h = h.to(tl.float32)
    gain = tl.load(GAIN + cn, mask=n_ok, other=0.0).to(tl.float32)
    wt = _resident_operand(W, stride_w, 1, cn, n_ok, d, DOT_F32, BLOCK_D) if ONE_DOT else 0.0
    res_old = tl.zeros([BLOCK_M], dtype=tl.float32) + flt_max
    prev = res_old
    lowest = tl.full([BLOCK_M], float("inf"), tl.float32)
    nstep = tl.zeros([BLOCK_M], dtype=tl.int32)
    # small tiles keep frozen in registers (one load less per iteration on the critical path)
    fz = _frozen_tile(F, r64, stride_f, cn, m) if BLOCK_M * BLOCK_N <= _HOIST else 0.0
    alive = group_sync_tl(bar, BAR, tl.load(BAR, cache_modifier=".cg") == 0, SPLIT, SPINS)

    k = tl.full((), 0, tl.int32)
    pending = tl.where(alive, 1, 0)
    while pending > 0:
        z = _product(H, d, W, stride_w, 1, wt, r64, ok, cn, n_ok, d, PRECISION, DOT_F32, ONE_DOT, BLOCK_M, BLOCK_N,
                     BLOCK_K, BLOCK_D)
        z += fz if BLOCK_M * BLOCK_N <= _HOIST else _frozen_tile(F, r64, stride_f, cn, m)
        tl.store(SS + r64 * SPLIT + pid_s, tl.sum(z * z, axis=1), mask=ok)
        alive = group_sync_tl(bar, BAR, alive, SPLIT, SPINS)
        sp = tl.arange(0, SPLIT_P2)
        ss = tl.sum(tl.load(SS + r64[:, None] * SPLIT + sp[None, :], mask=ok[:, None] & (sp < SPLIT)[None, :],
                            other=0.0, cache_modifier=".cg"), axis=1)
        rstd = tl.rsqrt(ss / d + eps)
        if WITH_RSTD:
            if pid_s == 0:
                tl.store(RSTD + r, rstd, mask=ok)
        # (a vector compare: the interpreter mistypes a vector-and-scalar boolean &)
        active = ok & (res_old >= tol) & (res_old <= flt_max) & (tl.zeros_like(r) + k < max_iter)
        am = active[:, None] & n_ok[None, :]
        h_next = tl.where(am, (1.0 - damping) * h + damping * (z * rstd[:, None] * gain[None, :]), 0.0)
        h_prev = tl.where(am, h, 0.0)
        _store_parts(ST, r64, ok, pid_s, h_next - h_prev, h_next, 0.0, SPLIT)
        tl.store(H + here, h_next.to(H.dtype.element_ty), mask=am)
        h = tl.where(am, h_next.to(H.dtype.element_ty).to(tl.float32), h)
        alive = group_sync_tl(bar, BAR, alive, SPLIT, SPINS)
        res = _residual_from_parts(ST, r64, ok, rel_eps, STOP_MODE, SPLIT, SPLIT_P2)
        prev, lowest, nstep, res_old, n_commit, n_active = _commit_rows(active, res, res_old, prev, lowest, nstep,
                                                                          tol, flt_max)
        k += 1
        if WITH_RSTD:
            pending = n_commit
        else:
            pending = tl.where(k < max_iter, n_active, 0)
        pending = tl.where(alive, pending, 0)
    _finish_forward(H, here, m, alive, RES, PREV, LOWEST, NSTEP, CHECK, r, ok, pid_s, pid_m, first, n_rows, res_old,
                    prev, lowest, nstep, tol, flt_max, BLOCK_M, BLOCK_N)


@triton.jit
def _acc_norm(m, s, x):
    """The running per-row ``(m, s)`` of ``_part_norm`` with a new float32 chunk ``x`` (the
    row norm is ``m * sqrt(s)``) and the chunk's non-finite flag."""
    mc, sc, bad = _part_norm(x)
    big = tl.maximum(m, mc)
    safe = tl.where(big > 0.0, big, 1.0)
    a = m / safe
    b = mc / safe
    return big, s * a * a + sc * b * b, bad


@triton.jit
def _advance(HB_OLD, HB_NEW, ZB_OLD, GAIN, H, r64, ok, active, rstd, kk, kok, pid_s, d, damping,
             BLOCK_N: tl.constexpr):
    """One chunk ``kk`` of whole rows of the next iterate, from the exchanged iterate
    ``HB_OLD`` and ``z`` (``ZB_OLD``): ``h_next = (1 - damping) h + damping * gain * z * rstd``
    on active rows. Every program of the group computes it from the same memory with the
    same code, so all hold the same values; each writes only its own columns (to the next
    exchange buffer and to h*). Returns the chunk in H's dtype (the next product's operand)
    and the float32 step and next iterate (0 on inactive rows) for the residual."""
    cm = ok[:, None] & kok[None, :]
    at = r64[:, None] * d + kk[None, :]
    h = tl.load(HB_OLD + at, mask=cm, other=0.0, cache_modifier=".cg")
    z = tl.load(ZB_OLD + at, mask=cm, other=0.0, cache_modifier=".cg")
    g = tl.load(GAIN + kk, mask=kok, other=0.0).to(tl.float32)
    am = active[:, None] & kok[None, :]
    hf = h.to(tl.float32)
    h_next = tl.where(am, (1.0 - damping) * hf + damping * (z * rstd[:, None] * g[None, :]), 0.0)
    hq = tl.where(am, h_next.to(H.dtype.element_ty), h)
    own = cm & ((kk >= pid_s * BLOCK_N) & (kk < pid_s * BLOCK_N + BLOCK_N))[None, :]
    tl.store(HB_NEW + at, hq, mask=own)
    tl.store(H + at, hq, mask=own & active[:, None])
    return hq, h_next - tl.where(am, hf, 0.0), h_next


@triton.jit
def _solve_split1_kernel(
    H0, W, F, GAIN, H, BUF, ZB, HB, BAR,
    n_rows, d, stride_h0, stride_w, stride_f,
    eps, damping, tol, max_iter, flt_max, rel_eps,
    STOP_MODE: tl.constexpr, WITH_RSTD: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, SPINS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_DOT: tl.constexpr,
):
    """The forward solve with one group barrier per iteration (module docstring, "z
    exchange"): program ``(i, j)`` writes its columns of ``z`` (float32, ``ZB``) and their
    partial sums of squares; after the barrier every program of the group forms the whole
    rows of the next iterate from the exchanged ``z`` and iterate (``HB``, H's dtype) and
    takes the residual and stop decision from them, then multiplies by its slice of W.
    ``ZB``, ``HB`` and the partial sums are double-buffered (``(2, R, d)``, ``(2, R, SPLIT)``):
    a program writes buffer ``1 - p`` only after the barrier that every program passed
    once it had read buffer ``1 - p`` the previous time. BUF as the two-barrier kernel's."""
    RES, PREV, LOWEST, NSTEP, RSTD, CHECK, SS = _buffers(BUF, n_rows, BLOCK_M)
    pid_s, pid_m, first, r, ok, r64, cn, n_ok, m, here = _tile(n_rows, d, BLOCK_M, BLOCK_N)
    bar = BAR + _BAR_STRIDE * (1 + pid_m)  # BAR[0]: set when a launch gave up waiting (group_sync_tl)
    plane = (tl.full((), 0, tl.int64) + n_rows) * d
    sp = tl.arange(0, SPLIT_P2)
    sm = ok[:, None] & (sp < SPLIT)[None, :]

    h = tl.load(H0 + r64[:, None] * stride_h0 + cn[None, :], mask=m, other=0.0)
    tl.store(H + here, h, mask=m)
    tl.store(HB + here, h, mask=m)
    wt = _resident_operand(W, stride_w, 1, cn, n_ok, d, DOT_F32, BLOCK_D) if ONE_DOT else 0.0
    z = _product(H0, stride_h0, W, stride_w, 1, wt, r64, ok, cn, n_ok, d, PRECISION, DOT_F32, ONE_DOT, BLOCK_M,
                 BLOCK_N, BLOCK_K, BLOCK_D)
    fz = _frozen_tile(F, r64, stride_f, cn, m)
    z += fz
    tl.store(ZB + here, z, mask=m)
    tl.store(SS + r64 * SPLIT + pid_s, tl.sum(z * z, axis=1), mask=ok)
    alive = group_sync_tl(bar, BAR, tl.load(BAR, cache_modifier=".cg") == 0, SPLIT, SPINS)

    res_old = tl.zeros([BLOCK_M], dtype=tl.float32) + flt_max
    prev = res_old
    lowest = tl.full([BLOCK_M], float("inf"), tl.float32)
    nstep = tl.zeros([BLOCK_M], dtype=tl.int32)
    k = tl.full((), 0, tl.int32)
    par = tl.full((), 0, tl.int32)
    pending = tl.where(alive, 1, 0)
    while pending > 0:
        old = par.to(tl.int64) * plane
        new = (1 - par).to(tl.int64) * plane
        ss = tl.sum(tl.load(SS + par * (n_rows * SPLIT) + r64[:, None] * SPLIT + sp[None, :], mask=sm, other=0.0,
                            cache_modifier=".cg"), axis=1)
        rstd = tl.rsqrt(ss / d + eps)
        if WITH_RSTD:
            if pid_s == 0:
                tl.store(RSTD + r, rstd, mask=ok)
        # (a vector compare: the interpreter mistypes a vector-and-scalar boolean &)
        active = ok & (res_old >= tol) & (res_old <= flt_max) & (tl.zeros_like(r) + k < max_iter)
        if ONE_DOT:
            kk = tl.arange(0, BLOCK_D)
            hq, diff, h_next = _advance(HB + old, HB + new, ZB + old, GAIN, H, r64, ok, active, rstd, kk, kk < d,
                                        pid_s, d, damping, BLOCK_N)
            md, sd, bd = _part_norm(diff)
            mh, sh, bh = _part_norm(h_next)
        else:
            zero = tl.zeros([BLOCK_M], dtype=tl.float32)
            md, sd, bd, mh, sh, bh = zero, zero, zero, zero, zero, zero
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                kok = kk < d
                hq, diff, h_next = _advance(HB + old, HB + new, ZB + old, GAIN, H, r64, ok, active, rstd, kk, kok,
                                            pid_s, d, damping, BLOCK_N)
                md, sd, b1 = _acc_norm(md, sd, diff)
                mh, sh, b2 = _acc_norm(mh, sh, h_next)
                bd = tl.maximum(bd, b1)
                bh = tl.maximum(bh, b2)
                b = tl.load(W + cn[None, :] * stride_w + kk[:, None], mask=kok[:, None] & n_ok[None, :], other=0.0)
                a = hq
                if DOT_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        res = _residual_of(md, sd, bd, mh, sh, bh, rel_eps, STOP_MODE)
        prev, lowest, nstep, res_old, n_commit, n_active = _commit_rows(active, res, res_old, prev, lowest, nstep,
                                                                          tol, flt_max)
        k += 1
        if WITH_RSTD:
            pending = n_commit  # once an iteration commits nothing, the rstd stored is h*'s
        else:
            pending = tl.where(k < max_iter, n_active, 0)
        pending = tl.where(alive, pending, 0)
        if pending > 0:
            if ONE_DOT:
                a = hq
                if DOT_F32:
                    a = a.to(tl.float32)
                z = tl.dot(a, wt, input_precision=PRECISION)
            else:
                z = acc
            z += fz if BLOCK_M * BLOCK_N <= _HOIST else _frozen_tile(F, r64, stride_f, cn, m)
            tl.store(ZB + new + here, z, mask=m)
            tl.store(SS + (1 - par) * (n_rows * SPLIT) + r64 * SPLIT + pid_s, tl.sum(z * z, axis=1), mask=ok)
            alive = group_sync_tl(bar, BAR, alive, SPLIT, SPINS)
            pending = tl.where(alive, pending, 0)
            par = 1 - par
    _finish_forward(H, here, m, alive, RES, PREV, LOWEST, NSTEP, CHECK, r, ok, pid_s, pid_m, first, n_rows, res_old,
                    prev, lowest, nstep, tol, flt_max, BLOCK_M, BLOCK_N)


@triton.jit
def _adjoint_split_kernel(
    HS, W, F, GAIN, V, G, DZ, BUF, BAR,
    n_rows, d, stride_hs, stride_w, stride_f, stride_v,
    eps, damping, tol, max_iter, flt_max, rel_eps,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, SPINS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_DOT: tl.constexpr,
):
    """The adjoint solve of rows ``i`` and columns ``j`` for program ``(i, j)`` (module
    docstring; the math of :mod:`deqkern.ops.persistent_adjoint`). G (R, d) float32 gets
    the solution, DZ (R, d) in W's dtype its VJP; BUF as the forward's, then each row
    block's part of d_gain (DGAIN_PART, (row blocks, d))."""
    RES, PREV, LOWEST, NSTEP, RSTD, CHECK, DGAIN_PART = _buffers(BUF, n_rows, BLOCK_M)
    SS = DGAIN_PART + tl.cdiv(n_rows, BLOCK_M) * d
    ST = SS + n_rows * SPLIT * 2
    pid_s, pid_m, first, r, ok, r64, cn, n_ok, m, here = _tile(n_rows, d, BLOCK_M, BLOCK_N)
    bar = BAR + _BAR_STRIDE * (1 + pid_m)  # BAR[0]: set when a launch gave up waiting (group_sync_tl)
    sp = tl.arange(0, SPLIT_P2)

    z = _slice_product(HS, stride_hs, W, stride_w, 1, r64, ok, cn, n_ok, d, PRECISION, DOT_F32,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    z += _frozen_tile(F, r64, stride_f, cn, m)
    bgain = damping * tl.load(GAIN + cn, mask=n_ok, other=0.0).to(tl.float32)
    g = _frozen_tile(V, r64, stride_v, cn, m)
    g0 = g
    tl.store(SS + (r64 * SPLIT + pid_s) * 2, tl.sum(z * z, axis=1), mask=ok)
    tl.store(SS + (r64 * SPLIT + pid_s) * 2 + 1, tl.sum(bgain[None, :] * g * z, axis=1), mask=ok)
    alive = group_sync_tl(bar, BAR, tl.load(BAR, cache_modifier=".cg") == 0, SPLIT, SPINS)
    parts = SS + (r64[:, None] * SPLIT + sp[None, :]) * 2
    pm = ok[:, None] & (sp < SPLIT)[None, :]
    ss = tl.sum(tl.load(parts, mask=pm, other=0.0, cache_modifier=".cg"), axis=1)
    dyz = tl.sum(tl.load(parts + 1, mask=pm, other=0.0, cache_modifier=".cg"), axis=1)
    rstd = tl.rsqrt(ss / d + eps)
    n = z * rstd[:, None]
    # dz = rstd * (dyg - n * mean(dyg * n)), mean(dyg * n) = rstd * sum(dyg * z) / d
    dz = rstd[:, None] * (bgain[None, :] * g - n * (rstd * dyz / d)[:, None])
    tl.store(DZ + here, dz.to(DZ.dtype.element_ty), mask=m)
    alive = group_sync_tl(bar, BAR, alive, SPLIT, SPINS)

    wt = _resident_operand(W, 1, stride_w, cn, n_ok, d, DOT_F32, BLOCK_D) if ONE_DOT else 0.0
    res_old = tl.zeros([BLOCK_M], dtype=tl.float32) + flt_max
    prev = res_old
    lowest = tl.full([BLOCK_M], float("inf"), tl.float32)
    nstep = tl.zeros([BLOCK_M], dtype=tl.int32)
    k = tl.full((), 0, tl.int32)
    pending = tl.where(alive, 1, 0)
    while pending > 0:
        u = _product(DZ, d, W, 1, stride_w, wt, r64, ok, cn, n_ok, d, PRECISION, DOT_F32, ONE_DOT, BLOCK_M, BLOCK_N,
                     BLOCK_K, BLOCK_D)
        active = ok & (res_old >= tol) & (res_old <= flt_max)
        am = active[:, None] & n_ok[None, :]
        v = g0 if BLOCK_M * BLOCK_N <= _HOIST else _frozen_tile(V, r64, stride_v, cn, m)
        g_prev = tl.where(am, g, 0.0)
        g_next = tl.where(am, v + (1.0 - damping) * g + u, 0.0)
        _store_parts(ST, r64, ok, pid_s, g_next - g_prev, g_next, tl.sum(bgain[None, :] * g_next * z, axis=1), SPLIT)
        alive = group_sync_tl(bar, BAR, alive, SPLIT, SPINS)
        res = _residual_from_parts(ST, r64, ok, rel_eps, 1, SPLIT, SPLIT_P2)
        dyz = tl.sum(_load_parts(ST, r64, ok, 6, SPLIT, SPLIT_P2), axis=1)
        dz = rstd[:, None] * (bgain[None, :] * g_next - n * (rstd * dyz / d)[:, None])
        tl.store(DZ + here, dz.to(DZ.dtype.element_ty), mask=am)
        g = tl.where(am, g_next, g)
        prev, lowest, nstep, res_old, _, n_active = _commit_rows(active, res, res_old, prev, lowest, nstep, tol,
                                                                 flt_max)
        alive = group_sync_tl(bar, BAR, alive, SPLIT, SPINS)
        k += 1
        pending = tl.where(alive & (k < max_iter), n_active, 0)
    if not alive:  # as the forward's; dz too, so no gradient is formed from it
        g = tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.float32)
        res_old = tl.full([BLOCK_M], float("nan"), tl.float32)
        nstep = tl.maximum(nstep, 1)
        tl.store(DZ + here, g.to(DZ.dtype.element_ty), mask=m)
    tl.store(G + here, g, mask=m)
    tl.store(DGAIN_PART + pid_m.to(tl.int64) * d + cn, tl.sum(tl.where(m, damping * g * n, 0.0), axis=0), mask=n_ok)
    if pid_s == 0:
        tl.store(RSTD + r, rstd, mask=ok)
        _write_state(RES, PREV, LOWEST, NSTEP, CHECK, r, ok, pid_m, first, n_rows, res_old, prev, lowest, nstep,
                     tol, flt_max, BLOCK_M)


# --------------------------------------------------------------------------- launch configuration
#: Cost model of one iteration of a program (seconds), used only to rank configurations,
#: fitted to device time per iteration on an H200 (bench/probe_split.py: bf16 256x512 and
#: 1024x1024): bytes it reads from L2 per second; flop/s of one SM's tl.dot at a 16x64 tile
#: (latency bound: about sqrt(area / 1024) times more on larger tiles); and a group
#: barrier's cost, fixed plus per program (arrivals on one counter are serialized; two
#: barriers an iteration).
_L2_BYTES_PER_SM = 100e9
_FLOPS_PER_SM = 0.6e12
_SYNC_SECONDS = 0.5e-6
_SYNC_SECONDS_PER_PROGRAM = 0.16e-6
#: Largest operands (bytes) of a single whole-row ``tl.dot`` with W's slice resident (ONE_DOT).
_ONE_DOT_BYTES = 96 * 1024
#: Largest BLOCK_M x BLOCK_N a program holds (a handful of float32 tiles of it live at once).
_MAX_TILE = 8192


@functools.lru_cache(maxsize=1024)
def split_config(n_rows: int, d: int, element_size: int, n_sm: int, interpreted: bool) -> Optional[dict]:
    """``BLOCK_M`` rows by ``BLOCK_N`` (a power of two) columns per program, ``SPLIT =
    cdiv(d, BLOCK_N)`` programs per row block and, when ``SPLIT > 1``, at most ``n_sm``
    programs (the group barrier needs them resident together), ranked by the cost model
    above; None if no tile fits (``d`` too large for a whole row at ``SPLIT`` 1 and too
    few SMs to split it). The interpreter gets ``SPLIT`` 1 (its programs run in turn)."""
    best, best_cost = None, float("inf")
    for block_m in (16, 32, 64, 128):
        row_blocks = cdiv(n_rows, block_m)
        block_n = max(16, next_power_of_2(d))
        while block_n >= 16:
            split = cdiv(d, block_n)
            if interpreted and split > 1:
                break
            if (split == 1 or row_blocks * split <= n_sm) and block_m * block_n <= _MAX_TILE:
                cost = ((block_m + block_n) * d * element_size / _L2_BYTES_PER_SM
                        + 2.0 * block_m * block_n * d / (_FLOPS_PER_SM * (block_m * block_n / 1024) ** 0.5)
                        + (2 * (_SYNC_SECONDS + _SYNC_SECONDS_PER_PROGRAM * split) if split > 1 else 0.0))
                if cost < best_cost:
                    best_cost = cost
                    best = dict(BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split, SPLIT_P2=next_power_of_2(split),
                                BLOCK_K=min(64 if element_size <= 2 else 32, max(16, next_power_of_2(d))),
                                ONE_DOT=(block_m + block_n) * max(16, next_power_of_2(d)) * element_size
                                <= _ONE_DOT_BYTES,
                                num_warps=4 if block_m * block_n <= 2048 else 8, num_stages=2)
            block_n //= 2
        if row_blocks == 1:
            break
    return best


def config_of(n_rows: int, d: int, t: torch.Tensor) -> Optional[dict]:
    """:func:`split_config` for rows like ``t`` on its device."""
    return _resolve(n_rows, d, t.element_size(), t.device, None)


def use_split(n_rows: int, d: int, t: torch.Tensor) -> bool:
    """Whether the one-launch solves of ``n_rows`` rows like ``t`` take the split kernels
    (:data:`KERNEL`): on a GPU by default when whole-row blocks of 16 would leave at least
    half of the SMs idle and a split tile fits."""
    return _use_split(n_rows, d, t.element_size(), t.device, KERNEL)


@functools.lru_cache(maxsize=1024)
def _use_split(n_rows: int, d: int, element_size: int, device: torch.device, kernel: str) -> bool:
    if kernel not in ("auto", "cluster", "split", "block"):
        raise ValueError(f"DEQKERN_PERSISTENT_KERNEL (deqkern.ops.persistent_split.KERNEL) must be 'auto', 'cluster', "
                         f"'split' or 'block'; got {kernel!r}")
    if kernel == "block" or n_rows == 0:
        return False
    cpu = device.type == "cpu"
    n_sm = 1 if cpu else sm_count(device.index or 0)
    if split_config(n_rows, d, element_size, n_sm, cpu) is None:
        return False
    return kernel == "split" or (not cpu and 2 * cdiv(n_rows, 16) <= n_sm)  # "cluster": as "auto" here


# --------------------------------------------------------------------------- launchers
class BufferState(RowState):
    """The row state of a split launch: its four per-row fields are views of the launch's
    float32 buffer, made when first read (a call that never reads them, as with
    ``on_nonconvergence="ignore"``, makes none: a few microseconds of host time)."""

    def __init__(self, buf: torch.Tensor, n_rows: int):  # the dataclass's fields are the properties below
        self._buf, self._n, self._fields = buf, n_rows, None

    def _views(self) -> tuple:
        if self._fields is None:
            res, prev, lowest, nstep = self._buf[:4 * self._n].view(4, self._n).unbind(0)
            self._fields = (res, prev, lowest, nstep.view(torch.int32))
        return self._fields

    residual = property(lambda self: self._views()[0])
    prev = property(lambda self: self._views()[1])
    lowest = property(lambda self: self._views()[2])
    nstep = property(lambda self: self._views()[3])


class _Plan:
    """A launch of one kernel for one call signature, and the layout of its buffer."""

    __slots__ = ("launch", "n_rows", "blocks", "sizes", "offsets", "total", "exchange")

    def __init__(self, launch: Launch, n_rows: int, blocks: int, extra: int, scratch: int, exchange: tuple = (0, 0)):
        self.launch, self.n_rows, self.blocks = launch, n_rows, blocks
        # residual, prev, lowest, nstep, rstd, check, then ``extra`` (the adjoint's d_gain parts) and scratch
        sizes = [n_rows, n_rows, n_rows, n_rows, n_rows, 5 * blocks, extra + scratch]
        self.exchange = exchange != (0, 0)
        if self.exchange:  # the z and iterate exchange buffers, each 16-byte aligned (Launch's fast path)
            sizes[-1] += -sum(sizes) % 4
            sizes += [exchange[0] + -exchange[0] % 4, exchange[1]]
        self.sizes = tuple(sizes)
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        self.total = sum(self.sizes)  # the buffer's float32 elements

    def exchange_buffers(self, buf: torch.Tensor, dtype: torch.dtype) -> tuple:
        """The one-barrier forward's z (float32) and iterate (``dtype``) buffers."""
        return (buf.as_strided((self.sizes[7],), (1,), self.offsets[7]),
                buf.as_strided((self.sizes[8],), (1,), self.offsets[8]).view(dtype))

    def views(self, buf: torch.Tensor) -> tuple:
        """``(RowState, rstd, check, rest)`` views of the float32 buffer (:func:`row_views`
        and what follows the check)."""
        return (*row_views(buf, self.n_rows, self.blocks, True),
                buf.as_strided((self.sizes[6],), (1,), self.offsets[6]))


def row_views(buf: torch.Tensor, n_rows: int, blocks: int, with_rstd: bool) -> tuple:
    """``(RowState, rstd or None, check)`` views of a one-launch solve's float32 buffer, laid
    out as ``_buffers``: residual, prev, lowest, nstep, rstd (``n_rows`` each), then the host
    check ``(blocks, 5)``. The row state's views are made when first read
    (:class:`BufferState`); rstd's only ``with_rstd``."""
    rstd = buf.as_strided((n_rows,), (1,), 4 * n_rows) if with_rstd else None
    return BufferState(buf, n_rows), rstd, buf.as_strided((blocks, 5), (5, 1), 5 * n_rows)


def _resolve(n_rows: int, d: int, element_size: int, device: torch.device, config: Optional[tuple]) -> dict:
    """The given configuration (``tuple(dict.items())``), else :func:`split_config`'s."""
    if config is not None:
        return dict(config)
    cpu = device.type == "cpu"
    return split_config(n_rows, d, element_size, 1 if cpu else sm_count(device.index or 0), cpu)


@functools.lru_cache(maxsize=256)
def _solve_plan(n_rows: int, d: int, dtypes: tuple, device: torch.device, strides: tuple, eps: float,
                damping: float, tol: float, max_iter: int, stop_mode: str, with_rstd: bool, dots: tuple,
                config: Optional[tuple]) -> _Plan:
    cfg = _resolve(n_rows, d, dtypes[0].itemsize, device, config)
    blocks = cdiv(n_rows, cfg["BLOCK_M"])
    one_barrier = cfg.get("EXCHANGE", "h") == "z"
    tiles = _tiles(cfg, d)
    launch = Launch(_solve_split1_kernel if one_barrier else _solve_split_kernel, (cfg["SPLIT"], blocks),
                    (n_rows, d, *strides, float(eps), float(damping), float(tol), int(max_iter), FLT_MAX, REL_EPS,
                     STOP_MODES[stop_mode], with_rstd, *dots, *tiles),
                    cfg["num_warps"], device, num_stages=cfg["num_stages"])
    if one_barrier:
        return _Plan(launch, n_rows, blocks, 0, 2 * n_rows * cfg["SPLIT"],
                     (2 * n_rows * d, cdiv(2 * n_rows * d * dtypes[0].itemsize, 4)))
    return _Plan(launch, n_rows, blocks, 0, n_rows * cfg["SPLIT"] * (1 + _NSTAT.value))


@functools.lru_cache(maxsize=256)
def _adjoint_plan(n_rows: int, d: int, dtypes: tuple, device: torch.device, strides: tuple, eps: float,
                  damping: float, tol: float, max_iter: int, dots: tuple, config: Optional[tuple]) -> _Plan:
    cfg = _resolve(n_rows, d, dtypes[0].itemsize, device, config)
    blocks = cdiv(n_rows, cfg["BLOCK_M"])
    launch = Launch(_adjoint_split_kernel, (cfg["SPLIT"], blocks),
                    (n_rows, d, *strides, float(eps), float(damping), float(tol), int(max_iter), FLT_MAX, REL_EPS, *dots,
                     *_tiles(cfg, d)),
                    cfg["num_warps"], device, num_stages=cfg["num_stages"])
    return _Plan(launch, n_rows, blocks, blocks * d, n_rows * cfg["SPLIT"] * (2 + _NSTAT.value))


def _tiles(cfg: dict, d: int) -> tuple:
    """The kernels' trailing constexprs, SPLIT to ONE_DOT."""
    return (cfg["SPLIT"], cfg["SPLIT_P2"], MAX_SPINS, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
            max(16, next_power_of_2(d)), cfg["ONE_DOT"])  # tl.dot's K >= 16


#: Zeroed barrier counters by (device, stream): ``group_sync_tl`` leaves them at zero.
_BARRIERS: dict = {}


def forget_barriers() -> None:
    """Drop the cached barrier counters (the next launch on each stream gets zeroed ones):
    after a solve reported non-finite rows, which is how a launch that gave up waiting at a
    barrier, and every later one on its stream, shows (their counters are marked unsound)."""
    _BARRIERS.clear()


def _barrier_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """One int32 barrier word per row block, each on its own line after the soundness flag's,
    for a launch on the current stream of ``device`` (:func:`~deqkern.ops.launch.stream_zeros`:
    ``group_sync_tl`` leaves them at zero)."""
    return stream_zeros(_BARRIERS, device, _BAR_STRIDE.value * (1 + blocks))


def solve_split(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h0: torch.Tensor, eps: float,
    damping: float, max_iter: int, tol: float, stop_mode: str, with_rstd: bool, config: Optional[dict] = None,
) -> Solved:
    """:func:`deqkern.ops.persistent.solve_triton` by the split kernel (same arguments and
    outputs; ``check`` has one row per row block). ``config``: :func:`split_config`'s
    choice unless given (tests and benchmarks). The launch is planned once per call
    signature (:class:`~deqkern.ops.launch.Launch`); a call allocates h*, one float32
    buffer and the barrier counters."""
    d = weight.shape[0]
    h_in = rows(h0, d)
    f, stride_f = frozen_rows(frozen, d)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_rows = h_in.shape[0]
    device = h0.device
    # every tensor's dtype is in the key: the launch reuses one compiled kernel
    plan = _solve_plan(n_rows, d, (h0.dtype, w.dtype, f.dtype, gain.dtype), device, (h_in.stride(0), w.stride(0), stride_f), eps, damping,
                       tol, max_iter, stop_mode, with_rstd, dot_tuple(h0), config and tuple(config.items()))
    h = torch.empty(h0.shape, dtype=h0.dtype, device=device)
    buf = torch.empty(plan.total, dtype=torch.float32, device=device)
    exchange = plan.exchange_buffers(buf, h0.dtype) if plan.exchange else ()
    plan.launch(h_in, w, f, gain if gain.stride(0) == 1 else gain.contiguous(), h, buf, *exchange,
                _barrier_counters(device, plan.blocks))
    return Solved(h, *row_views(buf, n_rows, plan.blocks, with_rstd))


def adjoint_split(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h_star: torch.Tensor, v: torch.Tensor,
    eps: float, damping: float, max_iter: int, tol: float, config: Optional[dict] = None,
) -> Adjoint:
    """:func:`deqkern.ops.persistent_adjoint.adjoint_triton` by the split kernel (``config``
    as in :func:`solve_split`)."""
    d = weight.shape[0]
    hs, vv = rows(h_star, d), rows(v, d)
    f, stride_f = frozen_rows(frozen, d)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_rows = hs.shape[0]
    device = h_star.device
    plan = _adjoint_plan(n_rows, d, (h_star.dtype, w.dtype, f.dtype, gain.dtype, vv.dtype), device, (hs.stride(0), w.stride(0), stride_f, vv.stride(0)),
                         eps, damping, tol, max_iter, dot_tuple(weight), config and tuple(config.items()))
    g = torch.empty((n_rows, d), dtype=torch.float32, device=device)
    dz = torch.empty((n_rows, d), dtype=weight.dtype, device=device)
    buf = torch.empty(plan.total, dtype=torch.float32, device=device)
    plan.launch(hs, w, f, gain if gain.stride(0) == 1 else gain.contiguous(), vv, g, dz, buf,
                _barrier_counters(device, plan.blocks))
    state, rstd, check, rest = plan.views(buf)
    parts = rest[:plan.blocks * d].view(plan.blocks, d)
    return Adjoint(g, state, dz, rstd, parts[0] if plan.blocks == 1 else parts.sum(0), check)
