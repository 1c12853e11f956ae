"""Argument checks of the public functions in :mod:`deqkern.functional`: metadata only
(no host sync), each error naming the argument, the expected and the received value.
The functions run once per call signature (the plans cache their outcome)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from deqkern.ops.launch import STOP_MODES, compute_dtype

__all__ = ["FLOAT_DTYPES", "check_tensor", "positive_float", "positive_int", "one_of", "check_damping",
           "validate_update", "validate_norm", "raise_non_finite"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0; got {value!r}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


def one_of(name: str, value: object, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_damping(damping: object) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be a float in (0, 1]; got {damping!r}")
    return float(damping)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    return t


def validate_update(
    signal: torch.Tensor, frozen: torch.Tensor, h_prev: torch.Tensor, gain: torch.Tensor,
    eps: float, damping: float, stop_mode: str,
) -> None:
    for name, t in (("signal", signal), ("frozen", frozen), ("h_prev", h_prev), ("gain", gain)):
        check_tensor(name, t)
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
    positive_float("eps", eps)
    check_damping(damping)
    one_of("stop_mode", stop_mode, tuple(STOP_MODES))


def raise_non_finite(residual: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """Host-side check (one sync): raise if any row's residual is NaN/Inf."""
    if bool(torch.isfinite(residual).all()):
        return
    bad = [name for name, t in inputs.items() if not bool(torch.isfinite(t).all())]
    rows = int((~torch.isfinite(residual)).sum())
    cause = f"non-finite values in {', '.join(bad)}" if bad else "overflow in the update (inputs are finite)"
    raise ValueError(f"frozen_rmsnorm_update produced non-finite output in {rows} row(s): {cause}")


def validate_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]) -> float:
    """rms_norm's argument checks (those of the update it runs included, with
    ``frozen = 0``, ``h_prev = x``); returns eps, its default resolved."""
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., d) with d >= 1; got {tuple(x.shape)}")
    d = x.shape[-1]
    if eps is None:
        eps = torch.finfo(compute_dtype(x)).eps
    if weight is not None:
        check_tensor("weight", weight)
        if weight.shape != (d,) or weight.device != x.device:
            raise ValueError(f"weight must have shape ({d},) on {x.device}; got {tuple(weight.shape)} on {weight.device}")
    positive_float("eps", eps)
    return eps

