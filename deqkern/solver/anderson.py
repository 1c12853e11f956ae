"""Anderson acceleration (type II), batched over rows on the device.

Per row, from the last ``n <= m`` evaluations ``f_i = f(x_i)`` and their residuals
``g_i = f_i - x_i``, the next point is::

    alpha  = argmin_a ||sum_i a_i g_i||^2 + lam * s * ||a||^2   subject to  sum_i a_i = 1
    x_next = beta * sum_i alpha_i f_i + (1 - beta) * sum_i alpha_i x_i
           = sum_i alpha_i (f_i - (1 - beta) g_i)

with ``s`` the mean of ``||g_i||^2`` over the history. This is torchdeq's
``anderson_solver`` (``m``, ``lam``, and its damping ``tau`` as ``beta``) with these
differences:

- ``lam`` is relative to ``s``: the regularization does not depend on the scale of the
  iterate. (torchdeq adds ``lam * I``; once the residuals fall below about
  ``sqrt(lam)`` its mixing degrades towards averaging.)
- The constrained least squares is solved as ``(G G^T + lam s I) w = 1``,
  ``alpha = w / sum(w)`` with a batched Cholesky factorization
  (``torch.linalg.cholesky_ex``, which does not check for errors on the host) and two
  triangular solves: no host synchronization, capturable in a CUDA graph.
- Histories and the small solves are float32 for float16/bfloat16 iterates (float64
  for float64): torchdeq's LU solve has no bfloat16 kernel on CUDA.
- Every evaluation is a step: step 1 evaluates ``f(h0)``, step 2 ``f`` at the mix of a
  one-pair history (``beta f_1 + (1 - beta) x_1``). torchdeq runs two undamped Picard
  steps first and records neither.
- A frozen row proposes its committed iterate (see :mod:`deqkern.solver.loop`).
"""

from __future__ import annotations

import torch

from deqkern.ops.launch import compute_dtype
from deqkern.solver.config import Method

__all__ = ["Anderson", "mixing_weights"]


def mixing_weights(g: torch.Tensor, lam: float) -> torch.Tensor:
    """``alpha`` ``(R, 1, n)`` for residual histories ``g`` ``(R, n, d)`` (module
    docstring), in ``g``'s dtype. Rows with a non-finite history get NaN weights."""
    n = g.shape[1]
    gram = torch.bmm(g, g.transpose(1, 2))
    diagonal = gram.diagonal(dim1=1, dim2=2)
    scale = diagonal.mean(-1)
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero history: lam * I
    diagonal.add_((lam * scale).unsqueeze(-1))
    factor, _ = torch.linalg.cholesky_ex(gram)
    ones = torch.ones(g.shape[0], n, 1, dtype=g.dtype, device=g.device)
    y = torch.linalg.solve_triangular(factor, ones, upper=False)
    w = torch.linalg.solve_triangular(factor.transpose(1, 2), y, upper=True)
    return (w / w.sum(1, keepdim=True)).transpose(1, 2)


class Anderson:
    """One solve's Anderson state: histories ``F``, ``G`` of shape ``(R, m, d)`` in the
    compute dtype (a ring buffer of the last ``m`` steps)."""

    def __init__(self, method: Method, h0: torch.Tensor, max_iter: int):
        self.m, self.lam, self.beta = min(method.m, max_iter), method.lam, method.beta
        d = h0.shape[-1]
        self.f_hist = torch.empty(h0.shape[:-1].numel(), self.m, d, dtype=compute_dtype(h0), device=h0.device)
        self.g_hist = torch.empty_like(self.f_hist)
        self.count = 0

    def propose(self, x: torch.Tensor, f_x: torch.Tensor, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The next point to evaluate, ``h``'s shape and dtype: the Anderson mix for
        active rows (``active``: ``(R,)`` bool), the committed iterate ``h`` for frozen
        ones. ``x``: the point just evaluated, ``f_x = f(x)``."""
        d = x.shape[-1]
        slot = self.count % self.m
        self.count += 1
        n = min(self.count, self.m)
        f_new, g_new = self.f_hist[:, slot], self.g_hist[:, slot]
        f_new.copy_(f_x.detach().reshape(-1, d))
        torch.sub(f_new, x.detach().reshape(-1, d), out=g_new)
        if n == 1:
            mix = f_new if self.beta == 1.0 else f_new - (1.0 - self.beta) * g_new
        else:
            alpha = mixing_weights(self.g_hist[:, :n], self.lam)
            mix = torch.bmm(alpha, self.f_hist[:, :n]).squeeze(1)
            if self.beta != 1.0:
                mix = mix - (1.0 - self.beta) * torch.bmm(alpha, self.g_hist[:, :n]).squeeze(1)
        mix = mix.to(h.dtype).reshape(h.shape)
        return torch.where(active.view(*h.shape[:-1], 1), mix, h)
