"""Context providers: state that depends on the previous converged state, computed once
before the Picard loop (frozen: it does not depend on the loop's ``h``) and updated
after convergence from ``h*``.

The protocol is two methods (plus ``init_state``)::

    ctx   = provider.prelude(state)          # once per solve, before the loop
    state = provider.update(h_star, state)   # once per solve, after convergence

``ctx`` has shape ``(B, d)`` (one vector per sequence, broadcast over slots) or
``(B, S, d)`` (one per slot). It is added to the loop's frozen term, so it receives
gradients (and passes them on to the provider's parameters and the previous state) but
``d ctx / d h = 0`` inside the loop: the Jacobian that decides convergence is untouched.

A provider of your own is a ``ContextProvider`` subclass with these three methods.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ContextProvider", "MambaMemory", "SlotAttentionContext"]


class ContextProvider(nn.Module):
    """Base class of the providers; subclasses implement the three methods below."""

    def init_state(self, batch: int, n_slots: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The state before the first token."""
        raise NotImplementedError

    def prelude(self, state: torch.Tensor) -> torch.Tensor:
        """``state -> ctx`` of shape ``(B, d)`` or ``(B, S, d)``; runs once per solve."""
        raise NotImplementedError

    def update(self, h_star: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``(h_star (B, S, d), state) -> new state``; runs once after convergence."""
        raise NotImplementedError


class MambaMemory(ContextProvider):
    """A gated linear memory ``M`` of shape ``(B, d_model)``.

    ``prelude``: ``hist_ctx = sigmoid(gate) * (M_prev @ W_hist.T)``, shape ``(B, d)``.
    ``update``:  ``M = a * M_prev + (1 - a) * x_proj(mean over slots of h*)`` with a
    learned per-channel decay ``a = sigmoid(decay_logit)`` in ``(0, 1)``.
    """

    def __init__(self, d_model: int, *, init_decay: float = 0.9, init_gate: float = 0.5):
        super().__init__()
        _check_width(d_model)
        if not 0.0 < init_decay < 1.0:
            raise ValueError(f"init_decay must be in (0, 1); got {init_decay!r}")
        if not 0.0 < init_gate < 1.0:
            raise ValueError(f"init_gate must be in (0, 1); got {init_gate!r}")
        self.d_model = d_model
        self.hist = nn.Linear(d_model, d_model, bias=False)
        self.x_proj = nn.Linear(d_model, d_model)
        self.gate_logit = nn.Parameter(torch.full((d_model,), math.log(init_gate / (1 - init_gate))))
        self.decay_logit = nn.Parameter(torch.full((d_model,), math.log(init_decay / (1 - init_decay))))

    def init_state(self, batch, n_slots, device, dtype):
        return torch.zeros(batch, self.d_model, device=device, dtype=dtype)

    def prelude(self, state: torch.Tensor) -> torch.Tensor:
        _check_last_dim("MambaMemory state", state, self.d_model, ndim=2)
        return torch.sigmoid(self.gate_logit) * self.hist(state)

    def update(self, h_star: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        _check_last_dim("h_star", h_star, self.d_model, ndim=3)
        decay = torch.sigmoid(self.decay_logit)
        return decay * state + (1 - decay) * self.x_proj(h_star.mean(1))


class SlotAttentionContext(ContextProvider):
    """Attention over the slots' previous converged state ``H_prev`` ``(B, S, d)``.

    ``prelude``: ``Q, K, V = H_prev @ W_q.T, W_k.T, W_v.T``, ``attn_ctx =
    out(softmax(Q K^T / sqrt(d_head)) V)`` per head, shape ``(B, S, d)``; once per token.
    ``update``: the new state is ``h*`` itself.
    """

    def __init__(self, d_model: int, *, n_heads: int = 1):
        super().__init__()
        _check_width(d_model)
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads must be >= 1 and divide d_model={d_model}; got {n_heads!r}")
        self.d_model, self.n_heads = d_model, n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch, n_slots, device, dtype):
        return torch.zeros(batch, n_slots, self.d_model, device=device, dtype=dtype)

    def prelude(self, state: torch.Tensor) -> torch.Tensor:
        _check_last_dim("SlotAttentionContext state", state, self.d_model, ndim=3)
        b, s, d = state.shape
        q, k, v = self.qkv(state).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(attn.transpose(1, 2).reshape(b, s, d))

    def update(self, h_star: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        _check_last_dim("h_star", h_star, self.d_model, ndim=3)
        if h_star.shape != state.shape:
            raise ValueError(f"h_star must have the state's shape {tuple(state.shape)}; got {tuple(h_star.shape)}")
        return h_star


def _check_width(d_model: object) -> None:
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be an int >= 1; got {d_model!r}")


def _check_last_dim(name: str, t: torch.Tensor, d: int, ndim: int) -> None:
    if t.dim() != ndim or t.shape[-1] != d:
        expected = "(B, d)" if ndim == 2 else "(B, S, d)"
        raise ValueError(f"{name} must have shape {expected} with d={d}; got {tuple(t.shape)}")
