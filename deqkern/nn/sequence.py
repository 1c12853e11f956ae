"""Time-parallel solve of a frozen-context sequence: the fixed points of all tokens at once.

The token loop solves token ``t`` with the frozen term ``frozen_t = frozen_term(inj(x_t),
ctx_t)``, whose contexts come from the providers' states after tokens ``1 .. t-1``. All
tokens' fixed points ``H = (h*_1 .. h*_T)`` are therefore one joint fixed point::

    H = G(H),   G(H)_t = cell(h_t, frozen_t(H_{<t})),   cell(h, f) = (1-b) h + b g RMSNorm(h W^T + f)

whose Jacobian is block lower triangular in time: the cell's own (row by row) on the
diagonal, the contexts' strictly below it.

Forward (:func:`solve_sequence`): Jacobi sweeps over time. Each sweep forms every
token's context from the current iterates (the providers' ``prelude_sequence``: a scan,
attention batched over ``t``), the frozen term of all tokens, and then applies the cell to
all ``B * T * S`` rows together, ``inner_iter`` times with that frozen term (rows are
independent given it). The first application of a sweep, with fresh contexts, is one
step of ``G`` itself: its per-row residual is the *joint residual*, the token loop's own
test (``||cell(h_t, frozen_t) - h_t||`` in the layer's ``stop_mode``, below its ``tol``)
applied to every token at once. The sweeps stop when every row passes it (one host
sync per sweep reads the count), returning that step's output, as the solver returns
the iterate whose step passed. With exact inner solves ``T`` sweeps are exact; with
weak coupling a handful suffice, independent of ``T``.

Backward (the exact implicit gradient of the joint fixed point): one application of
``G`` at ``H*`` is recorded with autograd (contexts, injection, one cell step per row)
and the adjoint ``g = v + (dG/dH)^T g`` is solved by the same sweeps: each computes the
joint adjoint residual ``r = v + (dG/dH)^T g - g`` by one VJP through the recorded
application (the cross-token part included), checks it, and corrects ``g <- g + d``
with ``d = r + J_cell^T d`` iterated ``inner_iter - 1`` times from ``d = r`` (VJPs of a
second recorded application: the cell alone, its frozen term detached). ``v`` is divided
by its largest magnitude first (the problem is linear), so the stopping test is
relative to the gradient's size in every ``stop_mode``: scaling the loss by 1e-3 or 1e3
changes neither the sweeps nor the result's relative accuracy. The gradient then goes
through the recorded application once, to the parameters, the inputs and the initial
state. No graph through the sweeps: memory is the contexts' activations at ``H*`` plus
a few ``(B, T, S, d)`` buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from deqkern.ops.residual import row_residual
from deqkern.solver.adjoint import Equilibrium
from deqkern.solver.loop import Check, enforce, raise_if_nonfinite

__all__ = ["SweepOptions", "solve_sequence", "token_loop", "DEFAULT_INNER_ITER"]

#: Cell applications per sweep (the first one with fresh contexts). Measured on the CPU
#: preset (``bench/bench_model.py --inner-iter``): the sweep count is set by the cross-token
#: coupling, not by the inner solves -- after 60 training steps 19 / 15 / 14 / 14 forward
#: sweeps with 1 / 2 / 3 / 4 applications (8 sweeps from 2 on at initialization, 13 with
#: 1) -- while a sweep's contexts cost about four cell applications. 2 gives the fewest
#: total GEMMs in both states.
DEFAULT_INNER_ITER = 2


@dataclass(frozen=True)
class SweepOptions:
    """Validated arguments of one sequence solve (:meth:`FrozenContextDEQ.forward_sequence`)."""

    max_sweeps: int
    inner_iter: int
    tol: float
    b_tol: float
    stop_mode: str
    on_nonconvergence: str
    backward: str


def _contexts(layer, h: torch.Tensor, state: tuple, validate: bool) -> list[torch.Tensor]:
    """Every provider's ``prelude_sequence`` at the iterates ``h`` ``(B, T, S, d)``."""
    contexts = []
    for i, (provider, st) in enumerate(zip(layer.contexts, state)):
        ctx = provider.prelude_sequence(h, st)
        if validate and (ctx.dim() != 4 or ctx.shape[:2] != h.shape[:2] or ctx.shape[2] not in (1, h.shape[2])
                         or ctx.shape[3] != h.shape[3]):
            raise ValueError(f"contexts[{i}] ({type(provider).__name__}).prelude_sequence returned shape "
                             f"{tuple(ctx.shape)}; expected (B, T, 1, d) or (B, T, S, d) = {tuple(h.shape)}")
        contexts.append(ctx)
    return contexts


def _frozen(layer, inj: torch.Tensor, contexts: list[torch.Tensor]) -> torch.Tensor:
    return layer.frozen_term(inj, contexts).expand(inj.shape).contiguous()


def _token_rms(t: torch.Tensor) -> torch.Tensor:
    """float32 ``(T,)``: the RMS of each token's slice of ``t`` ``(B, T, S|1, d)``."""
    return t.detach().float().pow(2).mean((0, 2, 3)).sqrt()


def _check(residual: torch.Tensor, tol: float, iteration: int) -> Check:
    """One device-to-host read: rows at or above ``tol``, non-finite rows, max residual."""
    bad = ~torch.isfinite(residual)
    unconverged, bad_rows, max_residual = torch.stack(
        [(~(residual < tol)).sum().double(), bad.sum().double(), residual.amax().double()]).tolist()
    return Check(int(unconverged), iteration if bad_rows else 0, int(bad_rows), max_residual)


def _summary(residual: torch.Tensor, tol: float, iterations: int, sweeps: int, check: Check) -> dict:
    converged = residual < tol
    return {
        "residual": residual, "converged": converged, "max_residual": residual.amax(),
        "converged_fraction": converged.float().mean(), "sweeps": sweeps, "iterations": iterations,
        "nonfinite_iter": torch.tensor(check.first_bad_iter, dtype=torch.int32, device=residual.device),
    }


@torch.no_grad()
def _sweep(layer, inj: torch.Tensor, state: tuple, opts: SweepOptions):
    """The forward sweeps from ``H = 0``. Returns ``H*``, info, and the last sweep's contexts."""
    h = torch.zeros_like(inj)
    contraction = torch.zeros((), device=inj.device)
    iterations = 0
    for sweep in range(1, opts.max_sweeps + 1):
        contexts = _contexts(layer, h, state, validate=sweep == 1)
        frozen = _frozen(layer, inj, contexts)
        h, residual = layer._cell(h, frozen)
        iterations += 1
        check = _check(residual, opts.tol, iterations)
        raise_if_nonfinite(check, f"FrozenContextDEQ.forward_sequence (sweep {sweep})")
        if check.unconverged == 0 or sweep == opts.max_sweeps:
            break
        for inner in range(opts.inner_iter - 1):
            h, inner_residual = layer._cell(h, frozen)
            iterations += 1
            if inner == 0:  # the cell's local contraction, over rows still above tol
                active = residual >= opts.tol
                contraction = torch.where(active, inner_residual / residual, 0.0).amax()
    info = _summary(residual, opts.tol, iterations, sweep, check)
    info.update(nstep=torch.full_like(residual, iterations, dtype=torch.int32),
                mean_nstep=torch.tensor(float(iterations), device=inj.device), contraction=contraction)
    enforce(check, opts.on_nonconvergence, f"FrozenContextDEQ.forward_sequence ({sweep} sweeps)",
            residual.numel(), iterations, opts.tol, opts.stop_mode, info)
    return h, info, contexts


class _SequenceAdjoint:
    """Solves ``g = v + (dG/dH)^T g`` by adjoint sweeps (module docstring) through two
    recorded applications at ``h_in = H*``: ``out = G(h_in)`` (contexts included) and
    ``out_cell``, the cell alone with the frozen term detached (``J_cell^T`` for the
    inner iterations: one update backward and one GEMM each; the fused
    :class:`~deqkern.nn.cell_adjoint` would re-form ``h* W^T`` for every new right-hand
    side, a GEMM more per sweep)."""

    def __init__(self, h_in: torch.Tensor, out: torch.Tensor, out_cell: Optional[torch.Tensor], opts: SweepOptions,
                 info: dict):
        self.h_in, self.out, self.out_cell, self.opts, self.info = h_in, out, out_cell, opts, info

    def _vjp(self, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        (vjp,) = torch.autograd.grad(out, self.h_in, g.to(out.dtype), retain_graph=True)
        return vjp.to(g.dtype)

    def solve(self, grad: torch.Tensor) -> torch.Tensor:
        opts = self.opts
        v = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        scale = v.abs().amax().clamp_min(torch.finfo(v.dtype).tiny)
        v = v / scale
        g, r = torch.zeros_like(v), v
        iterations = 0
        for sweep in range(1, opts.max_sweeps + 1):
            if sweep > 1:
                r = v + self._vjp(self.out, g) - g
            residual = row_residual(g + r, g, opts.stop_mode)
            iterations += 1
            check = _check(residual, opts.b_tol, iterations)
            raise_if_nonfinite(check, f"FrozenContextDEQ.forward_sequence backward (adjoint sweep {sweep})")
            if check.unconverged == 0 or sweep == opts.max_sweeps:
                g = g + r
                break
            correction = r  # d = r + J_cell^T d, from d = r
            for _ in range(opts.inner_iter - 1):
                correction = r + self._vjp(self.out_cell, correction)
            iterations += opts.inner_iter - 1
            g = g + correction
        stats = _summary(residual, opts.b_tol, iterations, sweep, check)
        self.info.update({f"b_{name}": value for name, value in stats.items()})
        enforce(check, opts.on_nonconvergence, f"FrozenContextDEQ.forward_sequence backward ({sweep} adjoint sweeps)",
                residual.numel(), iterations, opts.b_tol, opts.stop_mode, self.info)
        return (g * scale).to(grad.dtype)


@torch.compiler.disable(reason="FrozenContextDEQ.forward_sequence: each sweep's stopping test syncs with the host")
def solve_sequence(layer, x: torch.Tensor, state: tuple, opts: SweepOptions):
    """:meth:`FrozenContextDEQ.forward_sequence` with ``time_parallel=True`` (arguments
    validated there): ``x`` ``(B, T, S, d_input)`` -> ``(h_star, state, info)``."""
    inj = layer.inj(x)
    h_star, info, contexts = _sweep(layer, inj.detach(), state, opts)
    info["inj_rms"] = _token_rms(inj)
    info["ctx_rms"] = tuple(_token_rms(ctx) for ctx in contexts)
    if torch.is_grad_enabled():
        h_in = h_star.clone().requires_grad_(opts.backward == "ift")
        frozen = _frozen(layer, inj, _contexts(layer, h_in, state, validate=False))
        out = layer._cell(h_in, frozen)[0]
        if out.requires_grad:
            adjoint = None
            if opts.backward == "ift":
                out_cell = layer._cell(h_in, frozen.detach())[0] if opts.inner_iter > 1 else None
                adjoint = _SequenceAdjoint(h_in, out, out_cell, opts, info)
            h_star = Equilibrium.apply(out, [h_star], adjoint)
    new_state = []
    for i, (provider, st) in enumerate(zip(layer.contexts, state)):
        new = provider.update_sequence(h_star, st)
        if isinstance(st, torch.Tensor) and (not isinstance(new, torch.Tensor) or new.shape != st.shape):
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"contexts[{i}] ({type(provider).__name__}).update_sequence returned {got}; "
                             f"expected the state's shape {tuple(st.shape)}")
        new_state.append(new)
    return h_star, tuple(new_state), info


def token_loop(layer, x: torch.Tensor, state: tuple, warm_start: bool):
    """:meth:`FrozenContextDEQ.forward_sequence` with ``time_parallel=False``: one
    ``layer(x_t, state)`` per token (warm-started from the previous ``h*`` if asked);
    the per-token ``info`` stacked along ``T``."""
    outputs, infos = [], []
    h_star: Optional[torch.Tensor] = None
    for t in range(x.shape[1]):
        h0 = h_star.detach() if warm_start and h_star is not None else None
        h_star, state, token_info = layer(x[:, t], state, h0=h0)
        outputs.append(h_star)
        infos.append(token_info)

    def stacked(key: str, dim: int) -> torch.Tensor:
        return torch.stack([i[key] for i in infos], dim)

    nstep, converged = stacked("nstep", 1), stacked("converged", 1)
    info = {
        "nstep": nstep, "residual": stacked("residual", 1), "converged": converged,
        "max_residual": stacked("max_residual", 0).amax(), "mean_nstep": nstep.float().mean(),
        "converged_fraction": converged.float().mean(), "contraction": stacked("contraction", 0).amax(),
        "nonfinite_iter": stacked("nonfinite_iter", 0).amax(), "sweeps": 0,
        "iterations": sum(i["iterations"] for i in infos), "inj_rms": stacked("inj_rms", 0),
        "ctx_rms": tuple(torch.stack([i["ctx_rms"][k] for i in infos]) for k in range(len(layer.contexts))),
    }
    return torch.stack(outputs, 1), state, info


def default_max_sweeps(length: int, max_iter: int, inner_iter: int) -> int:
    """``T + ceil(max_iter / inner_iter)``: ``T`` sweeps propagate exact contexts through
    the whole sequence, and the last token then gets the token loop's iteration budget."""
    return length + math.ceil(max_iter / inner_iter)
