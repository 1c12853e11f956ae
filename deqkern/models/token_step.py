"""The token loop of :meth:`deqkern.models.charlm.CharLM.generate` on static buffers, so
that a whole token step (embedding, the layer's prelude, one-launch solve and state
update, readout, sampling) can be captured in one CUDA graph and replayed per token.

Every step reads and writes fixed buffers: the token sequence, a device position counter,
the providers' states, the warm start, and per-step logits and solve statistics. The
same :meth:`TokenSteps.step` runs eagerly (CPU, ``step_graph=False``) or is captured: the
first step runs eagerly as the warm-up, the second is captured, and every later one is a
replay. Every step draws a sample; a prompt step keeps the prompt's next token instead
(on the device), so prompt and sampling steps are one graph. Nothing waits on the host until :meth:`TokenSteps.finish`, which reads the
statistics once and applies the layer's ``on_nonconvergence`` policy to all steps
together.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch

from deqkern import _backend
from deqkern.solver.errors import NonFiniteError
from deqkern.solver.loop import Check, enforce

__all__ = ["TokenSteps", "capturable"]


def capturable(model) -> Optional[str]:
    """Why ``model``'s token step cannot be captured in one CUDA graph, or None if it can:
    it needs a CUDA device, the layer's one-launch solve (``solve_cell``: no host sync
    inside; not ``graph=True``, ``fused_backward=False`` or ``backward="unrolled"``) and
    the Triton kernels (the eager solve checks on the host)."""
    deq = model.deq
    opts = deq.solver_options
    device = deq.weight.device
    if device.type != "cuda":
        return f"the model is on {device}, not a CUDA device"
    if opts["graph"]:
        return "the layer replays its own per-solve CUDA graphs (graph=True)"
    if not deq.fused_backward or opts["backward"] == "unrolled":
        return "the layer solves by the GEMM + update loop (fused_backward=False or backward='unrolled')"
    if _backend.select(device, deq.weight.dtype, deq.d_model) == "eager":
        return "the kernels do not run here (DEQKERN_BACKEND, dtype or device): the eager solve"
    return None


@functools.lru_cache(maxsize=None)
def _side_stream(index: int) -> torch.cuda.Stream:
    """One warm-up stream per device (the barrier counters of the one-launch kernels are
    cached per stream: a new stream per call would grow that cache)."""
    return torch.cuda.Stream(index)


class TokenSteps:
    """Static buffers and the step of one :meth:`CharLM.generate` call.

    Buffers (``B`` batch, ``P`` prompt length, ``n`` new tokens, ``L = P + n - 1`` steps,
    ``S`` slots): ``tokens`` int64 ``(B, P + n)`` (the prompt, then the samples),
    ``logits`` ``(B, L, 256)``, ``nstep`` int32 / ``converged`` bool / ``residual``
    float32 ``(L, B, S)``, ``contraction`` float32 ``(L,)``.
    """

    def __init__(self, model, prompt: torch.Tensor, n_tokens: int, temperature: float,
                 generator: Optional[torch.Generator], sample: Callable, capture: bool):
        self.model, self.temperature, self.generator, self.sample = model, temperature, generator, sample
        batch, self.length = prompt.shape
        device, dtype = prompt.device, model.slot_emb.dtype
        steps = self.length + n_tokens - 1
        n_slots = model.cfg.n_slots
        self.tokens = torch.empty((batch, self.length + n_tokens), dtype=torch.long, device=device)
        self.tokens[:, :self.length] = prompt
        self.pos = torch.zeros(1, dtype=torch.long, device=device)        # the step's position t
        self.next_pos = torch.ones(1, dtype=torch.long, device=device)    # t + 1
        self.state = tuple(s.clone() for s in model.deq.init_state(batch, n_slots, device=device, dtype=dtype))
        self.h = torch.zeros((batch, n_slots, model.cfg.d_model), dtype=dtype, device=device)
        self.logits = torch.empty((batch, steps, model.head.out_features), dtype=dtype, device=device)
        self.nstep = torch.empty((steps, batch, n_slots), dtype=torch.int32, device=device)
        self.converged = torch.empty((steps, batch, n_slots), dtype=torch.bool, device=device)
        self.residual = torch.empty((steps, batch, n_slots), dtype=torch.float32, device=device)
        self.contraction = torch.empty(steps, dtype=torch.float32, device=device)
        self.capture = capture
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._warmed = False

    def step(self) -> None:
        """One token step at position ``t = pos``: the layer on token ``t``'s slots (the
        states and warm start from the buffers, written back), its logits and statistics
        stored at ``t``, and token ``t + 1`` drawn from the logits unless the prompt holds it."""
        model, pos, next_pos = self.model, self.pos, self.next_pos
        x = model.emb(self.tokens.index_select(1, pos)) + model.slot_emb            # (B, S, d)
        h0 = self.h if model.cfg.warm_start else None
        h_star, state, info = model.deq(x, self.state, h0=h0)
        logits = model.readout(h_star[:, None])[:, 0]                             # (B, 256)
        self.logits.index_copy_(1, pos, logits[:, None])
        for name in ("nstep", "converged", "residual"):
            getattr(self, name).index_copy_(0, pos, info[name][None])
        self.contraction.index_copy_(0, pos, info["contraction"].float().reshape(1))
        drawn = self.sample(logits, self.temperature, self.generator)[:, None]       # (B, 1)
        self.tokens.index_copy_(1, next_pos, torch.where(next_pos < self.length, self.tokens.index_select(1, next_pos),
                                                         drawn))
        for buffer, new in zip(self.state, state):
            buffer.copy_(new)
        self.h.copy_(h_star)
        pos.add_(1)
        next_pos.add_(1)

    def run(self) -> None:
        """The next step: eager, eager as the warm-up, captured then replayed, or replayed."""
        if self._graph is not None:
            self._graph.replay()
        elif not self.capture:
            self.step()
        elif not self._warmed:
            self._warmed = True
            current = torch.cuda.current_stream(self.tokens.device)
            side = _side_stream(self.tokens.device.index)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.step()
            current.wait_stream(side)
        else:
            self._graph = self._capture()
            self._graph.replay()

    def _capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and self.temperature != 0:
            graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph):
                self.step()
        except RuntimeError as err:
            raise RuntimeError(f"CharLM.generate: capturing the token step in a CUDA graph failed ({err}); "
                               f"generate(..., step_graph=False) runs the steps without capture") from err
        return graph

    def finish(self, policy: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tokens and ``generate``'s stats, after one host read of the statistics: a
        non-finite fixed point raises :class:`~deqkern.solver.errors.NonFiniteError`;
        rows that missed ``tol`` get the layer's ``policy`` (``"warn"``, ``"raise"``,
        ``"ignore"``), once for the whole generation."""
        unconverged = (~self.converged).sum()
        stats = {"logits": self.logits, "mean_nstep": self.nstep.float().mean(), "max_nstep": self.nstep.amax().float(),
                 "unconverged": unconverged.float(), "contraction": self.contraction.amax()}
        finite = torch.isfinite(self.residual)
        bad_rows = (~finite).sum()
        first_bad_step = torch.where(finite.flatten(1).all(1), self.residual.shape[0], torch.arange(
            self.residual.shape[0], device=finite.device)).amin()
        max_residual = self.residual.amax()
        n_unconverged, n_bad, first_bad, largest = torch.stack(
            [unconverged.double(), bad_rows.double(), first_bad_step.double(), max_residual.double()]).tolist()
        opts = self.model.deq.solver_options
        what = "CharLM.generate: the DEQ layer's solves"
        if n_bad:
            raise NonFiniteError(f"{what}: non-finite fixed points in {int(n_bad)} row(s), first at the step for "
                                 f"position {int(first_bad)}", iteration=0, rows=int(n_bad), info=stats)
        check = Check(int(n_unconverged), 0, 0, largest)
        enforce(check, policy, what, self.residual.numel(), opts["max_iter"], opts["tol"], opts["stop_mode"], stats)
        return self.tokens, stats


@contextlib.contextmanager
def deferred_policy(deq):
    """The layer's solves with ``on_nonconvergence="ignore"`` (no host read per token:
    :meth:`TokenSteps.finish` applies the policy once); yields the layer's own policy."""
    opts = deq.solver_options
    policy = opts["on_nonconvergence"]
    opts["on_nonconvergence"] = "ignore"
    try:
        yield policy
    finally:
        opts["on_nonconvergence"] = policy
