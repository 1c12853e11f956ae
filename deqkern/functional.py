"""Public differentiable functions. Each validates its inputs once per call signature
(metadata only, no host sync; :mod:`deqkern._validation`) and dispatches through
:mod:`deqkern._backend` to the Triton kernels or the eager path in ``deqkern.ops``.

Host cost per call is part of the design: a call looks up its *plan* -- validated
metadata, backend, launch configurations, made on the first call of a signature -- by
one tuple key, and outside ``torch.compile`` runs the op's body directly (through a
plain ``autograd.Function`` when autograd records it), the kernels launched through
their compiled handles (:class:`deqkern.ops.launch.Launch`).

The ops are ``torch.library.custom_op`` s with fake (meta) implementations and
registered autograd, so ``torch.compile`` traces them as single opaque nodes (no graph
break); :class:`deqkern._library.EagerBypassOp` keeps the dispatcher out of eager
calls. ``torch.library.triton_op`` was tried first: its automatic fake tracing runs
the kernel body on FakeTensors, which the Triton interpreter (our CPU test path) cannot
do; an opaque custom op behaves the same on every device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from deqkern import _backend
from deqkern._library import EagerBypassOp
from deqkern._validation import raise_non_finite, validate_norm, validate_update
from deqkern.ops import adjoint as _adjoint
from deqkern.ops import update as _update
from deqkern.ops.launch import compute_dtype

__all__ = ["frozen_rmsnorm_update", "update_with_stats", "rms_norm", "rmsnorm_adjoint_step",
           "TORCH_RMS_NORM_BELOW"]

_is_compiling = torch.compiler.is_compiling

#: Plans (validated metadata + launch configurations) per call signature. The key holds
#: every input's shape, strides, dtype and device, the scalar arguments (with their
#: types: ``True == 1``) and the raw backend environment variables, so a test's
#: ``monkeypatch.setenv`` is seen at the next call. Cleared when it reaches PLAN_CACHE_SIZE.
_PLANS: dict = {}
PLAN_CACHE_SIZE = 4096


def _cached(key: object, make) -> object:
    plan = _PLANS.get(key)
    if plan is None:
        plan = make()
        if len(_PLANS) >= PLAN_CACHE_SIZE:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


# --------------------------------------------------------------------------- the ops
def _run_update(signal, frozen, h_prev, gain, eps, damping, stop_mode, plan):
    _backend.record(plan.backend)
    return plan.forward(signal, frozen, h_prev, gain)


def _update_plan(signal, frozen, h_prev, gain, eps, damping, stop_mode) -> "Optional[_update.UpdatePlan]":
    """The validated plan of one update call (cached per signature; a miss validates and
    raises the public error messages). Under ``torch.compile``: validation only, traced
    (None)."""
    if _is_compiling():
        validate_update(signal, frozen, h_prev, gain, eps, damping, stop_mode)
        return None
    try:
        key = (signal.shape, signal.stride(), signal.dtype, signal.device, frozen.shape, frozen.stride(),
               frozen.dtype, frozen.device, h_prev.shape, h_prev.stride(), h_prev.dtype, h_prev.device, gain.shape,
               gain.stride(), gain.dtype, gain.device, eps, eps.__class__, damping, damping.__class__, stop_mode,
               _backend.environment())
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors, unhashable scalars: validation says what is wrong
        key = plan = None
    if plan is not None:
        return plan

    def make():
        validate_update(signal, frozen, h_prev, gain, eps, damping, stop_mode)
        backend = _backend.select(signal.device, signal.dtype, signal.shape[-1])
        if backend == "eager":
            return _update.EagerUpdate(float(eps), float(damping), stop_mode)
        return _update.UpdatePlan(signal, frozen, h_prev, gain, float(eps), float(damping), stop_mode)

    return _cached(key, make)


_update_op = EagerBypassOp(
    "deqkern::frozen_rmsnorm_update",
    "(Tensor signal, Tensor frozen, Tensor h_prev, Tensor gain, float eps, float damping, str stop_mode)"
    " -> (Tensor, Tensor, Tensor)",
    _run_update, _update_plan)


@_update_op.register_fake
def _update_op_fake(signal, frozen, h_prev, gain, eps, damping, stop_mode):
    lead = signal.shape[:-1]
    res = signal.new_empty(lead, dtype=torch.float32)
    rstd = signal.new_empty(lead, dtype=compute_dtype(signal))
    return torch.empty_like(signal, memory_format=torch.contiguous_format), res, rstd


def _run_update_backward(grad_h, signal, frozen, gain, rstd, damping, need_frozen, need_h_prev, plan):
    _backend.record(plan.backend)
    return plan.backward(grad_h, signal, frozen, gain, rstd, need_frozen, need_h_prev)


def _update_backward_plan(grad_h, signal, frozen, gain, rstd, damping, need_frozen, need_h_prev):
    # The backward depends on the forward's signature less h_prev, eps and stop_mode:
    # signal stands in for h_prev (same shape and dtype); eps and stop_mode are unused.
    return _update_plan(signal, frozen, signal, gain, 1.0, damping, "abs")


_update_backward_op = EagerBypassOp(
    "deqkern::frozen_rmsnorm_update_backward",
    "(Tensor grad_h, Tensor signal, Tensor frozen, Tensor gain, Tensor rstd, float damping, bool need_frozen,"
    " bool need_h_prev) -> (Tensor, Tensor, Tensor, Tensor)",
    _run_update_backward, _update_backward_plan)


@_update_backward_op.register_fake
def _update_backward_op_fake(grad_h, signal, frozen, gain, rstd, damping, need_frozen, need_h_prev):
    d_signal = torch.empty_like(signal, memory_format=torch.contiguous_format)
    if not need_frozen:
        d_frozen = frozen.new_empty((0,))
    else:
        d_frozen = torch.empty_like(frozen, memory_format=torch.contiguous_format)
    d_h_prev = torch.empty_like(grad_h, memory_format=torch.contiguous_format) if need_h_prev else grad_h.new_empty((0,))
    return d_signal, d_frozen, d_h_prev, torch.empty_like(gain)


def _setup_context(ctx, inputs, output):
    signal, frozen, h_prev, gain, eps, damping, stop_mode = inputs
    ctx.save_for_backward(signal, frozen, gain, output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.damping = damping
    # z = signal + frozen: a full-shaped frozen of signal's dtype has signal's gradient,
    # returned as the same tensor (as torch's add does) instead of a second copy.
    ctx.frozen_like_signal = frozen.shape == signal.shape and frozen.dtype == signal.dtype


def _backward(ctx, grad_h, grad_residual, grad_rstd):
    signal, frozen, gain, rstd = ctx.saved_tensors
    need_signal, need_frozen, need_h_prev, need_gain = ctx.needs_input_grad[:4]
    if grad_h is None:
        return None, None, None, None, None, None, None
    need_h_prev = need_h_prev and ctx.damping != 1.0
    shared = need_frozen and ctx.frozen_like_signal
    # The eager autograd.Function hands over its forward's plan (EagerBypassOp).
    d_signal, d_frozen, d_h_prev, d_gain = _update_backward_op(
        grad_h, signal, frozen, gain, rstd, ctx.damping, need_frozen and not shared, need_h_prev,
        plan=getattr(ctx, "plan", None),
    )
    return (
        d_signal if need_signal else None,
        (d_signal if shared else d_frozen) if need_frozen else None,
        d_h_prev if need_h_prev else None,
        d_gain if need_gain else None,
        None, None, None,
    )


_update_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- autocast
def _autocast_storage(signal: torch.Tensor, h_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The update's autocast policy. Under ``torch.autocast`` for signal's device type,
    ``signal`` and ``h_prev`` are stored in the autocast dtype (each cast at most once;
    float64 is left alone, as autocast does), so a bf16 ``signal`` from an autocast
    matmul meets an fp32 ``h_prev`` (e.g. the solver's starting point) without a dtype
    error. ``frozen`` and ``gain`` keep their dtype: the kernel reads any float dtype and
    upcasts, and their gradients come back in their own dtype (fp32 master weights keep
    fp32 grads). Arithmetic and reductions stay float32 and the residual stays float32.

    A cast in the wrapper rather than ``torch.library.register_autocast`` on the op:
    that one fixes the cast dtype at registration, while autocast's dtype (bf16 or fp16)
    is the caller's. Dynamo traces this (autocast state is a guarded constant).
    """
    device_type = signal.device.type
    if not torch.is_autocast_enabled(device_type):
        return signal, h_prev
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t

    return cast(signal), cast(h_prev)


# --------------------------------------------------------------------------- public API
def update_with_stats(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    *, eps: float = 1e-6, damping: float = 1.0, stop_mode: str = "rel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`frozen_rmsnorm_update` that also returns the per-row ``rstd`` (``(...)``,
    float32 -- float64 for float64 inputs --, not differentiable), for layers that reuse it."""
    if isinstance(signal, torch.Tensor) and isinstance(h_prev, torch.Tensor):
        signal, h_prev = _autocast_storage(signal, h_prev)
    plan = _update_plan(signal, frozen, h_prev, gain, eps, damping, stop_mode)
    return _update_op(signal, frozen, h_prev, gain, float(eps), float(damping), stop_mode, plan=plan)


def frozen_rmsnorm_update(
    signal: torch.Tensor,
    frozen: torch.Tensor,
    h_prev: torch.Tensor,
    gain: torch.Tensor,
    *,
    eps: float = 1e-6,
    damping: float = 1.0,
    stop_mode: str = "rel",
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused Picard step of the frozen-context cell.

    ``z = signal + frozen``; ``y = gain * z / sqrt(mean(z**2, -1) + eps)``;
    ``h_next = (1 - damping) * h_prev + damping * y``.

    Args:
        signal: ``(..., d)``, the h-dependent term (e.g. ``h @ W.T``). Differentiable.
        frozen: ``(..., d)`` or ``(d,)``, everything computed once before the loop
            (injection + frozen context + bias). Differentiable; a broadcast ``(d,)``
            gets its gradient summed over rows.
        h_prev: ``(..., d)``, the current iterate, signal's dtype. Differentiable
            (through the damping path). Under ``torch.autocast`` both are first cast
            to the autocast dtype (:func:`_autocast_storage`).
        gain: ``(d,)``, the RMSNorm weight. Differentiable.
        eps: added to the mean square, > 0.
        damping: in ``(0, 1]``; 1 is a plain (undamped) step.
        stop_mode: ``"abs"``, ``"rel"`` or ``"max"``: the residual's definition.
        check_finite: if True, synchronize once and raise ``ValueError`` when any row
            is non-finite. Off by default: the residual of such a row is NaN on the
            device, which :func:`deqkern.solve` turns into an error at its next sync.

    Returns:
        ``h_next``: ``(..., d)``, signal's dtype (the autocast dtype under autocast),
        contiguous.
        ``residual``: ``(...)``, float32, not differentiable: per row
        ``||h_next - h_prev||`` (abs), that over ``||h_next|| + 1e-9`` (rel), or
        ``max|h_next - h_prev|`` (max). NaN for a row with any NaN/Inf.

    Storage float32, bfloat16 or float16 (float64 runs eager); all arithmetic and
    reductions in float32. Which implementation ran: :func:`deqkern.last_backend`.
    Host cost: the arguments' metadata is validated once per call signature (shapes,
    strides, dtypes, devices, scalars), and outside ``torch.compile`` the kernel runs
    without the custom-op dispatcher (:mod:`deqkern._library`).
    """
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool; got {type(check_finite).__name__}")
    h_next, residual, _ = update_with_stats(
        signal, frozen, h_prev, gain, eps=eps, damping=damping, stop_mode=stop_mode,
    )
    if check_finite:
        raise_non_finite(residual, {"signal": signal, "frozen": frozen, "h_prev": h_prev, "gain": gain})
    return h_next, residual


#: :func:`rms_norm` (and so ``FusedRMSNorm``) runs torch's own ``F.rms_norm`` below this
#: many elements (``x.numel()``) under ``DEQKERN_BACKEND=auto``, and for 16-bit inputs at
#: every size: there torch's C++ op and C++ autograd node cost less per call than the
#: Python-launched kernel. Set from the measured crossover of the fused kernel's
#: forward+backward against nn.RMSNorm (``python -m bench --suite host``, "norm" rows; wall
#: time): on the H200 (torch 2.11, commits 35112ac and 00c6650) the fused kernel first wins at
#: 131072x1024 in float32 (1.27-1.28x, 2**27 elements) and at no swept size in bfloat16
#: (0.27-0.85x up to 131072x1024).
TORCH_RMS_NORM_BELOW = 1 << 27


class _NormPlan:
    """rms_norm's per-signature choices: torch's op or the fused one, the resolved eps,
    the constant vectors and the update plan."""

    def __init__(self, x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]):
        eps = validate_norm(x, weight, eps)
        gain, frozen = _constants(x, weight)
        backend = _backend.select(x.device, x.dtype, x.shape[-1])
        same_dtype = weight is None or weight.dtype == x.dtype  # else torch promotes to weight's dtype
        self.use_torch = same_dtype and (
            backend == "eager"
            or (_backend.mode() == "auto" and (x.numel() < TORCH_RMS_NORM_BELOW or x.element_size() < 4)))
        # the constant ones vector only: a weight is the caller's, passed at every call
        self.eps, self.ones, self.frozen = float(eps), gain if weight is None else None, frozen
        self.normalized_shape = (x.shape[-1],)
        self.update = None if self.use_torch else _update_plan(x, frozen, x, gain, eps, 1.0, "abs")


def rms_norm(x: torch.Tensor, weight: "torch.Tensor | None" = None, eps: "float | None" = None) -> torch.Tensor:
    """RMSNorm over the last dimension on the fused kernel, with the dtype rules of
    ``torch.nn.functional.rms_norm(x, (d,), weight, eps)``.

    ``y = weight * x / sqrt(mean(x**2, -1) + eps)``: the update with ``frozen = 0``,
    ``h_prev = x`` and ``damping = 1`` (the kernel's residual output is discarded).
    Where the fused kernel cannot win, this *is* ``F.rms_norm``: with the eager backend,
    and under ``DEQKERN_BACKEND=auto`` below :data:`TORCH_RMS_NORM_BELOW` elements
    (host-bound sizes, where torch's C++ op costs less per call) or for a 16-bit ``x``, when ``weight`` is
    None or has x's dtype. ``deqkern.last_backend()`` then reports ``"eager"``.

    Args:
        x: ``(..., d)``, float16, bfloat16, float32 or float64. Differentiable.
        weight: ``(d,)`` or None (no affine scale), any float dtype. Differentiable;
            its gradient comes back in its own dtype.
        eps: > 0; None means ``torch.finfo`` epsilon of the compute dtype (float32, or
            float64 for float64 ``x``), which is what ``torch.nn.RMSNorm`` uses.

    Returns:
        ``(..., d)`` in x's dtype, also under ``torch.autocast`` (like torch's rms_norm,
        which autocast leaves alone); math and the mean square in float32.
    """
    if _is_compiling():
        eps = validate_norm(x, weight, eps)
        gain, frozen = _constants(x, weight)
        return _update_op(x, frozen, x, gain, float(eps), 1.0, "abs")[0]
    try:
        key = (*_meta(x), None if weight is None else _meta(weight), eps, eps.__class__, _backend.environment())
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):
        key = plan = None
    if plan is None:
        plan = _cached(key, lambda: _NormPlan(x, weight, eps))
    if plan.use_torch:
        _backend.record("eager")
        return F.rms_norm(x, plan.normalized_shape, weight, plan.eps)
    gain = plan.ones if weight is None else weight
    return _update_op(x, plan.frozen, x, gain, plan.eps, 1.0, "abs", plan=plan.update)[0]


def _constants(x: torch.Tensor, weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm's gain (``weight``, or ones) and frozen term (zeros) as update inputs."""
    d = x.shape[-1]
    return (_constant(1.0, d, x.dtype, x.device) if weight is None else weight,
            _constant(0.0, d, x.dtype, x.device))


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(value: float, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only ``(d,)`` vector filled with ``value``, allocated once per (d, dtype,
    device) outside tracing."""
    if _is_compiling():
        return torch.full((d,), value, dtype=dtype, device=device)
    key = (value, d, dtype, device)
    vec = _CONSTANTS.get(key)
    if vec is None:
        vec = _CONSTANTS[key] = torch.full((d,), value, dtype=dtype, device=device)
    return vec


# --------------------------------------------------------------------------- fused adjoint
def rmsnorm_adjoint_step(
    u: "torch.Tensor | None", g_prev: torch.Tensor, grad_out: torch.Tensor, z: torch.Tensor,
    rstd: torch.Tensor, gain: torch.Tensor, *, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One adjoint iteration of the frozen-context cell's implicit backward (not
    differentiable; used by :class:`deqkern.nn.FrozenContextDEQ`).

    All of ``(R, d)`` except ``rstd`` ``(R,)`` float32 and ``gain`` ``(d,)``; ``u=None``
    means zero. Returns ``g_next = (1 - damping) * g_prev + u + grad_out`` (g_prev's
    dtype), ``dz = RMSNorm-VJP(g_next)`` at ``(z, rstd)`` (z's dtype) and the float32
    per-row residual of ``g_next`` against ``g_prev``. Math in ``deqkern.ops.adjoint``;
    dispatched like :func:`frozen_rmsnorm_update`, its launch planned once per call
    signature.
    """
    key = (None if u is None else _meta(u), *_meta(g_prev), *_meta(grad_out), *_meta(z), *_meta(rstd),
           *_meta(gain), damping, stop_mode, _backend.environment())
    plan = _PLANS.get(key)
    if plan is None:
        def make():
            backend = _backend.select(z.device, z.dtype, z.shape[-1])
            if backend == "eager":
                return _adjoint.EagerAdjoint(damping, stop_mode)
            return _adjoint.AdjointPlan(u, g_prev, grad_out, z, rstd, gain, damping, stop_mode)

        plan = _cached(key, make)
    _backend.record(plan.backend)
    return plan(u, g_prev, grad_out, z, rstd, gain)
