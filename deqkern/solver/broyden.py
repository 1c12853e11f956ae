"""Broyden's method ("good" Broyden with a low-rank inverse Jacobian), batched over rows.

Per row it solves ``g(x) = f(x) - x = 0`` with an approximate inverse Jacobian of ``g``,
``B = -I + sum_i u_i v_i^T`` (``-I`` at first, so the first move is a Picard step),
updated after every step from the secant pair ``dx = x_k - x_{k-1}``,
``dg = g_k - g_{k-1}``::

    v = B^T dx,   u = (dx - B dg) / (v . dg),   x_next = x_k - B g_k

This is torchdeq's ``broyden_solver`` without line search (``ls=False``, its default)
with these differences:

- ``m`` (torchdeq's ``LBFGS_thres``): pairs kept; by default (None) every step's, as
  torchdeq. With fewer, the oldest pair is overwritten (a ring, as torchdeq does), which
  makes ``B`` inconsistent and can make the iteration diverge once the ring wraps.
- Pairs and products are float32 for float16/bfloat16 iterates (float64 for float64).
- Non-finite entries of a new pair (``v . dg = 0``) are zeroed; torchdeq zeroes NaN ones.
- No "lack of progress" exit (torchdeq stops every row after 30 steps once the worst
  residual is below ``3 tol`` and barely moves): each row freezes on its own instead.
- The iterate a step commits is ``f(x_k)``, as for every method (torchdeq returns
  ``x_k``; both are within the residual of each other), and every evaluation of ``f``
  is a step (torchdeq does not count its first, ``f(x0)``).
- A frozen row proposes its committed iterate (see :mod:`deqkern.solver.loop`).
"""

from __future__ import annotations

import torch

from deqkern.ops.launch import compute_dtype
from deqkern.solver.config import Method

__all__ = ["Broyden"]


class Broyden:
    """One solve's Broyden state: the pairs ``u``, ``v`` of shape ``(R, m, d)`` in the
    compute dtype, and the previous point and residual."""

    def __init__(self, method: Method, h0: torch.Tensor, max_iter: int):
        self.m = max_iter if method.m is None else min(method.m, max_iter)
        shape = (h0.shape[:-1].numel(), self.m, h0.shape[-1])
        self.u = torch.zeros(shape, dtype=compute_dtype(h0), device=h0.device)
        self.v = torch.zeros_like(self.u)
        self.pairs = 0
        self.x_prev = self.g_prev = None

    def _apply(self, left: torch.Tensor, right: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``-x + sum_i left_i (right_i . x)`` over the stored pairs: ``B x`` with
        ``(u, v)``, ``B^T x`` with ``(v, u)``."""
        n = min(self.pairs, self.m)
        if n == 0:
            return -x
        coef = torch.bmm(right[:, :n], x.unsqueeze(-1))
        return torch.baddbmm(x.unsqueeze(1), coef.transpose(1, 2), left[:, :n], beta=-1).squeeze(1)

    def propose(self, x: torch.Tensor, f_x: torch.Tensor, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The next point to evaluate, ``h``'s shape and dtype: the Broyden step for
        active rows (``active``: ``(R,)`` bool), the committed iterate ``h`` for frozen
        ones. ``x``: the point just evaluated, ``f_x = f(x)``."""
        d = x.shape[-1]
        x_rows = x.detach().reshape(-1, d).to(self.u.dtype)
        g = f_x.detach().reshape(-1, d).to(self.u.dtype) - x_rows
        if self.x_prev is not None:
            dx, dg = x_rows - self.x_prev, g - self.g_prev
            v = self._apply(self.v, self.u, dx)
            u = (dx - self._apply(self.u, self.v, dg)) / (v * dg).sum(-1, keepdim=True)
            slot = self.pairs % self.m
            torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0, out=self.u[:, slot])
            torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0, out=self.v[:, slot])
            self.pairs += 1
        self.x_prev, self.g_prev = x_rows, g
        step = (x_rows - self._apply(self.u, self.v, g)).to(h.dtype).reshape(h.shape)
        return torch.where(active.view(*h.shape[:-1], 1), step, h)
