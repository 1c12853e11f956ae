"""The implicit (IFT) backward: the adjoint solve ``g = (df/dh)^T g + v`` and the
autograd node that routes ``h*``'s gradient through it."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from deqkern.solver.capture import graph_solve
from deqkern.solver.config import ADJOINT_STOP_MODE, AdjointFactory, Config, Step
from deqkern.solver import loop
from deqkern.solver.loop import enforce, fixed_point_loop, summarize

__all__ = ["Adjoint", "Equilibrium"]


class Adjoint:
    """The IFT backward: solves ``g = (df/dh)^T g + v`` through the recorded ``f_out``."""

    def __init__(self, f_out: torch.Tensor, h_in: torch.Tensor, cfg: Config, info: dict,
                 custom: Optional[AdjointFactory] = None, owner: Optional[Callable] = None, tag: str = ""):
        self.f_out, self.h_in, self.cfg, self.info, self.custom = f_out, h_in, cfg, info, custom
        self.owner, self.tag = owner, tag

    def solve(self, grad: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # 16-bit gradients are iterated in float32: the sum J^T g + v would otherwise be
        # rounded to 8 (bf16) or 11 (fp16) bits at every iteration.
        v = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        what = "deqkern.solve backward (adjoint solve)"
        capturing = v.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.custom is not None and cfg.graph and v.is_cuda and not capturing:
            return self._graph_solve(grad, v, what)
        if self.custom is not None:
            adjoint_step = self.custom(self.h_in.detach(), v)
        else:
            def adjoint_step(g: torch.Tensor) -> tuple[torch.Tensor, None]:
                (vjp,) = torch.autograd.grad(self.f_out, self.h_in, g, retain_graph=True,
                                             allow_unused=True, materialize_grads=True)
                return torch.add(v, vjp), None

        result = fixed_point_loop(
            adjoint_step, v, max_iter=cfg.b_max_iter, tol=cfg.b_tol, stop_mode=ADJOINT_STOP_MODE,
            check_every=None if capturing else cfg.check_every, what=what, step_name="the adjoint step",
            expects_residual=self.custom is not None, method=cfg.b_method,
        )
        stats = summarize(result.h, result.state, result.check_vector, cfg.b_tol, ADJOINT_STOP_MODE)
        self.info.update({f"b_{name}": value for name, value in stats.items()})
        self.info["b_iterations"] = result.iterations
        if not capturing:
            enforce(result.check, cfg.on_nonconvergence, what, v.shape[:-1].numel(), cfg.b_max_iter,
                    cfg.b_tol, ADJOINT_STOP_MODE, self.info)
        return result.h.to(grad.dtype)

    def _graph_solve(self, grad: torch.Tensor, v: torch.Tensor, what: str) -> torch.Tensor:
        """``graph=True`` with a custom adjoint: the whole adjoint solve (the factory's
        set-up included) replays from one CUDA graph, cached with the forward's."""
        cfg, custom = self.cfg, self.custom
        loop_kwargs = dict(max_iter=cfg.b_max_iter, tol=cfg.b_tol, stop_mode=ADJOINT_STOP_MODE, check_every=None,
                           what=what, step_name="the adjoint step", expects_residual=True, method=cfg.b_method)
        # Per-call tensors the adjoint reads besides h* (declared in ``extra_inputs``)
        # are copied into static buffers too, and the adjoint is rebound to them.
        per_call = tuple(getattr(custom, "extra_inputs", ()))

        def build(static_v: torch.Tensor, extra: tuple) -> Step:
            bound = custom.rebind(*extra[1:]) if per_call else custom
            return bound(extra[0], static_v)

        with torch.no_grad():
            g, check_vector, out = graph_solve(self.owner, self.tag + ":adjoint", build, v.contiguous(), cfg,
                                               loop_kwargs, extra=(self.h_in.detach(), *per_call), guarded=(custom,))
        self.info.update({f"b_{name}": value for name, value in out.items()})
        self.info["b_iterations"] = cfg.b_max_iter
        if cfg.on_nonconvergence != "ignore":
            enforce(loop.host_check(check_vector), cfg.on_nonconvergence, what, v.shape[:-1].numel(),
                    cfg.b_max_iter, cfg.b_tol, ADJOINT_STOP_MODE, self.info)
        return g.to(grad.dtype)


class Equilibrium(torch.autograd.Function):
    """Returns the solved ``h*`` (passed in a list, so autograd treats it as a new output
    rather than a view of an input) with the gradient routed into ``f_out``: through
    the adjoint solve ("ift") or unchanged ("onestep")."""

    @staticmethod
    def forward(ctx, f_out: torch.Tensor, box: list, adjoint: Optional[Adjoint]) -> torch.Tensor:
        ctx.adjoint = adjoint
        return box[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.adjoint is None:
            return grad, None, None
        return ctx.adjoint.solve(grad), None, None

