"""Public differentiable functions. Each validates its inputs once (metadata only, no
host sync) and dispatches through :mod:`deqkern._backend` to the Triton kernels or the
eager path in ``deqkern.ops``.

The ops are ``torch.library.custom_op`` s with fake (meta) implementations and
registered autograd, so ``torch.compile`` traces them as single opaque nodes (no graph
break). ``torch.library.triton_op`` was tried first: its automatic fake tracing runs
the kernel body on FakeTensors, which the Triton interpreter (our CPU test path) cannot
do; an opaque custom op behaves the same on every device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from deqkern import _backend
from deqkern.ops import adjoint as _adjoint
from deqkern.ops import update as _update
from deqkern.ops.launch import compute_dtype

__all__ = ["frozen_rmsnorm_update", "update_with_stats", "rms_norm"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- the ops
@torch.library.custom_op("deqkern::frozen_rmsnorm_update", mutates_args=())
def _update_op(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _update_forward(signal, frozen, h_prev, gain, eps, damping, stop_mode)


def _pick(t: torch.Tensor, eager: Callable, triton_impl: Callable) -> Callable:
    """The implementation of a fused op for tensors like ``t`` (``deqkern._backend``
    decides; the choice is recorded for :func:`deqkern.last_backend`)."""
    backend = _backend.select(t.device, t.dtype, t.shape[-1])
    _backend.record(backend)
    return eager if backend == "eager" else triton_impl


def _update_forward(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's body: the Triton kernel or the eager path."""
    impl = _pick(signal, _update.update_reference, _update.update_forward_triton)
    h, res, rstd = impl(signal, frozen, h_prev, gain, eps, damping, stop_mode)
    return h.contiguous(), res, rstd


@_update_op.register_fake
def _update_op_fake(signal, frozen, h_prev, gain, eps, damping, stop_mode):
    lead = signal.shape[:-1]
    res = signal.new_empty(lead, dtype=torch.float32)
    rstd = signal.new_empty(lead, dtype=compute_dtype(signal))
    return torch.empty_like(signal, memory_format=torch.contiguous_format), res, rstd


@torch.library.custom_op("deqkern::frozen_rmsnorm_update_backward", mutates_args=())
def _update_backward_op(
    grad_h: torch.Tensor, signal: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor,
    rstd: torch.Tensor, damping: float, need_frozen: bool, need_h_prev: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _pick(signal, _update.update_backward_reference, _update.update_backward_triton)
    return impl(grad_h, signal, frozen, gain, rstd, damping, need_frozen, need_h_prev)


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


def _backward(ctx, grad_h, grad_residual, grad_rstd):
    signal, frozen, gain, rstd = ctx.saved_tensors
    need_signal, need_frozen, need_h_prev, need_gain = ctx.needs_input_grad[:4]
    if grad_h is None:
        return None, None, None, None, None, None, None
    need_h_prev = need_h_prev and ctx.damping != 1.0
    d_signal, d_frozen, d_h_prev, d_gain = _update_backward_op(
        grad_h, signal, frozen, gain, rstd, ctx.damping, need_frozen, need_h_prev,
    )
    return (
        d_signal if need_signal else None,
        d_frozen if need_frozen else None,
        d_h_prev if need_h_prev else None,
        d_gain if need_gain else None,
        None, None, None,
    )


_update_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- validation
def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    return t


def _validate_update(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> None:
    for name, t in (("signal", signal), ("frozen", frozen), ("h_prev", h_prev), ("gain", gain)):
        _check_tensor(name, t)
    if signal.dim() < 1 or signal.shape[-1] < 1:
        raise ValueError(f"signal must have shape (..., d) with d >= 1; got {tuple(signal.shape)}")
    d = signal.shape[-1]
    if h_prev.dtype != signal.dtype:
        raise TypeError(f"h_prev must have signal's dtype {signal.dtype}; got {h_prev.dtype}")
    for name, t in (("frozen", frozen), ("h_prev", h_prev), ("gain", gain)):
        if t.device != signal.device:
            raise ValueError(f"{name} must be on signal's device {signal.device}; got {t.device}")
    if h_prev.shape != signal.shape:
        raise ValueError(f"h_prev must have signal's shape {tuple(signal.shape)}; got {tuple(h_prev.shape)}")
    if frozen.shape != signal.shape and frozen.shape != (d,):
        raise ValueError(
            f"frozen must have signal's shape {tuple(signal.shape)} or ({d},); got {tuple(frozen.shape)}"
        )
    if gain.shape != (d,):
        raise ValueError(f"gain must have shape ({d},) (the feature width of signal); got {tuple(gain.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite float > 0; got {eps!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be a float in (0, 1]; got {damping!r}")
    if stop_mode not in _update.STOP_MODES:
        raise ValueError(f"stop_mode must be one of 'abs', 'rel', 'max'; got {stop_mode!r}")


def _raise_non_finite(residual: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """Host-side check (one sync): raise if any row's residual is NaN/Inf."""
    if bool(torch.isfinite(residual).all()):
        return
    bad = [name for name, t in inputs.items() if not bool(torch.isfinite(t).all())]
    rows = int((~torch.isfinite(residual)).sum())
    cause = f"non-finite values in {', '.join(bad)}" if bad else "overflow in the update (inputs are finite)"
    raise ValueError(f"frozen_rmsnorm_update produced non-finite output in {rows} row(s): {cause}")


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
    _validate_update(signal, frozen, h_prev, gain, eps, damping, stop_mode)
    return _call_update(signal, frozen, h_prev, gain, float(eps), float(damping), stop_mode)


def _call_update(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered custom op where it is needed -- under tracing (torch.compile,
    export, fake tensors) or when autograd must record the call -- and otherwise (a
    solver's no-grad loop) the op's body directly: same code, same numbers, without the
    dispatcher's per-call host cost (tens of microseconds, most of an iteration's time on
    small, launch-bound problems)."""
    tensors = (signal, frozen, h_prev, gain)
    if (torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors)):
        return _update_op(signal, frozen, h_prev, gain, eps, damping, stop_mode)
    return _update_forward(signal, frozen, h_prev, gain, eps, damping, stop_mode)


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
    """
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool; got {type(check_finite).__name__}")
    h_next, residual, _ = update_with_stats(
        signal, frozen, h_prev, gain, eps=eps, damping=damping, stop_mode=stop_mode,
    )
    if check_finite:
        _raise_non_finite(residual, {"signal": signal, "frozen": frozen, "h_prev": h_prev, "gain": gain})
    return h_next, residual


def rms_norm(x: torch.Tensor, weight: "torch.Tensor | None" = None, eps: "float | None" = None) -> torch.Tensor:
    """RMSNorm over the last dimension on the fused kernel, with the dtype rules of
    ``torch.nn.functional.rms_norm(x, (d,), weight, eps)``.

    ``y = weight * x / sqrt(mean(x**2, -1) + eps)``: the update with ``frozen = 0``,
    ``h_prev = x`` and ``damping = 1`` (the kernel's residual output is discarded).

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
    _check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., d) with d >= 1; got {tuple(x.shape)}")
    d = x.shape[-1]
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    if weight is not None:
        _check_tensor("weight", weight)
        if weight.shape != (d,) or weight.device != x.device:
            raise ValueError(f"weight must have shape ({d},) on {x.device}; got {tuple(weight.shape)} on {weight.device}")
    gain = _constant(1.0, d, x.dtype, x.device) if weight is None else weight
    frozen = _constant(0.0, d, x.dtype, x.device)
    _validate_update(x, frozen, x, gain, eps, 1.0, "abs")
    return _call_update(x, frozen, x, gain, float(eps), 1.0, "abs")[0]


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(value: float, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only ``(d,)`` vector filled with ``value``, allocated once per (d, dtype,
    device) outside tracing: two allocations fewer per call on the host's hot path."""
    if torch.compiler.is_compiling():
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
    dispatched like :func:`frozen_rmsnorm_update`.
    """
    impl = _pick(z, _adjoint.adjoint_step_reference, _adjoint.adjoint_step_triton)
    return impl(u, g_prev, grad_out, z, rstd, gain, damping, stop_mode)
