"""Solver configuration: argument validation (metadata only, no sync), the checks of what
a step returns, and the autocast policy of the iterate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from deqkern._validation import FLOAT_DTYPES, check_tensor, one_of, positive_float, positive_int
from deqkern.ops.launch import STOP_MODES

__all__ = ["ADJOINT_STOP_MODE", "Config", "Method", "PICARD", "validate", "validate_options", "positive_int",
           "positive_float", "validate_iterate", "validate_residual", "autocast_iterate", "DEFAULT_CHECK_EVERY",
           "DEFAULT_M", "DEFAULT_LAM", "METHODS", "RETURN_ITERATES", "BACKWARD_MODES", "POLICIES", "FLOAT_DTYPES",
           "Step", "AdjointFactory"]

#: Iterations between host checks when ``check_every`` is None (see the module docstring).
DEFAULT_CHECK_EVERY = 4
#: Anderson's history (pairs kept per row) when ``m`` is None (Broyden's: every step).
DEFAULT_M = 5
#: Anderson's Tikhonov regularization, relative to the mean squared residual in the history.
DEFAULT_LAM = 1e-4

METHODS = ("picard", "anderson", "broyden")
RETURN_ITERATES = ("last", "lowest")
BACKWARD_MODES = ("ift", "onestep", "unrolled")
#: The adjoint solve's residual, whatever the forward's ``stop_mode``: per row,
#: ``||g_next - g|| / ||g_next||``. The incoming gradient's scale is the loss's scale
#: (a mean over a large batch makes every entry tiny), so an absolute test would stop the
#: adjoint before it starts; the relative one takes the same steps at any loss scale.
ADJOINT_STOP_MODE = "rel"
POLICIES = ("warn", "raise", "ignore")

#: ``step(h) -> (h_next, residual_or_None)``; residual: float32, shape ``h.shape[:-1]``.
Step = Callable[[torch.Tensor], "tuple[torch.Tensor, Optional[torch.Tensor]]"]
#: ``adjoint(h_star, v) -> adjoint_step``, ``adjoint_step(g) -> (g_next, residual)`` (see solve_fused).
AdjointFactory = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]]


@dataclass(frozen=True)
class Method:
    """A fixed-point method and its parameters (hashable: part of the graph cache key).
    ``m``: history per row (Anderson; Broyden, where None keeps every step); ``lam``:
    Anderson's relative regularization; ``beta``: Anderson's mixing (1: undamped)."""

    name: str
    m: Optional[int] = DEFAULT_M
    lam: float = DEFAULT_LAM
    beta: float = 1.0


PICARD = Method("picard")


@dataclass(frozen=True)
class Config:
    max_iter: int
    tol: float
    stop_mode: str
    backward: str
    b_max_iter: int
    b_tol: float
    check_every: int
    graph: bool
    on_nonconvergence: str
    method: Method = PICARD
    b_method: Method = PICARD
    return_iterate: str = "last"
    trace: bool = False


def validate_options(*, max_iter, tol, stop_mode, backward, b_max_iter, b_tol, check_every,
                     on_nonconvergence) -> tuple[int, float, int, float, int]:
    """The checks of the solve's settings alone (layers run them at construction).
    Returns ``(max_iter, tol, b_max_iter, b_tol, check_every)`` with defaults filled in."""
    max_iter = positive_int("max_iter", max_iter)
    tol = positive_float("tol", tol)
    one_of("stop_mode", stop_mode, tuple(STOP_MODES))
    one_of("backward", backward, BACKWARD_MODES)
    one_of("on_nonconvergence", on_nonconvergence, POLICIES)
    b_max_iter = max_iter if b_max_iter is None else positive_int("b_max_iter", b_max_iter)
    b_tol = tol if b_tol is None else positive_float("b_tol", b_tol)
    check_every = DEFAULT_CHECK_EVERY if check_every is None else positive_int("check_every", check_every)
    return max_iter, tol, b_max_iter, b_tol, check_every


def methods(method: object, b_method: object, m: object, lam: object, beta: object) -> tuple[Method, Method]:
    """The forward and adjoint :class:`Method`; ``m``, ``lam``, ``beta`` (None: default)
    must be used by one of them."""
    one_of("method", method, METHODS)
    b_method = method if b_method is None else one_of("b_method", b_method, METHODS)
    used = {method, b_method}
    for name, value, users in (("m", m, ("anderson", "broyden")), ("lam", lam, ("anderson",)),
                               ("beta", beta, ("anderson",))):
        if value is not None and not used & set(users):
            hint = (" (a damped Picard step is f_damped = lambda h: beta * f(h) + (1 - beta) * h)"
                    if name == "beta" else "")
            raise ValueError(f"{name} applies to method {' or '.join(map(repr, users))}; got method={method!r}, "
                             f"b_method={b_method!r}{hint}")
    m = None if m is None else positive_int("m", m)
    lam = DEFAULT_LAM if lam is None else positive_float("lam", lam)
    beta = 1.0 if beta is None else positive_float("beta", beta)

    def build(name: str) -> Method:
        if name == "anderson":
            return Method(name, DEFAULT_M if m is None else m, lam, beta)
        return Method(name, m) if name == "broyden" else PICARD

    return build(method), build(b_method)


def validate(
    fn: object, fn_name: str, h0: object, *, max_iter, tol, stop_mode, backward, b_max_iter, b_tol,
    check_every, graph, on_nonconvergence, method="picard", m=None, lam=None, beta=None, b_method=None,
    return_iterate="last", trace=False,
) -> Config:
    """All argument checks, metadata only (no sync)."""
    if not callable(fn):
        raise TypeError(f"{fn_name} must be callable; got {type(fn).__name__}")
    check_tensor("h0", h0)
    if h0.dim() < 1 or h0.shape[-1] < 1:
        raise ValueError(f"h0 must have shape (..., d) with d >= 1; got {tuple(h0.shape)}")
    max_iter, tol, b_max_iter, b_tol, check_every = validate_options(
        max_iter=max_iter, tol=tol, stop_mode=stop_mode, backward=backward, b_max_iter=b_max_iter, b_tol=b_tol,
        check_every=check_every, on_nonconvergence=on_nonconvergence)
    forward_method, adjoint_method = methods(method, b_method, m, lam, beta)
    if backward == "unrolled" and forward_method.name != "picard":
        raise ValueError(f"backward='unrolled' differentiates through every iteration, which deqkern supports for "
                         f"method='picard' only (Anderson and Broyden update their histories in place); got "
                         f"method={method!r}. Use backward='ift' or 'onestep'")
    one_of("return_iterate", return_iterate, RETURN_ITERATES)
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool; got {type(trace).__name__}")
    if not isinstance(graph, bool):
        raise TypeError(f"graph must be a bool; got {type(graph).__name__}")
    if graph:
        if h0.device.type != "cuda":
            raise ValueError(
                f"graph=True captures the solve in a CUDA graph and needs CUDA tensors; h0 is on "
                f"{h0.device}. Use graph=False on this device."
            )
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("graph=True inside an ongoing CUDA graph capture; use graph=False there "
                             "(the outer capture already records the loop)")
        if backward == "unrolled" and torch.is_grad_enabled():
            raise ValueError("graph=True cannot be combined with backward='unrolled' while grad is enabled "
                             "(autograd cannot record through a graph replay); use 'ift' or 'onestep'")
    return Config(max_iter, tol, stop_mode, backward, b_max_iter, b_tol, check_every, graph, on_nonconvergence,
                  forward_method, adjoint_method, return_iterate, trace)


def validate_iterate(name: str, out: object, h: torch.Tensor) -> None:
    """First-call check of what the step returned (metadata only)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor shaped like h; got {type(out).__name__}")
    if out.shape != h.shape:
        raise ValueError(f"{name} must return h's shape {tuple(h.shape)}; got {tuple(out.shape)}")
    if out.dtype != h.dtype:
        raise TypeError(f"{name} must return h's dtype {h.dtype}; got {out.dtype} (under torch.autocast, "
                        f"pass h0 in the dtype {name} returns)")
    if out.device != h.device:
        raise ValueError(f"{name} must return a tensor on h's device {h.device}; got {out.device}")


def autocast_iterate(f: Callable[[torch.Tensor], torch.Tensor], h0: torch.Tensor):
    """:func:`solve`'s autocast policy: under ``torch.autocast`` for h0's device type the
    iterate is stored in the autocast dtype. ``h0`` is cast once (float64 is left alone,
    as autocast does) and ``f``'s output is cast to the iterate's dtype where it differs
    (an autocast matmul returns bf16, an fp32 residual add returns fp32). Residuals and
    their reductions stay float32. Returns ``(f, h0)`` unchanged outside autocast."""
    device_type = h0.device.type
    if not torch.is_autocast_enabled(device_type) or h0.dtype == torch.float64:
        return f, h0
    dtype = torch.get_autocast_dtype(device_type)

    def f_autocast(h: torch.Tensor) -> torch.Tensor:
        out = f(h)
        if isinstance(out, torch.Tensor) and out.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return out.to(dtype)
        return out

    return f_autocast, h0.to(dtype)


def validate_residual(name: str, residual: object, h: torch.Tensor) -> None:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name} must return (h_next, residual) with a tensor residual; got {type(residual).__name__}")
    if residual.dtype != torch.float32 or residual.shape != h.shape[:-1] or residual.device != h.device:
        raise ValueError(
            f"{name}'s residual must be float32 of shape {tuple(h.shape[:-1])} on {h.device}; got "
            f"{residual.dtype} of shape {tuple(residual.shape)} on {residual.device}"
        )

