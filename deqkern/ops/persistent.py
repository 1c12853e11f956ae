"""The whole Picard solve of the frozen-context cell in one launch: the forward kernel, its
launcher and eager twin (fallback and test oracle), and the device and host helpers it
shares with the adjoint solve (:mod:`deqkern.ops.persistent_adjoint`).

The cell, per row of ``h`` ``(R, d)`` -- exactly one step of the loop path (a GEMM, then
:mod:`deqkern.ops.update`, then :mod:`deqkern.ops.commit`)::

    z      = h @ W.T + frozen         h, W in the storage dtype, float32 accumulation
    rstd   = 1 / sqrt(mean(z**2) + eps)
    h_next = (1 - damping) * h + damping * gain * z * rstd      (stored in the storage dtype)
    residual = row_residual(h_next (float32, before rounding) - h, h_next)   (deqkern.ops.residual)

with the solver's bookkeeping (:mod:`deqkern.ops.commit`): a row is active while
``tol <= residual <= FLT_MAX`` (its residual starts at ``FLT_MAX``); an active row commits
``h_next`` and its statistics (:class:`~deqkern.ops.commit.RowState`); a converged or
non-finite row keeps its iterate.

Kernel design, both solves (one program per block of ``BLOCK_M`` rows; no grid-wide
synchronization, since a row's next iterate depends only on that row):

- Phase A, the GEMM: for each ``BLOCK_N``-column tile, ``tl.dot`` over ``BLOCK_K`` tiles of
  the block's iterate (read from the iterate buffer, which the block's own rows keep in L1/L2)
  and of ``W`` (read from L2: every program streams all of it each iteration), plus
  ``frozen``, written in float32 to a scratch ``Z`` ``(R, d)``. ``tl.dot`` needs tiles of at
  least 16: ``BLOCK_M, BLOCK_N, BLOCK_K >= 16``, edges masked.
- Phase B, the row-wise part: ``SUB_M`` whole rows at a time (``BLOCK_D >= d`` columns,
  since RMSNorm and the residual reduce over the row; ``row_residual_tl`` is the one
  residual helper every kernel uses): rstd, the update, the residual, the commit.
- ``tl.debug_barrier()`` (a CTA barrier, which also orders the program's global-memory
  accesses) between the phases: each phase reads what other threads of the program wrote
  in the previous one (``Z`` after A; the iterate and the row state after B).
- A program loops while one of its rows is active and ``k < max_iter``: early exit per
  block of rows, the iteration count read by no one on the host, so a launch is
  capturable in a CUDA graph. The iterate lives in the output buffer itself.
- At the end each program writes its part of the solver's host check (``block_check_tl``),
  so the policies need one small read-back and no reduction launches.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deqkern.ops.commit import FLT_MAX, RowState, commit_reference
from deqkern.ops.launch import STOP_MODES, cdiv, compute_dtype, frozen_rows, next_power_of_2, rows, sm_count
from deqkern.ops.residual import REL_EPS, row_residual, row_residual_tl

__all__ = ["Solved", "solve_triton", "solve_reference", "persistent_config", "config_for", "dot_args", "dot_tuple", "FP32_DOT",
           "new_row_state", "product_tl", "init_state_tl", "commit_state_tl", "block_check_tl", "cell_z", "cell_rstd",
           "any_active"]


# --------------------------------------------------------------------------- device helpers
@triton.jit
def product_tl(A, stride_a, W, stride_wn, stride_wk, F, stride_f, OUT, rows, row_ok, d,
               HAS_F: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Phase A: ``OUT[rows] = A[rows] @ B (+ F[rows])`` in float32, ``B[k, n]`` at
    ``W + n * stride_wn + k * stride_wk`` (``W.T`` or ``W``); OUT is ``(R, d)`` contiguous.
    DOT_F32: upcast the operands first (same products, exact in float32, same float32
    sums): Triton's interpreter multiplies bfloat16's raw bits in tl.dot."""
    r64 = rows.to(tl.int64)[:, None]
    for n0 in range(0, d, BLOCK_N):
        cn = n0 + tl.arange(0, BLOCK_N)
        n_ok = cn < d
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ck = k0 + tl.arange(0, BLOCK_K)
            k_ok = ck < d
            a = tl.load(A + r64 * stride_a + ck[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(W + cn[None, :] * stride_wn + ck[:, None] * stride_wk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        mask = row_ok[:, None] & n_ok[None, :]
        if HAS_F:
            acc += tl.load(F + r64 * stride_f + cn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + r64 * d + cn[None, :], acc, mask=mask)


@triton.jit
def init_state_tl(RES, PREV, LOWEST, NSTEP, r, ok, flt_max, SUB_M: tl.constexpr):
    """RowState.start for rows ``r``: residual and prev FLT_MAX, lowest inf, nstep 0."""
    start = tl.zeros([SUB_M], dtype=tl.float32) + flt_max
    tl.store(RES + r, start, mask=ok)
    tl.store(PREV + r, start, mask=ok)
    tl.store(LOWEST + r, tl.full([SUB_M], float("inf"), tl.float32), mask=ok)
    tl.store(NSTEP + r, tl.zeros([SUB_M], dtype=tl.int32), mask=ok)


@triton.jit
def commit_state_tl(RES, PREV, LOWEST, NSTEP, r, active, res_old, res):
    """The bookkeeping of deqkern.ops.commit for the active rows ``r``."""
    lowest = tl.load(LOWEST + r, mask=active, other=0.0)
    nstep = tl.load(NSTEP + r, mask=active, other=0)
    tl.store(RES + r, res, mask=active)
    tl.store(PREV + r, res_old, mask=active)
    tl.store(LOWEST + r, tl.where(res < lowest, res, lowest), mask=active)
    tl.store(NSTEP + r, nstep + 1, mask=active)


@triton.jit
def block_check_tl(RES, NSTEP, CHECK, pid, first, n_rows, tol, flt_max, BLOCK_M: tl.constexpr):
    """This program's part of the solver's host check (``check_vector`` of
    deqkern.solver.loop) over its rows: ``CHECK[pid] = (unconverged rows, first non-finite
    step or 0, non-finite rows, largest finite residual, largest nstep)``, float32 (exact:
    counts and steps are far below 2**24). Read after the launch's barrier-ordered stores."""
    r = first + tl.arange(0, BLOCK_M)
    ok = r < n_rows
    res = tl.load(RES + r, mask=ok, other=0.0)
    nstep = tl.load(NSTEP + r, mask=ok, other=0)
    bad = ok & ~(tl.abs(res) <= flt_max)
    n_bad = tl.sum(bad.to(tl.int32), axis=0)
    first_bad = tl.min(tl.where(bad, nstep, 2147483647), axis=0)
    out = CHECK + pid * 5
    tl.store(out, tl.sum((ok & ~(res < tol)).to(tl.int32), axis=0).to(tl.float32))
    tl.store(out + 1, tl.where(n_bad > 0, first_bad, 0).to(tl.float32))
    tl.store(out + 2, n_bad.to(tl.float32))
    tl.store(out + 3, tl.max(tl.where(ok & ~bad, res, 0.0), axis=0))
    tl.store(out + 4, tl.max(tl.where(ok, nstep, 0), axis=0).to(tl.float32))


# --------------------------------------------------------------------------- kernels
@triton.jit
def _solve_kernel(
    H0, W, F, GAIN, H, Z, RES, PREV, LOWEST, NSTEP, RSTD, CHECK,
    n_rows, d, stride_h0, stride_w, stride_f,
    eps, damping, tol, max_iter, flt_max, rel_eps,
    STOP_MODE: tl.constexpr, WITH_RSTD: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr, STAGES_B: tl.constexpr,
):
    """The forward solve of BLOCK_M rows (module docstring). H (R, d) holds the iterate,
    Z (R, d) float32 is scratch; RES, PREV, LOWEST, NSTEP: the RowState; CHECK: the
    program's part of the host check (``block_check_tl``).
    WITH_RSTD: after the last commit, one more phase A at the returned iterate gives its
    rstd (RSTD); without it the program stops right after its last commit."""
    first = tl.program_id(0) * BLOCK_M
    block = first + tl.arange(0, BLOCK_M)
    block_ok = block < n_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    c = cols[None, :]

    for s in range(0, BLOCK_M, SUB_M):
        r = first + s + tl.arange(0, SUB_M)
        ok = r < n_rows
        r64 = r.to(tl.int64)[:, None]
        m = ok[:, None] & col_ok[None, :]
        tl.store(H + r64 * d + c, tl.load(H0 + r64 * stride_h0 + c, mask=m, other=0.0), mask=m)
        init_state_tl(RES, PREV, LOWEST, NSTEP, r, ok, flt_max, SUB_M)
    tl.debug_barrier()

    k = tl.full((), 0, tl.int32)
    pending = tl.full((), 1, tl.int32)
    while pending > 0:
        product_tl(H, d, W, stride_w, 1, F, stride_f, Z, block, block_ok, d,
                   True, PRECISION, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
        n_active = tl.full((), 0, tl.int32)
        n_commit = tl.full((), 0, tl.int32)
        for s in tl.range(0, BLOCK_M, SUB_M, num_stages=STAGES_B):
            r = first + s + tl.arange(0, SUB_M)
            ok = r < n_rows
            r64 = r.to(tl.int64)[:, None]
            z = tl.load(Z + r64 * d + c, mask=ok[:, None] & col_ok[None, :], other=0.0)
            rstd = tl.rsqrt(tl.sum(z * z, axis=1) / d + eps)
            if WITH_RSTD:
                tl.store(RSTD + r, rstd, mask=ok)
            res_old = tl.load(RES + r, mask=ok, other=0.0)
            # (a vector compare: the interpreter mistypes a vector-and-scalar boolean &)
            active = ok & (res_old >= tol) & (res_old <= flt_max) & (tl.zeros_like(r) + k < max_iter)
            am = active[:, None] & col_ok[None, :]
            h = tl.load(H + r64 * d + c, mask=am, other=0.0).to(tl.float32)
            gain = tl.load(GAIN + cols, mask=col_ok, other=0.0).to(tl.float32)  # here: not live across phase A
            h_next = tl.where(am, (1.0 - damping) * h + damping * (z * rstd[:, None] * gain[None, :]), 0.0)
            res = row_residual_tl(h_next - h, h_next, rel_eps, STOP_MODE)
            tl.store(H + r64 * d + c, h_next.to(H.dtype.element_ty), mask=am)
            commit_state_tl(RES, PREV, LOWEST, NSTEP, r, active, res_old, res)
            n_commit += tl.sum(active.to(tl.int32), axis=0)
            n_active += tl.sum((active & (res >= tol) & (res <= flt_max)).to(tl.int32), axis=0)
        tl.debug_barrier()
        k += 1
        if WITH_RSTD:
            pending = n_commit
        else:
            pending = tl.where(k < max_iter, n_active, 0)
    block_check_tl(RES, NSTEP, CHECK, tl.program_id(0), first, n_rows, tol, flt_max, BLOCK_M)


# --------------------------------------------------------------------------- launchers
#: Elements of a phase-B tile per warp on a GPU: 32 per thread and tensor. Phase B is a chain
#: of ``BLOCK_M / SUB_M`` dependent steps (loads, row reductions, stores), each bound by
#: memory latency, so wider steps win even where ptxas spills a little. H200, bf16, device
#: time of 5 iterations (bench/probe_block.py, 725dfe0): 8 elements per thread took 1074 us
#: at 8192x1024 and 1192 at 32768x512; 32 took 597 and 658 (the adjoint 1412 -> 817 and
#: 1743 -> 1008).
_GPU_SUB_TILE_PER_WARP = 1024
#: Under the interpreter every program and op costs milliseconds: whole blocks per tile.
_INTERPRETER_SUB_TILE = 16384


@functools.lru_cache(maxsize=1024)
def persistent_config(n_rows: int, d: int, element_size: int, interpreted: bool, n_sm: int) -> dict:
    """Launch parameters of both kernels (see the module docstring for the tiles).

    ``BLOCK_M`` trades the number of programs against W traffic: every program streams
    all of W from L2 once per iteration, so fewer, taller blocks read less, but fewer
    than one block per SM leaves SMs idle. Aim at one block per SM, between 16 (tl.dot's
    minimum; at R=256 that is 16 programs) and 64 (at 32768x512, 64-row blocks took 658 us
    where 128-row ones took 785 at best: more programs to hide phase B's latency). Eight
    warps for rows wider than 512 (a ``BLOCK_D`` of 1024 or more), else four (measured at
    8192x1024 and 32768x512).
    ``STAGES_B``: the software pipeline depth of phase B's loop (1: none; 3 gained at 16
    elements a thread, lost at 32 in the adjoint)."""
    if interpreted:
        block_m = 16
        block_n = block_k = min(64, max(16, next_power_of_2(d)))
        num_warps, num_stages, sub_tile = 4, 1, _INTERPRETER_SUB_TILE
    else:
        block_m = min(64, max(16, next_power_of_2(cdiv(n_rows, n_sm))))
        block_n = min(128, max(16, next_power_of_2(d)))
        block_k = min(64 if element_size <= 2 else 32, max(16, next_power_of_2(d)))
        num_warps = 8 if d > 512 else 4
        num_stages = 3
        sub_tile = _GPU_SUB_TILE_PER_WARP * num_warps
    block_d = next_power_of_2(d)
    sub_m = max(1, min(block_m, sub_tile // block_d))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, SUB_M=sub_m,
                STAGES_B=1, num_warps=num_warps, num_stages=num_stages)


def config_for(n_rows: int, d: int, t: torch.Tensor) -> dict:
    cpu = t.device.type == "cpu"
    return persistent_config(n_rows, d, t.element_size(), cpu, 1 if cpu else sm_count(t.device.index or 0))


#: tl.dot's precision for float32 storage where torch does not allow TF32 matmuls:
#: "tf32x3" (three TF32 tensor-core products per term, about 2**-21 relative error per
#: product against float32's 2**-24) rather than "ieee" (exact float32 on the FMA units).
#: Measured (H200, bench/probe_split.py --fp32-dot, b366833), device us an iteration of the
#: forward: fp32 256x512 (split kernel) tf32x3 16.0, ieee 29.7, one TF32 product 11.6;
#: 4096x512 (block kernel) 91.4, 214.7, 44.4.
FP32_DOT = "tf32x3"


def dot_args(t: torch.Tensor) -> dict:
    """tl.dot's arguments for storage like ``t``: 16-bit products are exact in float32 (the
    precision argument, Triton's default "tf32", only concerns float32 operands); float32
    uses TF32 where torch allows it for matmuls, else :data:`FP32_DOT`; bfloat16 is upcast
    under the interpreter (see ``product_tl``)."""
    precision, dot_f32 = dot_tuple(t)
    return dict(PRECISION=precision, DOT_F32=dot_f32)


def dot_tuple(t: torch.Tensor) -> tuple:
    """:func:`dot_args`'s values ``(PRECISION, DOT_F32)``, cached per storage kind (the float32
    matmul precision is read for float32 storage only)."""
    dtype = t.dtype
    return _dot_tuple(dtype, t.device.type, torch.get_float32_matmul_precision() if dtype == torch.float32 else "")


@functools.lru_cache(maxsize=64)
def _dot_tuple(dtype: torch.dtype, device_type: str, matmul_precision: str) -> tuple:
    exact = dtype == torch.float32 and matmul_precision == "highest"  # allow_tf32, cheaper
    return FP32_DOT if exact else "tf32", device_type == "cpu" and dtype == torch.bfloat16


class Solved(NamedTuple):
    """The forward solve's outputs."""

    h: torch.Tensor  #: h_star, h0's shape and dtype (a new tensor)
    state: RowState  #: flat (R,) per-row bookkeeping
    rstd: Optional[torch.Tensor]  #: (R,) rstd of h_star's z (``with_rstd``), else None
    check: Optional[torch.Tensor]  #: (programs, 5) float32 parts of the host check (kernels only)


def new_row_state(n_rows: int, device: torch.device) -> RowState:
    return RowState(*(torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(3)),
                    nstep=torch.empty(n_rows, dtype=torch.int32, device=device))


def solve_triton(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h0: torch.Tensor, eps: float,
    damping: float, max_iter: int, tol: float, stop_mode: str, with_rstd: bool,
) -> Solved:
    """Launch the forward solve. ``weight`` ``(d, d)`` and ``h0`` ``(..., d)`` in the storage
    dtype, ``frozen`` ``(..., d)`` (h0's shape) or ``(d,)``, ``gain`` ``(d,)``, any float dtype."""
    d = weight.shape[0]
    h_in = rows(h0, d)
    f, stride_f = frozen_rows(frozen, d)
    n_rows = h_in.shape[0]
    device = h0.device
    h = torch.empty(h0.shape, dtype=h0.dtype, device=device)
    state = new_row_state(n_rows, device)
    rstd = torch.empty(n_rows if with_rstd else 0, dtype=torch.float32, device=device)
    cfg = config_for(n_rows, d, h0)
    n_programs = cdiv(n_rows, cfg["BLOCK_M"])
    check = torch.empty((n_programs, 5), dtype=torch.float32, device=device)
    if n_rows > 0:
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        _solve_kernel[(n_programs,)](
            h_in, w, f, gain.contiguous(), h, torch.empty((n_rows, d), dtype=torch.float32, device=device),
            state.residual, state.prev, state.lowest, state.nstep, rstd, check,
            n_rows, d, h_in.stride(0), w.stride(0), stride_f,
            float(eps), float(damping), float(tol), int(max_iter), FLT_MAX, REL_EPS,
            STOP_MODE=STOP_MODES[stop_mode], WITH_RSTD=with_rstd, **dot_args(h0), **cfg,
        )
    return Solved(h, state, rstd if with_rstd else None, check)


# --------------------------------------------------------------------------- eager twins
def cell_z(h: torch.Tensor, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return F.linear(h.to(w.dtype), w) + f


def cell_rstd(z: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


def any_active(state: RowState, tol: float) -> bool:
    """Early exit of the eager twins: on the CPU only (elsewhere a read-back would sync
    the host each iteration; the remaining iterations change nothing: all rows frozen)."""
    if state.residual.device.type != "cpu":
        return True
    return bool(((state.residual >= tol) & (state.residual <= FLT_MAX)).any())


def solve_reference(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h0: torch.Tensor, eps: float,
    damping: float, max_iter: int, tol: float, stop_mode: str, with_rstd: bool,
) -> Solved:
    """:func:`solve_triton` in torch ops (float32 math, float64 for float64 tensors):
    the fallback and the oracle (``rstd`` float64 for float64 inputs; ``check`` None)."""
    d = weight.shape[0]
    ct = compute_dtype(h0)
    w, f, g = weight.to(ct), frozen.to(ct).reshape(-1, d), gain.to(ct)
    h = rows(h0, d)
    state = RowState.start(h.shape[0], h.device)
    for _ in range(max_iter):
        z = cell_z(h, w, f)
        h_prev = h.to(ct)
        h_next = (1.0 - damping) * h_prev + damping * (z * cell_rstd(z, eps) * g)
        h = commit_reference(h, h_next.to(h.dtype), row_residual(h_next, h_prev, stop_mode), state, tol, stop_mode)
        if not any_active(state, tol):
            break
    rstd = cell_rstd(cell_z(h, w, f), eps).squeeze(-1) if with_rstd else None
    return Solved(h.reshape(h0.shape).clone(), state, rstd, None)  # a new tensor, not a view: autograd wraps it
