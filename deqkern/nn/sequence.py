"""Time-parallel solve of a frozen-context sequence: the fixed points of all tokens at once.

The token loop solves token ``t`` with the frozen term ``frozen_t = frozen_term(inj(x_t),
ctx_t)``, whose contexts come from the providers' states after tokens ``1 .. t-1``. All
tokens' fixed points ``H = (h*_1 .. h*_T)`` are therefore one joint fixed point::

    H = G(H),   G(H)_t = cell(h_t, frozen_t(H_{<t})),   cell(h, f) = (1-b) h + b g RMSNorm(h W^T + f)

whose Jacobian is block lower triangular in time: the cell's own (row by row) on the
diagonal, the contexts' strictly below it.

Forward (:func:`solve_sequence`): sweeps over time. A *joint check* forms every token's
context from the current iterates (the providers' ``prelude_sequence``: a scan, attention
batched over ``t``), the frozen term of all tokens, and applies the cell once to all
``B * T * S`` rows (rows are independent given the frozen term). That application is
one step of ``G`` itself: its per-row residual is the *joint residual*, the token loop's
own test (``||cell(h_t, frozen_t) - h_t||`` in the layer's ``stop_mode``, below its
``tol``) applied to every token at once. The solve stops when every row passes it (one
host sync reads the count), returning that step's output, as the solver returns the
iterate whose step passed.

Between checks, ``colors = 1`` runs Jacobi sweeps: ``inner_iter - 1`` more applications
with the check's frozen term. ``colors = p > 1`` runs Gauss-Seidel over time in ``p``
colors: a sweep visits the tokens ``c, c + p, c + 2p, ...`` for ``c = 0 .. p-1`` in turn,
forming only their contexts (``prelude_sequence(h, state, tokens)``) from the latest
iterates and applying the cell ``inner_iter`` times to their rows. A context that reaches
one token back (the slot attention) then carries news ``p`` tokens forward per sweep
instead of one, for the same work; the joint check runs once a sweep's own first
residuals all pass. Measured on the CPU preset after 120 training steps: 24 Jacobi
sweeps, 13 with two colors, 8 with four. With exact inner solves ``T`` sweeps are exact;
with weak coupling a handful suffice, independent of ``T``.

Backward (the exact implicit gradient of the joint fixed point): one application of
``G`` at ``H*`` is recorded with autograd (contexts, injection, one cell step per row),
one piece per color, and the adjoint ``g = v + (dG/dH)^T g`` is solved by the same
sweeps (:class:`_SequenceAdjoint`): colors last to first, each color's
``r = v + (dG/dH)^T g - g`` from the latest ``g`` (the cross-token part included), then
``g <- g + d`` with ``d = r + J_cell^T d`` iterated ``inner_iter - 1`` times from
``d = r`` (VJPs of a recorded application of the cell alone). ``v`` is divided by its
largest magnitude first (the problem is linear), so the stopping test is relative to the
gradient's size in every ``stop_mode``: scaling the loss by 1e-3 or 1e3 changes neither
the sweeps nor the result's relative accuracy. The gradient then goes through the
recorded application once, to the parameters, the inputs and the initial state. No graph
through the sweeps: memory is the contexts' activations at ``H*`` plus a few
``(B, T, S, d)`` buffers per color.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from deqkern._validation import positive_float, positive_int
from deqkern.nn.context import updated_states
from deqkern.ops.residual import row_residual
from deqkern.solver.adjoint import Equilibrium
from deqkern.solver.loop import Check, enforce, raise_if_nonfinite

__all__ = ["SweepOptions", "forward_sequence", "solve_sequence", "token_loop", "DEFAULT_INNER_ITER", "DEFAULT_COLORS"]

#: Cell applications per token and sweep, and colors per sweep (module docstring).
#: Measured on the CPU preset (forward + backward of one batch; bench/bench_model.py
#: --colors / --inner-iter compares them in training): after 10 training steps the cells'
#: own convergence sets the count (8 Jacobi sweeps with 2 applications) and colors only
#: add per-color work (4 colors x 3: +10% time); after 120 steps the coupling sets it (24
#: Jacobi sweeps) and 4 x 3 takes 0.47-0.59 of Jacobi's time (2 x 3: 0.60, 8 x 3: 0.63).
#: Each color costs its own launches (about 30 per color and sweep): where the host, not
#: the GPU, sets the pace, fewer colors may win -- measure.
DEFAULT_INNER_ITER = 3
DEFAULT_COLORS = 4


@dataclass(frozen=True)
class SweepOptions:
    """Validated arguments of one sequence solve (:meth:`FrozenContextDEQ.forward_sequence`)."""

    max_sweeps: int
    inner_iter: int
    colors: int
    tol: float
    b_tol: float
    stop_mode: str
    on_nonconvergence: str
    backward: str


def _contexts(layer, h: torch.Tensor, state: tuple, tokens: slice = slice(None),
              validate: bool = False) -> list[torch.Tensor]:
    """Every provider's ``prelude_sequence`` at the iterates ``h`` ``(B, T, S, d)``, for
    the tokens ``range(T)[tokens]``."""
    contexts = []
    count = len(range(h.shape[1])[tokens])
    for i, (provider, st) in enumerate(zip(layer.contexts, state)):
        ctx = provider.prelude_sequence(h, st, tokens)
        if validate and (ctx.dim() != 4 or ctx.shape[:2] != (h.shape[0], count) or ctx.shape[2] not in (1, h.shape[2])
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
    """The forward sweeps from ``H = 0`` (module docstring): each sweep is a joint check
    (followed, with one color, by ``inner_iter - 1`` more applications) or, with several,
    a colored sweep. Returns ``H*``, info, and the contexts of the last joint check."""
    h = torch.zeros_like(inj)
    phases = _phases(inj.shape[1], opts.colors)
    contraction = torch.zeros((), device=inj.device)
    iterations = 0
    check_next = len(phases) == 1
    for sweep in range(1, opts.max_sweeps + 1):
        if check_next or sweep == opts.max_sweeps:
            contexts = _contexts(layer, h, state, validate=sweep == 1)
            frozen = _frozen(layer, inj, contexts)
            h, residual = layer._cell(h, frozen)
            iterations += 1
            check = _check(residual, opts.tol, iterations)
            raise_if_nonfinite(check, f"FrozenContextDEQ.forward_sequence (sweep {sweep})")
            if check.unconverged == 0 or sweep == opts.max_sweeps:
                break
            if len(phases) == 1:
                h, estimate = _apply(layer, h, frozen, residual, opts.inner_iter - 1, opts.tol)
                contraction = torch.where(estimate >= 0, estimate, contraction)
                iterations += opts.inner_iter - 1
            check_next = len(phases) == 1
            continue
        phase_residual = torch.empty_like(h[..., 0], dtype=torch.float32)
        sweep_estimate = torch.full((), -1.0, device=inj.device)
        for tokens in phases:
            contexts = _contexts(layer, h, state, tokens, validate=sweep == 1)
            frozen = _frozen(layer, inj[:, tokens], contexts)
            part, residual = layer._cell(h[:, tokens].contiguous(), frozen)
            h[:, tokens], estimate = _apply(layer, part, frozen, residual, opts.inner_iter - 1, opts.tol)
            phase_residual[:, tokens] = residual
            sweep_estimate = torch.maximum(sweep_estimate, estimate)
        contraction = torch.where(sweep_estimate >= 0, sweep_estimate, contraction)
        iterations += opts.inner_iter
        check = _check(phase_residual, opts.tol, iterations)
        raise_if_nonfinite(check, f"FrozenContextDEQ.forward_sequence (sweep {sweep})")
        check_next = check.unconverged == 0
    info = _summary(residual, opts.tol, iterations, sweep, check)
    info.update(nstep=torch.full_like(residual, iterations, dtype=torch.int32),
                mean_nstep=torch.tensor(float(iterations), device=inj.device), contraction=contraction)
    enforce(check, opts.on_nonconvergence, f"FrozenContextDEQ.forward_sequence ({sweep} sweeps)",
            residual.numel(), iterations, opts.tol, opts.stop_mode, info)
    return h, info, contexts


def _apply(layer, h: torch.Tensor, frozen: torch.Tensor, residual: torch.Tensor, count: int, tol: float):
    """``count`` more cell applications with ``frozen`` fixed, after one whose residual was
    ``residual``. Also returns the cell's local contraction (device-side, no sync): the
    second residual over the first, largest over the rows still above ``tol``; -1 when no
    row is, or ``count`` is 0."""
    estimate = torch.full((), -1.0, device=h.device)
    for inner in range(count):
        h, inner_residual = layer._cell(h, frozen)
        if inner == 0:
            active = residual >= tol
            ratio = torch.where(active, inner_residual / residual, 0.0).amax()
            estimate = torch.where(active.any(), ratio, estimate)
    return h, estimate


def _phases(length: int, colors: int) -> list[slice]:
    """The tokens of each color: ``t = c, c + colors, ...`` (at most ``length`` colors)."""
    colors = min(colors, length)
    return [slice(color, None, colors) for color in range(colors)]


def _interleave(parts: list[torch.Tensor], phases: list[slice], length: int) -> torch.Tensor:
    """The per-color ``parts`` ``(B, n_c, ...)`` put back in token order ``(B, T, ...)``
    (differentiable)."""
    if len(parts) == 1:
        return parts[0]
    order = torch.cat([torch.arange(length, device=parts[0].device)[tokens] for tokens in phases])
    return torch.cat(parts, 1)[:, torch.argsort(order)]


class _SequenceAdjoint:
    """Solves ``g = v + (dG/dH)^T g`` by adjoint sweeps (module docstring) through the
    applications recorded at ``h_in = H*``, one per color: ``outs[c] = G(h_in)`` on the
    tokens of color ``c`` (contexts included), and ``cells[c]``, the cell alone on them
    with the frozen term detached, from its own leaf ``leaves[c]`` (``J_cell^T`` for the
    inner iterations: one update backward and one GEMM each; the fused
    :class:`~deqkern.nn.cell_adjoint` would re-form ``h* W^T`` for every new right-hand
    side, a GEMM more per sweep).

    ``(dG/dH)^T g = sum_c VJP(outs[c], g_c)``; the sum is kept (``total``) with each
    color's term, and a color's term is recomputed once its ``g_c`` changed (cost: that
    color's share of one VJP through the whole application). Colors are visited last to
    first (the adjoint carries information backwards in time), each against the latest
    ``g`` of the others; after a sweep the terms are consistent, so the joint adjoint
    residual ``v + total - g`` of every token is exact and free."""

    def __init__(self, h_in: torch.Tensor, outs: list[torch.Tensor], leaves: list[torch.Tensor],
                 cells: list[torch.Tensor], phases: list[slice], opts: SweepOptions, info: dict):
        self.h_in, self.outs, self.leaves, self.cells = h_in, outs, leaves, cells
        self.phases, self.opts, self.info = phases, opts, info

    @staticmethod
    def _vjp(out: torch.Tensor, leaf: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        (vjp,) = torch.autograd.grad(out, leaf, g.to(out.dtype), retain_graph=True)
        return vjp.to(g.dtype)

    def solve(self, grad: torch.Tensor) -> torch.Tensor:
        opts = self.opts
        v = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        scale = v.abs().amax().clamp_min(torch.finfo(v.dtype).tiny)
        v = v / scale
        g, total = torch.zeros_like(v), torch.zeros_like(v)
        terms: list = [None] * len(self.phases)
        iterations = 0
        for sweep in range(1, opts.max_sweeps + 1):
            for color in reversed(range(len(self.phases))):
                tokens = self.phases[color]
                r = v[:, tokens] + total[:, tokens] - g[:, tokens]
                correction = r  # d = r + J_cell^T d, from d = r
                for _ in range(opts.inner_iter - 1):
                    correction = r + self._vjp(self.cells[color], self.leaves[color], correction)
                g[:, tokens] += correction
                term = self._vjp(self.outs[color], self.h_in, g[:, tokens])
                total = total + term - (terms[color] if terms[color] is not None else 0)
                terms[color] = term
            iterations += opts.inner_iter
            r = v + total - g
            residual = row_residual(g + r, g, opts.stop_mode)
            check = _check(residual, opts.b_tol, iterations)
            raise_if_nonfinite(check, f"FrozenContextDEQ.forward_sequence backward (adjoint sweep {sweep})")
            if check.unconverged == 0 or sweep == opts.max_sweeps:
                g = g + r
                break
        stats = _summary(residual, opts.b_tol, iterations, sweep, check)
        self.info.update({f"b_{name}": value for name, value in stats.items()})
        enforce(check, opts.on_nonconvergence, f"FrozenContextDEQ.forward_sequence backward ({sweep} adjoint sweeps)",
                residual.numel(), iterations, opts.b_tol, opts.stop_mode, self.info)
        return (g * scale).to(grad.dtype)


def forward_sequence(layer, x: torch.Tensor, state, *, time_parallel: bool, warm_start: bool,
                     max_sweeps: Optional[int], inner_iter: Optional[int], colors: Optional[int],
                     tol: Optional[float], b_tol: Optional[float]):
    """:meth:`FrozenContextDEQ.forward_sequence` (documented there): validates its
    arguments (metadata only) and runs :func:`token_loop` or :func:`solve_sequence`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] < 1 or x.shape[-1] != layer.d_input:
        raise ValueError(f"x must have shape (B, T, S, {layer.d_input}) with T >= 1; got {tuple(x.shape)}")
    for name, flag in (("time_parallel", time_parallel), ("warm_start", warm_start)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    batch, length, n_slots, _ = x.shape
    state = layer.init_state(batch, n_slots, x.device) if state is None else state
    if not isinstance(state, (tuple, list)) or len(state) != len(layer.contexts):
        got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"state must be a tuple of {len(layer.contexts)} provider states; got {got}")
    if not time_parallel:
        return token_loop(layer, x, tuple(state), warm_start)
    opts = layer.solver_options
    if opts["graph"]:
        raise ValueError("graph=True replays per-token solves from CUDA graphs; the time-parallel sweeps "
                         "are not captured: call forward_sequence(time_parallel=False) on this layer")
    if opts["backward"] == "unrolled" and torch.is_grad_enabled():
        raise ValueError("backward='unrolled' differentiates through every iteration of a token's solve; "
                         "use time_parallel=False for it ('ift' and 'onestep' run time-parallel)")
    inner_iter = positive_int("inner_iter", DEFAULT_INNER_ITER if inner_iter is None else inner_iter)
    colors = positive_int("colors", DEFAULT_COLORS if colors is None else colors)
    max_sweeps = positive_int("max_sweeps", default_max_sweeps(length, opts["max_iter"], inner_iter)
                               if max_sweeps is None else max_sweeps)
    tol = opts["tol"] if tol is None else tol
    b_tol = tol if b_tol is None else b_tol
    sweep = SweepOptions(max_sweeps, inner_iter, colors, positive_float("tol", tol), positive_float("b_tol", b_tol),
                         opts["stop_mode"], opts["on_nonconvergence"], opts["backward"])
    return solve_sequence(layer, x, tuple(state), sweep)


@torch.compiler.disable(reason="FrozenContextDEQ.forward_sequence: each sweep's stopping test syncs with the host")
def solve_sequence(layer, x: torch.Tensor, state: tuple, opts: SweepOptions):
    """:meth:`FrozenContextDEQ.forward_sequence` with ``time_parallel=True`` (arguments
    validated there): ``x`` ``(B, T, S, d_input)`` -> ``(h_star, state, info)``."""
    inj = layer.inj(x)
    h_star, info, contexts = _sweep(layer, inj.detach(), state, opts)
    info["inj_rms"] = _token_rms(inj)
    info["ctx_rms"] = tuple(_token_rms(ctx) for ctx in contexts)
    if torch.is_grad_enabled():
        ift = opts.backward == "ift"
        phases = _phases(x.shape[1], opts.colors if ift else 1)
        h_in = h_star.clone().requires_grad_(ift)
        outs, leaves, cells = [], [], []
        for tokens in phases:
            frozen = _frozen(layer, inj[:, tokens], _contexts(layer, h_in, state, tokens))
            outs.append(layer._cell(h_in[:, tokens], frozen)[0])
            if ift and opts.inner_iter > 1:
                leaves.append(h_star[:, tokens].clone().requires_grad_())
                cells.append(layer._cell(leaves[-1], frozen.detach())[0])
        out = _interleave(outs, phases, x.shape[1])
        if out.requires_grad:
            adjoint = _SequenceAdjoint(h_in, outs, leaves, cells, phases, opts, info) if ift else None
            h_star = Equilibrium.apply(out, [h_star], adjoint)
    return h_star, updated_states(layer.contexts, h_star, state, "update_sequence"), info


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
