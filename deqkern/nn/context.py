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

Sequence forms (for :meth:`deqkern.nn.FrozenContextDEQ.forward_sequence`, which solves
all tokens of a sequence at once)::

    ctx   = provider.prelude_sequence(h, state)   # every token's context: (B, T, 1|S, d)
    state = provider.update_sequence(h, state)    # the state after the last token

``h`` ``(B, T, S, d)`` holds the (current iterates of the) fixed points of all ``T``
tokens; token ``t``'s context comes from the state before it, i.e. from ``state``
updated with ``h[:, :t]``. The base class implements both by a loop over ``t`` calling
``prelude`` / ``update``, so a provider with only the three methods above works
unchanged; :class:`MambaMemory` (a parallel scan) and :class:`SlotAttentionContext`
(attention batched over ``t``) override them without a loop over ``t``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from deqkern._validation import positive_int
from deqkern.ops.launch import compute_dtype

__all__ = ["ContextProvider", "MambaMemory", "SlotAttentionContext", "DecayScan", "decay_scan", "updated_states"]


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

    def prelude_sequence(self, h: torch.Tensor, state: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """The tokens' contexts: ``h`` ``(B, T, S, d)``, ``state`` the state before the
        first token -> ``(B, n, 1, d)`` or ``(B, n, S, d)`` for the ``n`` tokens
        ``range(T)[tokens]`` (``tokens``: a slice with a positive step; all by default).
        Token ``t``'s context is ``prelude(state_t)`` with ``state_0 = state``,
        ``state_{t+1} = update(h[:, t], state_t)``. Differentiable in ``h``, ``state`` and
        the parameters. Default: a loop over ``t`` up to the last token asked for."""
        wanted = range(h.shape[1])[tokens]
        contexts = []
        for t in range(wanted[-1] + 1):
            ctx = self.prelude(state)
            contexts.append(ctx.unsqueeze(1) if ctx.dim() == 2 else ctx)
            if t < wanted[-1]:
                state = self.update(h[:, t], state)
        return torch.stack(contexts, 1)[:, tokens]

    def update_sequence(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The state after the last token: ``update`` applied with ``h[:, 0]``, ...,
        ``h[:, T - 1]`` in turn. Default: a loop over ``t``."""
        for t in range(h.shape[1]):
            state = self.update(h[:, t], state)
        return state


class MambaMemory(ContextProvider):
    """A gated linear memory ``M`` of shape ``(B, d_model)``.

    ``prelude``: ``hist_ctx = sigmoid(gate) * (M_prev @ W_hist.T)``, shape ``(B, d)``.
    ``update``:  ``M = a * M_prev + (1 - a) * x_proj(mean over slots of h*)`` with a
    learned per-channel decay ``a = sigmoid(decay_logit)`` in ``(0, 1)``.
    """

    def __init__(self, d_model: int, *, init_decay: float = 0.9, init_gate: float = 0.5):
        super().__init__()
        positive_int("d_model", d_model)
        if not 0.0 < init_decay < 1.0:
            raise ValueError(f"init_decay must be in (0, 1); got {init_decay!r}")
        if not 0.0 < init_gate < 1.0:
            raise ValueError(f"init_gate must be in (0, 1); got {init_gate!r}")
        self.d_model = d_model
        self.hist = nn.Linear(d_model, d_model, bias=False)
        self.x_proj = nn.Linear(d_model, d_model)
        self.gate_logit = nn.Parameter(torch.full((d_model,), math.log(init_gate / (1 - init_gate))))
        self.decay_logit = nn.Parameter(torch.full((d_model,), math.log(init_decay / (1 - init_decay))))
        self._scan_cache: Optional[tuple] = None

    def init_state(self, batch, n_slots, device, dtype):
        return torch.zeros(batch, self.d_model, device=device, dtype=dtype)

    def prelude(self, state: torch.Tensor) -> torch.Tensor:
        _check_last_dim("MambaMemory state", state, self.d_model, ndim=2)
        return torch.sigmoid(self.gate_logit) * self.hist(state)

    def update(self, h_star: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        _check_last_dim("h_star", h_star, self.d_model, ndim=3)
        decay = torch.sigmoid(self.decay_logit)
        return decay * state + (1 - decay) * self.x_proj(h_star.mean(1))

    def _inputs(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``(1 - a) * x_proj(mean over slots of h_t)`` for every ``t``: ``(B, T, d)``."""
        _check_last_dim("h", h, self.d_model, ndim=4)
        _check_last_dim("MambaMemory state", state, self.d_model, ndim=2)
        return (1 - torch.sigmoid(self.decay_logit)) * self.x_proj(h.mean(2))

    def prelude_sequence(self, h: torch.Tensor, state: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """``(B, n, 1, d)``: the memory before each token by one parallel scan
        (:class:`DecayScan`), then ``hist`` on the ``n`` memories asked for in one GEMM."""
        before = self._scan(h.shape[1] - 1)(self._inputs(h[:, :-1], state), state)   # M_1 .. M_{T-1}
        memories = torch.cat([state.unsqueeze(1), before], 1)[:, tokens]        # M_0 .. M_{T-1}, selected
        return (torch.sigmoid(self.gate_logit) * self.hist(memories)).unsqueeze(2)

    def _scan(self, length: int) -> "DecayScan":
        """The scan's decay factors for ``length`` steps. Outside autograd (the forward
        sweeps of :meth:`FrozenContextDEQ.forward_sequence`, which call this once per
        sweep) they are kept until ``decay_logit`` changes: its storage, or its version
        counter, which in-place updates such as optimizer steps bump. They cost about 20
        small kernel launches to form."""
        param = self.decay_logit
        if torch.is_grad_enabled() and param.requires_grad:
            return DecayScan(nn.functional.logsigmoid(param), length)
        key = (length, param.data_ptr(), param._version, param.dtype, param.device)
        if self._scan_cache is None or self._scan_cache[0] != key:
            with torch.no_grad():
                self._scan_cache = (key, DecayScan(nn.functional.logsigmoid(param), length))
        return self._scan_cache[1]

    def update_sequence(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``M_T = a^T M_0 + sum_t a^(T-t) u_t``: one weighted sum, no scan."""
        inputs = self._inputs(h, state)
        length = h.shape[1]
        log_decay = nn.functional.logsigmoid(self.decay_logit).to(compute_dtype(inputs))
        lags = torch.arange(length - 1, -1, -1, device=h.device, dtype=log_decay.dtype)
        weights = torch.exp(lags[:, None] * log_decay)                           # (T, d), <= 1
        memory = torch.exp(length * log_decay) * state + torch.einsum("td,btd->bd", weights, inputs.to(log_decay.dtype))
        return memory.to(state.dtype)


class SlotAttentionContext(ContextProvider):
    """Attention over the slots' previous converged state ``H_prev`` ``(B, S, d)``.

    ``prelude``: ``Q, K, V = H_prev @ W_q.T, W_k.T, W_v.T``, ``attn_ctx =
    out(softmax(Q K^T / sqrt(d_head)) V)`` per head, shape ``(B, S, d)``; once per token.
    ``update``: the new state is ``h*`` itself.
    """

    def __init__(self, d_model: int, *, n_heads: int = 1):
        super().__init__()
        positive_int("d_model", d_model)
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

    def prelude_sequence(self, h: torch.Tensor, state: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """``(B, n, S, d)``: token ``t`` attends over ``h[:, t - 1]`` (``state`` for
        ``t = 0``); the ``n`` attentions asked for run as one batch of ``B * n``."""
        self._check_sequence(h, state)
        batch, _, slots, d = h.shape
        start, stop, step = tokens.indices(h.shape[1])
        if start > 0:  # the predecessors t - 1, sliced without copying the rest
            previous = h[:, start - 1:max(stop - 1, 0):step]
        else:
            previous = torch.cat([state.unsqueeze(1), h[:, step - 1:max(stop - 1, 0):step]], 1)
        length = previous.shape[1]
        return self.prelude(previous.reshape(batch * length, slots, d)).view(batch, length, slots, d)

    def update_sequence(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self._check_sequence(h, state)
        return h[:, -1]

    def _check_sequence(self, h: torch.Tensor, state: torch.Tensor) -> None:
        _check_last_dim("h", h, self.d_model, ndim=4)
        _check_last_dim("SlotAttentionContext state", state, self.d_model, ndim=3)
        if h.shape[0] != state.shape[0] or h.shape[2:] != state.shape[1:]:
            raise ValueError(f"h must have shape (B, T, S, d) = ({state.shape[0]}, T, {state.shape[1]}, "
                             f"{state.shape[2]}) like the state; got {tuple(h.shape)}")


def decay_scan(inputs: torch.Tensor, log_decay: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``M_t = a * M_{t-1} + inputs_t`` for ``t = 1 .. T`` from ``M_0 = start``, all at once.

    ``inputs`` ``(B, T, d)``, ``log_decay`` ``(d,)`` (``log a``, ``a`` in ``(0, 1)`` per
    channel), ``start`` ``(B, d)`` -> ``M_1 .. M_T`` ``(B, T, d)``; differentiable in all
    three. :class:`DecayScan` (the decay factors, reusable for equal ``T``) then its call.
    """
    return DecayScan(log_decay, inputs.shape[1])(inputs, start)


class DecayScan:
    """The decay factors of a ``length``-step :func:`decay_scan`, formed once.

    Two levels of chunks of ``L = ceil(sqrt(T))`` steps: inside each chunk the scan from
    zero is one contraction with the ``(L, L, d)`` matrix of ``a^(j-i)`` (``j >= i``);
    the chunks' end states are combined by the same contraction over chunks with
    ``a^(L (c - c'))``, and each chunk adds ``a^(j+1)`` times the state entering it. Every
    factor is ``a^k`` with ``k >= 0`` formed as ``exp(k * log a)``, so nothing overflows
    for any ``T`` (the ``a^-t`` of a cumulative-product scan overflows float32 past
    ``T ~ 90 / |log a|``); the work is ``O(B T d sqrt(T))``, a few percent of one
    ``(B T, d) x (d, d)`` GEMM at ``T <= 4096``, ``d = 512``. Factors and the scan are
    float32 (float64 for float64 ``log_decay``); results come back in the inputs' dtype.
    """

    def __init__(self, log_decay: torch.Tensor, length: int):
        dtype = compute_dtype(log_decay)
        log_decay = log_decay.to(dtype)
        self.length = length
        self.chunk = math.isqrt(max(length, 1) - 1) + 1
        self.n_chunks = -(-length // self.chunk)
        steps = torch.arange(self.chunk, device=log_decay.device, dtype=dtype)
        chunks = torch.arange(self.n_chunks, device=log_decay.device, dtype=dtype)
        self.within = _decay_matrix(steps, log_decay)                                    # (d, L, L)
        self.across = _decay_matrix(chunks, self.chunk * log_decay)                     # (d, n, n)
        self.from_start = torch.exp((chunks + 1)[:, None] * self.chunk * log_decay)     # (n, d): a^(L (c+1))
        self.carry = torch.exp((steps + 1)[:, None] * log_decay)                         # (L, d): a^(j+1)

    def __call__(self, inputs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        batch, length, d = inputs.shape
        if length != self.length:
            raise ValueError(f"inputs must have {self.length} steps (this scan's length); got shape {tuple(inputs.shape)}")
        if length == 0:
            return inputs
        dtype = self.carry.dtype
        padded = nn.functional.pad(inputs.to(dtype), (0, 0, 0, self.n_chunks * self.chunk - length))
        local = _apply_decay(self.within, padded.view(batch, self.n_chunks, self.chunk, d))   # scans from zero
        start = start.to(dtype)
        # E_c, the state at the end of chunk c: a^(L (c+1)) M_0 + sum_{c' <= c} a^(L (c-c')) local_end_c'
        ends = _apply_decay(self.across, local[:, None, :, -1])[:, 0] + self.from_start * start[:, None]
        entering = torch.cat([start[:, None], ends[:, :-1]], 1)                           # (B, n_chunks, d)
        scanned = local + self.carry * entering[:, :, None]
        return scanned.reshape(batch, self.n_chunks * self.chunk, d)[:, :length].to(inputs.dtype)


def _apply_decay(matrix: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[b, c, j] = sum_i matrix[:, j, i] * values[b, c, i]``, channel by channel:
    ``matrix`` ``(d, n, n)``, ``values`` ``(B, C, n, d)`` -> ``(B, C, n, d)``. One ``bmm``
    over the ``d`` channels on contiguous operands: the same contraction written as an
    ``einsum`` hands ``bmm`` strided views, which the CPU kernel copies matrix by matrix
    (5x slower at the CPU preset's 64 channels of 8 x 8)."""
    batch, count, n, d = values.shape
    rhs = values.permute(3, 2, 0, 1).reshape(d, n, batch * count).contiguous()       # (d, n, B*C)
    return torch.bmm(matrix, rhs).view(d, n, batch, count).permute(2, 3, 1, 0)


def _decay_matrix(index: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """``(d, n, n)`` contiguous: ``exp((j - i) * log_decay)`` for ``j >= i``, 0 above the
    diagonal (the lag is clamped at 0 before ``exp`` so the masked entries' gradients
    stay finite)."""
    lag = index[:, None] - index[None, :]
    factors = torch.exp(lag.clamp_min(0)[None] * log_decay[:, None, None])
    return torch.where(lag >= 0, factors, torch.zeros_like(factors))


def updated_states(providers, h_star: torch.Tensor, state, method: str) -> tuple:
    """Each provider's new state, ``getattr(provider, method)(h_star, old)`` (``"update"``
    for one step, ``"update_sequence"`` for a sequence); a state that was a tensor must
    come back a tensor of its shape (ValueError naming the provider)."""
    new_state = []
    for i, (provider, old) in enumerate(zip(providers, state)):
        new = getattr(provider, method)(h_star, old)
        if isinstance(old, torch.Tensor) and (not isinstance(new, torch.Tensor) or new.shape != old.shape):
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"contexts[{i}] ({type(provider).__name__}).{method} returned {got}; "
                             f"expected the state's shape {tuple(old.shape)}")
        new_state.append(new)
    return tuple(new_state)


def _check_last_dim(name: str, t: torch.Tensor, d: int, ndim: int) -> None:
    if t.dim() != ndim or t.shape[-1] != d:
        expected = {2: "(B, d)", 3: "(B, S, d)", 4: "(B, T, S, d)"}[ndim]
        raise ValueError(f"{name} must have shape {expected} with d={d}; got {tuple(t.shape)}")
