"""The frozen-context DEQ layer.

One call, for a batch of ``B`` sequences with ``S`` slots each (rows = ``B * S``)::

    ctx_i  = provider_i.prelude(state_i)                 # once, before the loop
    frozen = inj(x) + sum_i ctx_i                        # inj's bias is the cell's bias
    loop:  h <- (1 - damping) * h + damping * gain * RMSNorm(h @ W.T + frozen)
    state_i = provider_i.update(h*, state_i)             # once, after convergence

``frozen`` does not depend on the loop's ``h``, so the Jacobian that decides convergence,
``(1 - damping) I + damping * J_RMSNorm * W``, is the same with or without contexts.

Contraction by construction. With ``z = h W^T + frozen``, ``n = z / rms(z)``, the
Jacobian of ``h -> gain * RMSNorm(z)`` is ``diag(gain) * rstd * (I - n n^T / d) * W``
(``rstd = 1 / sqrt(mean(z^2) + eps)``, and ``I - n n^T / d`` is a projection), so

    Lip(f) <= (1 - damping) + damping * ||gain||_inf * ||W||_2 * rstd        (per row)

Clamping ``||W||_2`` alone (:meth:`FrozenContextDEQ.spectral_schedule`) does not bound
this: ``rstd = 1 / rms(z)`` grows without limit when the injection is small. So by default
(``injection_norm=True``) the frozen term is RMS-normalised to a fixed scale ``c``
(``injection_scale``, default 2): ``frozen = c * u / rms(u)``, ``u = inj(x) + sum ctx``.
Then ``rms(z) >= c - ||W||_2 * rms(h)`` and, at a fixed point, ``rms(h*) <= ||gain||_inf``
(``h* = gain * n``), so ``rstd <= 1 / (c - ||W||_2 ||gain||_inf)``: with ``||W||_2 <= 0.85``
and unit gain the bound is at most ``0.15 + 0.85 * 0.85 / 1.15 = 0.78`` whatever the scale
of ``x`` (typically ~0.5: ``z``'s two parts are not aligned). The layer reports the bound
it actually had, ``info["lipschitz_bound"]``. ``injection_norm=False`` restores the raw sum
(the scale of ``x`` then decides whether the cell contracts).

Fused path: each forward iteration is one GEMM plus :func:`deqkern.functional.update_with_stats`
(one Triton kernel that also yields the residual); the implicit backward's adjoint
iterations are one GEMM plus :func:`deqkern.functional.rmsnorm_adjoint_step` (one Triton
kernel: the adjoint update, its residual, and the RMSNorm VJP feeding the next GEMM),
with no autograd graph through the iterations; parameter gradients come from one
recorded application of the cell at ``h*``. Both kernels fall back to eager torch with
the same math where Triton cannot run (``deqkern._backend``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deqkern.functional import update_with_stats
from deqkern.nn.cell_adjoint import cell_adjoint
from deqkern.nn.context import ContextProvider, updated_states
from deqkern.ops.launch import compute_dtype
from deqkern.solver import solve_cell, solve_fused
from deqkern._validation import check_damping, positive_float, positive_int
from deqkern.solver.config import validate_options
from deqkern.solver.report import Info
from deqkern.spectral import SpectralNormSchedule

__all__ = ["FrozenContextDEQ", "cell_adjoint"]  # cell_adjoint: re-exported from deqkern.nn.cell_adjoint

State = tuple[Any, ...]


class FrozenContextDEQ(nn.Module):
    """A DEQ cell with frozen context, solved to its fixed point at every call.

    Args:
        d_model: feature width ``d`` of the state ``h``.
        contexts: :class:`~deqkern.nn.context.ContextProvider` s whose ``prelude``
            outputs are added to the loop's frozen term.
        d_input: width of the injection input ``x`` (default ``d_model``).
        damping: ``beta`` in ``(0, 1]``.
        max_iter, tol, stop_mode, check_every, on_nonconvergence: the forward solve's
            (see :func:`deqkern.solve`). The default ``stop_mode="rel"`` compares each
            row's step with the row's size. The adjoint solve stops on the relative
            residual of the gradient, whatever ``stop_mode`` (scale-free in the loss).
        b_max_iter, b_tol: the adjoint solve's limits (default ``max_iter``, ``tol``).
        backward: ``"ift"`` (exact implicit gradient), ``"onestep"`` or ``"unrolled"``.
        fused_backward: with ``"ift"``, iterate the adjoint with the layer's own fused
            step (True) or with autograd vector-Jacobian products (False; the reference).
        spectral_target: bound on ``||W||_2`` kept by :meth:`spectral_schedule`; the
            initial ``W`` is scaled to it.
        eps: RMSNorm's epsilon.
        injection_norm: RMS-normalise the frozen term to ``injection_scale`` (module
            docstring: what makes the cell contract for any scale of ``x``). False: the
            raw ``inj(x) + sum ctx``.
        injection_scale: ``c > 0``, the RMS of the normalised frozen term (default 2).
        graph: solve (and, with ``fused_backward``, the adjoint) by replaying CUDA graphs
            (``deqkern.solve(graph=True)``): no host launches or syncs inside the loops,
            always ``max_iter`` iterations. CUDA only; one capture per input shape. The
            frozen term is copied into a persistent buffer each call.

    Parameters: ``weight`` ``(d, d)`` (the only h-dependent weight), ``inj``
    (``nn.Linear(d_input, d)``, its bias is the cell's bias), ``gain`` ``(d,)``.
    """

    def __init__(
        self,
        d_model: int,
        *,
        contexts: Sequence[ContextProvider] = (),
        d_input: Optional[int] = None,
        damping: float = 0.85,
        max_iter: int = 20,
        tol: float = 1e-4,
        stop_mode: str = "rel",
        backward: str = "ift",
        b_max_iter: Optional[int] = None,
        b_tol: Optional[float] = None,
        fused_backward: bool = True,
        spectral_target: float = 0.85,
        eps: float = 1e-6,
        injection_norm: bool = True,
        injection_scale: float = 2.0,
        check_every: Optional[int] = None,
        on_nonconvergence: str = "warn",
        graph: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        d_input = d_model if d_input is None else d_input
        for name, value in (("d_model", d_model), ("d_input", d_input)):
            positive_int(name, value)
        check_damping(damping)
        positive_float("spectral_target", spectral_target)
        positive_float("eps", eps)
        positive_float("injection_scale", injection_scale)
        for name, value in (("graph", graph), ("fused_backward", fused_backward), ("injection_norm", injection_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
        # The solver's own checks, run here so a bad setting fails at construction.
        validate_options(max_iter=max_iter, tol=tol, stop_mode=stop_mode, backward=backward, b_max_iter=b_max_iter,
                         b_tol=b_tol, check_every=check_every, on_nonconvergence=on_nonconvergence)
        for i, provider in enumerate(contexts):
            if not isinstance(provider, ContextProvider):
                raise TypeError(f"contexts[{i}] must be a deqkern.nn.ContextProvider; got {type(provider).__name__}")
            width = getattr(provider, "d_model", d_model)
            if width != d_model:
                raise ValueError(f"contexts[{i}] has d_model={width}; the layer's d_model is {d_model}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_input = d_model, d_input
        self.damping, self.eps, self.spectral_target = float(damping), float(eps), float(spectral_target)
        self.fused_backward = fused_backward
        self.injection_norm, self.injection_scale = injection_norm, float(injection_scale)
        self.solver_options = dict(max_iter=max_iter, tol=tol, stop_mode=stop_mode, backward=backward,
                                   b_max_iter=b_max_iter, b_tol=b_tol, check_every=check_every,
                                   on_nonconvergence=on_nonconvergence, graph=graph)
        # graph=True: the solves read the frozen term from this persistent buffer (a CUDA
        # graph replays fixed addresses); the autograd-connected frozen tensor of the
        # current call sits in a list, out of the graph guards' sight.
        self.register_buffer("_frozen_static", None, persistent=False)
        self._frozen_live: list[torch.Tensor] = []
        self.weight = nn.Parameter(torch.empty(d_model, d_model, **factory))
        self.inj = nn.Linear(d_input, d_model, **factory)
        self.gain = nn.Parameter(torch.ones(d_model, **factory))
        self.contexts = nn.ModuleList(contexts)
        # Warm-started power-iteration vector for the sigma(W) in info["lipschitz_bound"].
        self.register_buffer("_sigma_v", torch.empty(d_model, device=device, dtype=torch.float32), persistent=False)
        self._rstd_seen: list[torch.Tensor] = []
        self._sigma_seen: list = [None, None]  # (W's version, sigma(W)) of the last refresh
        self._factor_seen: list = [None, None]  # (W's and gain's versions, damping ||gain||_inf sigma(W))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``W`` orthogonal-like random, scaled to ``||W||_2 = spectral_target``; gain 1."""
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.d_model))
        _, singular, vh = torch.linalg.svd(self.weight.float())
        self.weight.mul_(self.spectral_target / singular[0])
        self._sigma_v.copy_(vh[0])
        self.inj.reset_parameters()
        self.gain.fill_(1.0)

    def spectral_schedule(self, every: int = 4, **kwargs: Any) -> SpectralNormSchedule:
        """A :class:`~deqkern.SpectralNormSchedule` keeping ``||W||_2 <= spectral_target``;
        attach it to the optimizer: ``layer.spectral_schedule().attach(opt)``."""
        kwargs.setdefault("target", self.spectral_target)
        return SpectralNormSchedule([("weight", self.weight)], every=every, **kwargs)

    def init_state(self, batch: int, n_slots: int, device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None) -> State:
        """The providers' states before the first call (one entry per provider)."""
        device = self.weight.device if device is None else device
        dtype = self.weight.dtype if dtype is None else dtype
        return tuple(p.init_state(batch, n_slots, device, dtype) for p in self.contexts)

    # ----------------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, state: Optional[State] = None, h0: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, State, dict]:
        """Solve the cell for injection input ``x``.

        Args:
            x: ``(B, S, d_input)``, one injection input per slot.
            state: the providers' states (from :meth:`init_state` or the previous call);
                ``None``: :meth:`init_state`.
            h0: ``(B, S, d_model)`` starting iterate (e.g. the previous token's ``h*``,
                detached); default zeros.

        Returns:
            ``h_star`` ``(B, S, d_model)``; the updated states; ``info``: the solver's
            (device tensors, see :func:`deqkern.solve`) plus ``inj_rms`` () and
            ``ctx_rms`` (one () tensor per provider): RMS of the injection and of each
            context, float32; ``lipschitz_bound`` () float32: the largest, over rows, of
            ``(1 - damping) + damping * ||gain||_inf * sigma(W) * rstd`` at the
            returned iterate (module docstring; < 1 certifies that the cell contracts
            there), with ``sigma(W)`` from a warm-started power iteration (one step
            each time W changes, on the device) and ``rstd`` the kernel's own row
            statistic at ``h*`` (``solve_cell(return_rstd=True)``, same launch). These
            three are computed when first read (on the ``solve_cell`` path; the time-parallel
            and loop paths fill them at once): a call that never reads them, as generation,
            runs no device op for them. A context modified in place before the read makes
            its ``ctx_rms`` NaN.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_input:
            raise ValueError(f"x must have shape (B, S, {self.d_input}); got {tuple(x.shape)}")
        if x.dtype != self.weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x must have the layer's dtype {self.weight.dtype}; got {x.dtype} "
                            f"(convert x, or the layer with .to(dtype))")
        batch, n_slots, _ = x.shape
        if state is None:
            state = self.init_state(batch, n_slots, x.device)
        if not isinstance(state, (tuple, list)) or len(state) != len(self.contexts):
            got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(f"state must be a tuple of {len(self.contexts)} provider states; got {got}")
        shape = (batch, n_slots, self.d_model)

        ctxs = []
        for i, (provider, st) in enumerate(zip(self.contexts, state)):
            ctx = provider.prelude(st)
            if ctx.dim() == 2:
                ctx = ctx.unsqueeze(1)
            if ctx.dim() != 3 or ctx.shape[0] != batch or ctx.shape[1] not in (1, n_slots) or ctx.shape[2] != self.d_model:
                raise ValueError(
                    f"contexts[{i}] ({type(provider).__name__}).prelude returned shape {tuple(ctx.shape)}; "
                    f"expected (B, d) or (B, S, d) = ({batch}, {self.d_model}) or {shape}"
                )
            ctxs.append(ctx)
        inj = self.inj(x)
        frozen = self.frozen_term(inj, ctxs).expand(shape).contiguous()

        if h0 is None:
            h0 = torch.zeros(shape, device=x.device, dtype=frozen.dtype)
        elif h0.shape != shape:
            raise ValueError(f"h0 must have shape {shape}; got {tuple(h0.shape)}")
        elif h0.dtype != frozen.dtype:
            raise TypeError(f"h0 must have dtype {frozen.dtype}; got {h0.dtype}")

        graph, opts = self.solver_options["graph"], self.solver_options
        self._rstd_seen.clear()
        if not graph and self.fused_backward and opts["backward"] != "unrolled":
            # the one-launch solve (and adjoint) of deqkern.solve_cell; it also returns
            # the row statistic at h* that the Lipschitz bound needs
            h_star, info = solve_cell(
                self.weight, frozen, self.gain, h0.detach(), damping=self.damping, eps=self.eps,
                max_iter=opts["max_iter"], tol=opts["tol"], stop_mode=opts["stop_mode"], backward=opts["backward"],
                b_max_iter=opts["b_max_iter"], b_tol=opts["b_tol"], on_nonconvergence=opts["on_nonconvergence"],
                return_rstd=True)
            rstd = dict.pop(info, "rstd")
        else:
            h_star, info = self._solve_loop(frozen, h0, graph)
            # rstd at the returned iterate: the last cell application saw it (the recorded
            # one at h*, or the loop's last step, whose frozen rows are evaluated at their
            # committed iterate); a replayed graph without autograd recorded none.
            if graph and not torch.is_grad_enabled() or not self._rstd_seen:
                with torch.no_grad():
                    self._cell(h_star.detach(), frozen.detach())
            rstd = self._rstd_seen[0]
        self._rstd_seen.clear()
        # the diagnostics: on first use where the solve's info defers its own statistics
        # (the layer's output does not need them: about 15 small device ops a call)
        bound = functools.partial(_bound, 1.0 - self.damping, self._bound_factor(), rstd.detach())
        diagnostics = {"lipschitz_bound": bound, "inj_rms": _Snapshot(inj).rms,
                       "ctx_rms": functools.partial(_rms_each, [_Snapshot(ctx) for ctx in ctxs])}
        for key, compute in diagnostics.items():
            if isinstance(info, Info):
                info.defer_value(key, compute)
            else:
                dict.__setitem__(info, key, compute())

        return h_star, updated_states(self.contexts, h_star, state, "update"), info

    def forward_sequence(
        self, x: torch.Tensor, state: Optional[State] = None, *, time_parallel: bool = True,
        warm_start: bool = True, max_sweeps: Optional[int] = None, inner_iter: Optional[int] = None,
        colors: Optional[int] = None, tol: Optional[float] = None, b_tol: Optional[float] = None,
    ) -> tuple[torch.Tensor, State, dict]:
        """Solve the cell for every token of a sequence: token ``t`` sees the providers'
        states after tokens ``0 .. t-1`` (:mod:`deqkern.nn.sequence`).

        Args:
            x: ``(B, T, S, d_input)``.
            state: the providers' states before the first token (``None``: :meth:`init_state`).
            time_parallel: True: all tokens at once, by sweeps over time and the
                implicit backward of the joint fixed point. False: the token loop, one
                :meth:`forward` per token (the reference).
            warm_start: token loop only: start each token's solve at the previous ``h*``.
            max_sweeps: sweep cap (default ``T + ceil(max_iter / inner_iter)``), the
                adjoint's too. inner_iter: cell applications per token and sweep;
                colors: 1 for Jacobi sweeps, ``p`` for Gauss-Seidel over ``p`` colors
                of tokens (defaults :data:`~deqkern.nn.sequence.DEFAULT_INNER_ITER`,
                :data:`~deqkern.nn.sequence.DEFAULT_COLORS`). tol: the joint
                residual's bound (default the layer's ``tol``, in its ``stop_mode``).
                b_tol: the adjoint's, relative to the gradient's largest magnitude
                (default ``tol``).

        Returns:
            ``h_star`` ``(B, T, S, d_model)``; the states after the last token; ``info``
            (device tensors unless said): ``residual``, ``converged``, ``nstep``
            ``(B, T, S)`` (time-parallel: the joint residual of the returned iterate,
            and the batched cell applications run); ``max_residual``, ``mean_nstep``,
            ``converged_fraction``, ``contraction``, ``nonfinite_iter`` (); ``sweeps``
            and ``iterations`` (Python ints; ``sweeps`` is 0 for the token loop);
            ``inj_rms`` ``(T,)`` and ``ctx_rms`` (one ``(T,)`` per provider). After a
            time-parallel backward: ``b_residual``, ``b_converged`` ``(B, T, S)``,
            ``b_max_residual``, ``b_sweeps``, ``b_iterations``, ...
        """
        from deqkern.nn import sequence

        return sequence.forward_sequence(self, x, state, time_parallel=time_parallel, warm_start=warm_start,
                                         max_sweeps=max_sweeps, inner_iter=inner_iter, colors=colors, tol=tol,
                                         b_tol=b_tol)

    def _solve_loop(self, frozen: torch.Tensor, h0: torch.Tensor, graph: bool) -> tuple[torch.Tensor, dict]:
        """The GEMM + fused-update loop (:func:`deqkern.solve_fused`): for ``graph=True``,
        the autograd adjoint (``fused_backward=False``) and ``backward="unrolled"``."""
        if graph:
            self._stage_frozen(frozen)
            step = self._graph_step
        else:
            step = self._step(frozen)
        adjoint = None
        if self.fused_backward:
            # this call's frozen term: under graph=True the solver copies it into the
            # adjoint graph's own static buffer when the backward replays
            adjoint = cell_adjoint(self.weight, self.gain, frozen, damping=self.damping, eps=self.eps)
        out = solve_fused(step, h0.detach(), adjoint=adjoint, **self.solver_options)
        self._frozen_live.clear()  # the recorded application holds what backward needs
        return out

    def frozen_term(self, inj: torch.Tensor, ctxs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The loop's frozen term from the injection ``inj = self.inj(x)`` ``(..., S, d)``
        and the providers' contexts (each broadcastable to it): what the cell adds to
        ``h @ W.T`` at every iteration. Shapes broadcast; no copy is forced."""
        frozen = inj
        for ctx in ctxs:
            frozen = frozen + ctx
        if not self.injection_norm:
            return frozen
        # float32 arithmetic for 16-bit storage, as the update kernel does
        u = frozen.to(compute_dtype(frozen))
        return (u * (self.injection_scale * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps))).to(frozen.dtype)

    def _stage_frozen(self, frozen: torch.Tensor) -> None:
        """Copy this call's frozen term into the persistent buffer that the captured
        graphs read (re-allocated, and the graphs re-captured, only when its shape,
        dtype or device changes)."""
        static = self._frozen_static
        if static is None or static.shape != frozen.shape or static.dtype != frozen.dtype or static.device != frozen.device:
            static = self._frozen_static = torch.empty_like(frozen, memory_format=torch.contiguous_format)
        static.copy_(frozen.detach())
        self._frozen_live[:] = [frozen]

    def _graph_step(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step for ``graph=True``: a bound method (the graph cache's key) reading the
        persistent frozen buffer; when autograd records the one application at ``h*``,
        the call's live frozen tensor instead, so gradients reach what produced it."""
        frozen = self._frozen_live[0] if torch.is_grad_enabled() else self._frozen_static
        return self._cell(h, frozen)

    def _step(self, frozen: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``h -> (h_next, residual)`` for this call's frozen term."""
        return lambda h: self._cell(h, frozen)

    @torch.no_grad()
    def _bound_factor(self) -> torch.Tensor:
        """``damping * ||gain||_inf * sigma(W)`` of the Lipschitz bound (``_bound``), () float32
        on the device, recomputed only when W or the gain changed (their version counters:
        an optimizer step), so a call costs no device op for it. One warm-started
        power-iteration step refreshes sigma(W) whenever W changed. Each refresh makes a new
        tensor: a deferred bound keeps the factor of its own call."""
        versions = (self.weight._version, self.weight.data_ptr(), self.weight.device, self.gain._version,
                    self.gain.data_ptr())
        if self._factor_seen[0] != versions:
            gain_max = self.gain.detach().abs().amax().float()
            self._factor_seen[:] = [versions, self.damping * gain_max * self._sigma()]
        return self._factor_seen[1]

    def _sigma(self) -> torch.Tensor:
        """sigma(W): one warm-started power-iteration step when W changed since the last."""
        version = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        if self._sigma_seen[0] != version:  # refreshed once per change of W (an optimizer step)
            ct = compute_dtype(self.weight)
            w = self.weight.detach().to(ct)
            v = self._sigma_v.to(device=w.device, dtype=ct)
            v = torch.mv(w.t(), torch.mv(w, v))
            v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
            self._sigma_v.copy_(v)
            self._sigma_seen[:] = [version, torch.linalg.vector_norm(torch.mv(w, v))]
        return self._sigma_seen[1]

    def _cell(self, h: torch.Tensor, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration: one GEMM and one fused update; returns ``(h_next, residual)``."""
        h_next, residual, rstd = update_with_stats(
            F.linear(h, self.weight), frozen, h, self.gain,
            eps=self.eps, damping=self.damping, stop_mode=self.solver_options["stop_mode"],
        )
        self._rstd_seen[:] = [rstd]
        return h_next, residual

def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2).mean().sqrt()


def _bound(base: float, factor: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The Lipschitz bound ``(1 - damping) + damping * ||gain||_inf * sigma(W) * max(rstd)``."""
    return base + factor * rstd.float().amax()


class _Snapshot:
    """A tensor a diagnostic reads later, with its version counter at the call: an in-place
    change since then makes the diagnostic NaN rather than a statistic of other values."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor):
        self.tensor, self.version = t.detach(), _version(t)

    def rms(self) -> torch.Tensor:
        if self.version is not None and _version(self.tensor) != self.version:
            return torch.full((), float("nan"), dtype=torch.float32, device=self.tensor.device)
        return _rms(self.tensor)


def _version(t: torch.Tensor) -> Optional[int]:
    """The version counter; None for an inference tensor (it has none)."""
    return None if t.is_inference() else t._version


def _rms_each(snapshots: list) -> tuple:
    return tuple(s.rms() for s in snapshots)
