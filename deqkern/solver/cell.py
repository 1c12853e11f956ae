""":func:`solve_cell`: the fixed point of the frozen-context cell as one differentiable function.

``h = (1 - damping) * h + damping * gain * RMSNorm(h @ weight.T + frozen)``, row by row.
Small problems run the whole solve in one persistent kernel (:mod:`deqkern.ops.persistent`:
one launch forward, one for the adjoint, no host sync inside either; both on Hopper
thread-block clusters where :mod:`deqkern.ops.persistent_cluster` takes them); large ones the
GEMM + fused-update loop of :func:`deqkern.solve_fused` (:func:`use_persistent` decides).

Gradients. ``"ift"``: the persistent adjoint solve gives ``g`` and ``dz = VJP_z(g)`` at
``h*``; then ``d_frozen = dz``, ``d_weight = dz.T @ h*``, ``d_gain = damping * sum g * n``
(no recorded application of the cell, no autograd graph). ``"onestep"``: the gradient of
one cell application at ``h*.detach()``. ``"unrolled"`` runs the loop path (autograd
records every iteration of the loop; a single kernel launch has nothing to record).

``torch.compile``: the solve and the adjoint are ``torch.library`` custom ops with fake
implementations, so a function calling :func:`solve_cell` with
``on_nonconvergence="ignore"`` traces with no graph break (the other policies read one
result on the host: one break). Outside tracing the kernels are called directly (the
dispatcher costs tens of microseconds a call, a large part of a small solve).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from deqkern import _backend
from deqkern.functional import update_with_stats
from deqkern.ops import persistent, persistent_adjoint, persistent_cluster, persistent_split
from deqkern.ops.commit import RowState
from deqkern.ops.launch import compute_dtype
from deqkern.solver.adjoint import Equilibrium
from deqkern.solver.api import solve_fused
from deqkern._validation import check_damping, check_tensor, positive_float
from deqkern.solver.config import validate_options
from deqkern.solver.loop import enforce
from deqkern.solver.report import Info, report

__all__ = ["solve_cell", "use_persistent", "PERSISTENT_MAX_ELEMENTS", "PERSISTENT_MAX_MACS",
           "PERSISTENT_MAX_MACS_32", "PERSISTENT_MAX_D", "PERSISTENT_BLOCK_MAX_D", "BACKEND"]

#: Largest ``rows * d`` solved by the persistent kernel (no size above it measured faster).
PERSISTENT_MAX_ELEMENTS = 2**25
#: Largest ``rows * d * d`` (the product's multiply-adds an iteration) solved by the
#: persistent kernel. The loop path's GEMM is about 2.3x as fast an iteration as the block
#: kernel's product (bf16, H200), so the loop wins once its iterations, not its host code,
#: bound it. Measured (bench/bench_cell.py, wall per call, the default "warn" policy, runs at
#: 6cde6e6, bc9729f, ec5b587): 8192x1024 (2**33) persistent 0.73-0.91 ms forward, 1.21-1.34
#: adjoint, against the loop's 0.92-1.54 and 1.38-1.58; 32768x512 (2**33) 0.81-1.00 and
#: 1.33-1.48 against 1.09-1.58 and 1.79-2.10. Past it: 16384x1024 (2**34) 1.34 against the
#: loop's 1.10 forward; 65536x512 (2**34) about even (1.49 against 1.61); 65536x1024 (2**36)
#: 4.92 against 3.38.
PERSISTENT_MAX_MACS = 2**33
#: :data:`PERSISTENT_MAX_MACS` for float32 (and float64) storage, whose products run as three
#: TF32 ones (or on the eager twin): fp32, "warn", d9b28fa: 8192x1024 (2**33) 6.08 ms forward
#: and 12.0 adjoint against the loop's 5.14 and 6.38; 32768x512 (2**33) 4.05 against 5.77
#: forward, 9.71 against 7.22 adjoint. At 256x512 (2**26) the persistent path is 4.8x the loop.
PERSISTENT_MAX_MACS_32 = 2**30
#: Widest rows for the persistent kernel (its row-wise phase holds whole rows on chip).
PERSISTENT_MAX_D = 2048
#: Widest rows for the persistent path where the split kernel does not take the size (so the
#: block kernel would): each of its ~one-per-SM programs streams all of W every iteration, 8
#: MB at d = 2048. H200, bf16, "warn" (ec5b587): 1024x2048 1.03 ms against the loop's 0.844,
#: 2048x2048 1.44 against 1.33; at d = 1024 (2 MB) 2048x1024 0.47 against 1.38. The split
#: kernel, which splits W between programs, took 256x2048 in 0.287 ms against 1.41.
PERSISTENT_BLOCK_MAX_D = 1024
#: What :func:`deqkern.last_backend` reports after the persistent kernel ran.
BACKEND = "triton-persistent"
_WHAT = "deqkern.solve_cell"


def use_persistent(n_rows: int, d: int, split: bool = False, element_size: int = 2) -> bool:
    """The size heuristic: the persistent kernel for ``n_rows x d`` problems with
    ``d <= PERSISTENT_MAX_D``, at most :data:`PERSISTENT_MAX_ELEMENTS` elements and
    :data:`PERSISTENT_MAX_MACS` multiply-adds an iteration (:data:`PERSISTENT_MAX_MACS_32`
    for storage of ``element_size`` 4 bytes or more), and rows wider than
    :data:`PERSISTENT_BLOCK_MAX_D` only where the split kernel takes the size (``split``);
    else the loop path."""
    max_macs = PERSISTENT_MAX_MACS if element_size <= 2 else PERSISTENT_MAX_MACS_32
    return (d <= PERSISTENT_MAX_D and n_rows * d <= PERSISTENT_MAX_ELEMENTS
            and n_rows * d * d <= max_macs and (d <= PERSISTENT_BLOCK_MAX_D or split))


# --------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class _Settings:
    eps: float
    damping: float
    max_iter: int
    tol: float
    stop_mode: str
    backward: str
    b_max_iter: int
    b_tol: float
    on_nonconvergence: str


def _validate(h0_meta: tuple, weight_meta: tuple, frozen_meta: tuple, gain_meta: tuple, eps, damping, max_iter, tol,
           stop_mode, backward, b_max_iter, b_tol, on_nonconvergence) -> _Settings:
    """All checks, on metadata ``(shape, dtype, device)`` only; cached per signature."""
    shape, dtype, device = h0_meta
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"h0 must have shape (..., d) with d >= 1; got {shape}")
    d = shape[-1]
    expected = {"weight": ((d, d),), "frozen": (shape, (d,)), "gain": ((d,),)}
    for name, (t_shape, t_dtype, t_device) in (("weight", weight_meta), ("frozen", frozen_meta), ("gain", gain_meta)):
        if t_shape not in expected[name]:
            want = " or ".join(str(s) for s in expected[name])
            raise ValueError(f"{name} must have shape {want} (h0 is {shape}); got {t_shape}")
        if t_device != device:
            raise ValueError(f"{name} must be on h0's device {device}; got {t_device}")
    if weight_meta[1] != dtype:
        raise TypeError(f"weight must have h0's dtype {dtype} (the storage dtype of the solve); got {weight_meta[1]}")
    positive_float("eps", eps)
    check_damping(damping)
    max_iter, tol, b_max_iter, b_tol, _ = validate_options(
        max_iter=max_iter, tol=tol, stop_mode=stop_mode, backward=backward, b_max_iter=b_max_iter, b_tol=b_tol,
        check_every=None, on_nonconvergence=on_nonconvergence)
    return _Settings(float(eps), float(damping), max_iter, tol, stop_mode, backward, b_max_iter, b_tol,
                     on_nonconvergence)


def _meta(name: str, t: object) -> tuple:
    check_tensor(name, t)
    return tuple(t.shape), t.dtype, t.device


#: Checked settings by call signature (tensor metadata and the scalar arguments); bounded.
_PLANS: dict = {}
_MAX_PLANS = 256


def _plan(weight, frozen, gain, h0, scalars: tuple) -> _Settings:
    """The call's settings: looked up by metadata alone (no check repeated), else
    validated (with the messages of :func:`_validate`) and stored. Under tracing, or with
    an unhashable argument, validated each call."""
    try:
        key = (h0.shape, h0.dtype, h0.device, weight.shape, weight.dtype, weight.device, frozen.shape, frozen.dtype,
               frozen.device, gain.shape, gain.dtype, gain.device, scalars)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable scalar: the checks say which
        key = plan = None
    tracing = torch.compiler.is_compiling()
    if plan is not None and not tracing:
        return plan
    plan = _validate(_meta("h0", h0), _meta("weight", weight), _meta("frozen", frozen), _meta("gain", gain),
                     *scalars)
    if key is not None and not tracing:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _autocast(weight: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under ``torch.autocast`` the iterate and W are stored in the autocast dtype (as
    :func:`deqkern.solve` stores its iterate; W's gradient flows back through the cast).
    ``frozen`` and ``gain`` keep their dtype: the kernels read any float dtype."""
    device_type = h0.device.type
    if not torch.is_autocast_enabled(device_type) or h0.dtype == torch.float64:
        return weight, h0
    dtype = torch.get_autocast_dtype(device_type)
    return weight.to(dtype), h0.to(dtype)


# --------------------------------------------------------------------------- running the kernels
def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU even when it is not the current one (the switch only then:
    it costs microseconds)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _run_solve(weight, frozen, gain, h0, s: _Settings, with_rstd: bool = False) -> persistent.Solved:
    """The forward solve by the persistent kernel, or its eager twin where Triton cannot
    run (``deqkern._backend``). ``with_rstd``: also the rstd of h*'s z (one more GEMM
    pass inside the same launch)."""
    args = (weight, frozen, gain, h0, s.eps, s.damping, s.max_iter, s.tol, s.stop_mode, with_rstd)
    if _backend.select(h0.device, h0.dtype, h0.shape[-1]) == "eager":
        _backend.record("eager")
        with torch.no_grad():
            return persistent.solve_reference(*args)
    config = persistent_cluster.cluster_for(weight, frozen, gain, h0)
    if config is not None:
        _backend.record(persistent_cluster.BACKEND)
        return persistent_cluster.solve_cluster(*args, config)  # its launch handles a device that is not the current one
    _backend.record(BACKEND)  # the kernels record no autograd graph
    if persistent_split.use_split(h0.numel() // h0.shape[-1], h0.shape[-1], h0):
        return persistent_split.solve_split(*args)  # its launch handles a device that is not the current one
    with _on_device(h0):
        return persistent.solve_triton(*args)


def _run_adjoint(weight, frozen, gain, h_star, grad, eps, damping, max_iter, tol) -> persistent_adjoint.Adjoint:
    """The adjoint solve at ``h_star`` for ``grad`` (any float dtype: the kernel reads it into
    float32; iterated in float32, float64 for float64)."""
    args = (weight, frozen, gain, h_star, grad, eps, damping, max_iter, tol)
    if _backend.select(h_star.device, h_star.dtype, h_star.shape[-1]) == "eager":
        _backend.record("eager")
        return persistent_adjoint.adjoint_reference(*args)
    config = persistent_cluster.adjoint_for(weight, frozen, gain, h_star)
    if config is not None:
        _backend.record(persistent_cluster.BACKEND)
        return persistent_cluster.adjoint_cluster(*args, config)
    _backend.record(BACKEND)
    if persistent_split.use_split(h_star.numel() // h_star.shape[-1], h_star.shape[-1], h_star):
        return persistent_split.adjoint_split(*args)
    with _on_device(h_star):
        return persistent_adjoint.adjoint_triton(*args)


def _param_grads(dz, d_gain, h_star, frozen, gain, needs) -> tuple:
    """``d_weight = dz.T @ h*``, ``d_frozen = dz`` (summed over rows when broadcast),
    ``d_gain``, each in its parameter's dtype; None where not needed. ``d_gain``: a tensor,
    or the adjoint's :class:`~deqkern.ops.persistent_adjoint.Adjoint` (its copy in gain's
    dtype where the kernel wrote one)."""
    d = dz.shape[-1]
    d_weight = dz.t().mm(h_star.reshape(-1, d)) if needs[0] else None
    if not needs[1]:
        d_frozen = None
    elif frozen.dim() == 1:
        d_frozen = dz.sum(0, dtype=compute_dtype(dz)).to(frozen.dtype)
    else:
        d_frozen = dz.reshape(frozen.shape).to(frozen.dtype)
    if not needs[2]:
        return d_weight, d_frozen, None
    return d_weight, d_frozen, d_gain.to(gain.dtype) if isinstance(d_gain, torch.Tensor) else d_gain.gain_grad(gain.dtype)


def _enforce(check, policy: str, *args) -> None:
    """The policy on a solve's host check (none read: nothing to do). Non-finite rows also
    drop the split kernels' barrier counters: a barrier that gave up shows as such rows."""
    if check is None:
        return
    if check.bad_rows:
        persistent_split.forget_barriers()
    enforce(check, policy, *args)


# --------------------------------------------------------------------------- autograd (eager)
@dataclass
class _Backward:
    settings: _Settings
    info: dict


class _Implicit(torch.autograd.Function):
    """Returns ``h*`` (boxed in a list: a new output, not a view of an input) with the
    implicit gradient to ``weight``, ``frozen`` and ``gain``; the backward fills the
    ``b_*`` keys of ``info`` and applies the non-convergence policy."""

    @staticmethod
    def forward(ctx, weight, frozen, gain, box: list, problem: _Backward):
        ctx.save_for_backward(weight, frozen, gain, box[0])
        ctx.problem = problem
        return box[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, frozen, gain, h_star = ctx.saved_tensors
        s, info = ctx.problem.settings, ctx.problem.info
        out = _run_adjoint(weight, frozen, gain, h_star, grad, s.eps, s.damping, s.b_max_iter, s.b_tol)
        # the parameter gradients are queued before the policy's host read: the GPU works on
        # them while the host waits, instead of idling after it
        grads = _param_grads(out.dz, out, h_star, frozen, gain, ctx.needs_input_grad)
        check = report(info, "b_", out.g.view(grad.shape), out.state, out.check, s.b_tol, "rel",
                        s.on_nonconvergence)
        _enforce(check, s.on_nonconvergence, f"{_WHAT} backward (adjoint solve)", out.g.shape[0], s.b_max_iter,
                 s.b_tol, "rel", info)
        return (*grads, None, None)


# --------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("deqkern::solve_cell", mutates_args=())
def _solve_op(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h0: torch.Tensor, eps: float, damping: float,
    max_iter: int, tol: float, stop_mode: str, b_max_iter: int, b_tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h (h0's shape), residual, prev, lowest, nstep)``; ``b_max_iter``, ``b_tol`` are for
    the registered backward."""
    s = _Settings(eps, damping, max_iter, tol, stop_mode, "ift", b_max_iter, b_tol, "ignore")
    h, state, _, _ = _run_solve(weight, frozen, gain, h0, s)
    # the split kernel's row state is views of one buffer: a custom op's outputs may not alias
    return h, state.residual.clone(), state.prev.clone(), state.lowest.clone(), state.nstep.clone()


@_solve_op.register_fake
def _solve_op_fake(weight, frozen, gain, h0, eps, damping, max_iter, tol, stop_mode, b_max_iter, b_tol):
    n_rows = math.prod(h0.shape[:-1])
    stats = [h0.new_empty((n_rows,), dtype=torch.float32) for _ in range(3)]
    return torch.empty_like(h0, memory_format=torch.contiguous_format), *stats, h0.new_empty((n_rows,), dtype=torch.int32)


@torch.library.custom_op("deqkern::solve_cell_adjoint", mutates_args=())
def _adjoint_op(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h_star: torch.Tensor, grad: torch.Tensor,
    eps: float, damping: float, max_iter: int, tol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz (R, d) in W's dtype, d_gain (d,))`` of the adjoint solve."""
    out = _run_adjoint(weight, frozen, gain, h_star, grad, eps, damping, max_iter, tol)
    return out.dz, out.d_gain


@_adjoint_op.register_fake
def _adjoint_op_fake(weight, frozen, gain, h_star, grad, eps, damping, max_iter, tol):
    d = weight.shape[0]
    return weight.new_empty((math.prod(h_star.shape[:-1]), d)), weight.new_empty((d,), dtype=compute_dtype(h_star))


def _op_setup(ctx, inputs, output):
    weight, frozen, gain, _, eps, damping, _, _, _, b_max_iter, b_tol = inputs
    ctx.save_for_backward(weight, frozen, gain, output[0])
    ctx.mark_non_differentiable(*output[1:])
    ctx.adjoint_args = (eps, damping, b_max_iter, b_tol)


def _op_backward(ctx, grad_h, *_):
    weight, frozen, gain, h_star = ctx.saved_tensors
    dz, d_gain = _adjoint_op(weight, frozen, gain, h_star, grad_h, *ctx.adjoint_args)
    return (*_param_grads(dz, d_gain, h_star, frozen, gain, ctx.needs_input_grad), *(None,) * 8)


_solve_op.register_autograd(_op_backward, setup_context=_op_setup)


# --------------------------------------------------------------------------- the two paths
def _persistent(weight, frozen, gain, h0, s: _Settings, needs_grad: bool, with_rstd: bool = False):
    """The persistent path: the kernel (through the custom op under tracing), info and the
    policy, then the requested gradient. ``with_rstd``: ``info["rstd"]`` too."""
    compiling = torch.compiler.is_compiling()
    if compiling:
        with torch.set_grad_enabled(needs_grad and s.backward == "ift"):
            h, *stats = _solve_op(weight, frozen, gain, h0, s.eps, s.damping, s.max_iter, s.tol, s.stop_mode,
                                  s.b_max_iter, s.b_tol)
        state, parts, info = RowState(*stats), None, {}
    else:
        h, state, rstd, parts = _run_solve(weight, frozen, gain, h0, s, with_rstd)
        info = Info()
        if rstd is not None:
            dict.__setitem__(info, "rstd", rstd.view(h.shape[:-1]))
    h_star = h  # h0's shape, not a view: autograd lets the caller modify it in place (then refuses backward)
    check = report(info, "", h_star, state, parts, s.tol, s.stop_mode, s.on_nonconvergence)
    # the row count from h*: the split kernels' row state is made when first read
    _enforce(check, s.on_nonconvergence, _WHAT, h_star.numel() // h_star.shape[-1], s.max_iter, s.tol, s.stop_mode,
             info)
    if not needs_grad or (compiling and s.backward == "ift"):
        return h_star, info
    if s.backward == "onestep":
        f_out, _, _ = update_with_stats(F.linear(h_star, weight), frozen, h_star, gain, eps=s.eps, damping=s.damping,
                                        stop_mode=s.stop_mode)
        return Equilibrium.apply(f_out, [h_star], None), info
    return _Implicit.apply(weight, frozen, gain, [h_star], _Backward(s, info)), info


def _loop(weight, frozen, gain, h0, s: _Settings):
    """Today's GEMM + fused-update loop (:func:`deqkern.solve_fused`), with the layer's fused adjoint."""
    from deqkern.nn.cell_adjoint import cell_adjoint  # here: deqkern.nn imports deqkern.solver

    def step(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_next, residual, _ = update_with_stats(F.linear(h, weight), frozen, h, gain, eps=s.eps, damping=s.damping,
                                                stop_mode=s.stop_mode)
        return h_next, residual

    adjoint = None
    if s.backward == "ift":
        adjoint = cell_adjoint(weight, gain, frozen, damping=s.damping, eps=s.eps)
    return solve_fused(step, h0, adjoint=adjoint, max_iter=s.max_iter, tol=s.tol, stop_mode=s.stop_mode,
                       backward=s.backward, b_max_iter=s.b_max_iter, b_tol=s.b_tol,
                       on_nonconvergence=s.on_nonconvergence)


# --------------------------------------------------------------------------- public API
def solve_cell(
    weight: torch.Tensor,
    frozen: torch.Tensor,
    gain: torch.Tensor,
    h0: torch.Tensor,
    *,
    damping: float = 0.85,
    eps: float = 1e-6,
    max_iter: int = 20,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    backward: str = "ift",
    b_max_iter: Optional[int] = None,
    b_tol: Optional[float] = None,
    on_nonconvergence: str = "warn",
    return_rstd: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Solve ``h = (1 - damping) h + damping * gain * RMSNorm(h @ weight.T + frozen)`` per row.

    Args:
        weight: ``(d, d)``, h0's dtype (the storage dtype). Differentiable.
        frozen: ``(..., d)`` (h0's shape) or ``(d,)`` (broadcast), any float dtype: the
            h-independent term (injection + contexts + bias). Differentiable.
        gain: ``(d,)``, any float dtype: RMSNorm's weight. Differentiable.
        h0: ``(..., d)`` starting iterate; float16, bfloat16, float32 (float32
            accumulation) or float64. Receives no gradient.
        damping: in ``(0, 1]``. eps: RMSNorm's epsilon, > 0.
        max_iter, tol, stop_mode, backward, b_max_iter, b_tol, on_nonconvergence: as
            :func:`deqkern.solve`, except that the adjoint's stop test is always the
            relative residual (independent of the loss's scale), and ``"unrolled"``
            runs the loop path.
        return_rstd: also ``info["rstd"]`` ``(...)`` float32, ``1 / sqrt(mean(z*^2) + eps)``
            of ``z* = h* @ weight.T + frozen``, the row statistic a Lipschitz bound of the
            cell needs (the persistent kernel forms it in the same launch).

    Returns:
        ``h_star`` ``(..., d)`` in h0's dtype (the autocast dtype under
        ``torch.autocast``), differentiable per ``backward``; ``info``: the keys of
        :func:`deqkern.solve` (``b_*`` ones after ``backward()``), computed on first
        use on the persistent path (:class:`Info`). With
        ``on_nonconvergence="ignore"`` nothing syncs the host: ``iterations`` (the
        largest ``nstep``) is then a device tensor, and a NaN/Inf is reported through
        ``info`` (``nonfinite_iter``) instead of raising; under ``torch.compile`` the
        ``b_*`` keys are not filled and the backward applies no policy.

    Raises:
        NonFiniteError, ConvergenceError (``"raise"``), ConvergenceWarning (``"warn"``),
        ValueError / TypeError for bad arguments, as :func:`deqkern.solve`.

    :func:`deqkern.last_backend` reports ``"triton-persistent"`` when the persistent
    kernel ran, ``"cuda-cluster"`` when the cluster kernel did (bf16/fp16 on an sm_90 GPU, a
    few hundred rows, ``d`` up to about 800 forward, 512 for the adjoint), ``"eager"`` for
    the torch twin (float64, or no Triton). After a backward it names the adjoint's.
    """
    if isinstance(weight, torch.Tensor) and isinstance(h0, torch.Tensor):
        weight, h0 = _autocast(weight, h0)
    s = _plan(weight, frozen, gain, h0, (eps, damping, max_iter, tol, stop_mode, backward, b_max_iter, b_tol,
                                        on_nonconvergence))
    if return_rstd is not False and return_rstd is not True:
        raise TypeError(f"return_rstd must be a bool; got {type(return_rstd).__name__}")
    d = h0.shape[-1]
    n_rows = h0.numel() // d
    split = d > PERSISTENT_BLOCK_MAX_D and persistent_split.use_split(n_rows, d, h0)
    if s.backward == "unrolled" or not use_persistent(n_rows, d, split, h0.element_size()):
        h_star, info = _loop(weight, frozen, gain, h0, s)
    else:
        needs_grad = torch.is_grad_enabled() and (weight.requires_grad or frozen.requires_grad or gain.requires_grad)
        h_star, info = _persistent(weight, frozen, gain, h0, s, needs_grad,
                                   return_rstd and not torch.compiler.is_compiling())
    if return_rstd and not dict.__contains__(info, "rstd"):  # the loop path, or traced: one more GEMM
        with torch.no_grad():
            z = F.linear(h_star.detach(), weight.detach()).to(compute_dtype(h_star)) + frozen.detach()
            dict.__setitem__(info, "rstd", torch.rsqrt(z.pow(2).mean(-1) + s.eps).float())
    return h_star, info
