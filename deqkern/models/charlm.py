"""The reference model: a byte-level language model built on one frozen-context DEQ layer.

Per token ``t`` of a sequence::

    x_t      = emb(token_t)[:, None, :] + slot_emb                  # (B, S, d): one input per slot
    h*_t     = fixed point of h <- (1-a) h + a * gain * RMSNorm(h W^T + inj(x_t) + ctx_t), B*S rows
               ctx_t = MambaMemory(M_{t-1}) + SlotAttention(H_{t-1});  M_t from mean_slots(h*_t), H_t = h*_t
    logits_t = head(RMSNorm(mean over slots of h*_t))                 # predicts token t+1

Time-parallel (the default): all ``T`` tokens' fixed points are solved at once by
:meth:`FrozenContextDEQ.forward_sequence` (sweeps over time: the tokens' contexts from the
current iterates, then the cell on their rows, all tokens or one color of them at a time;
the implicit backward by adjoint sweeps). ``CharLMConfig.token_loop`` (``python -m deqkern --token-loop``) runs
the same model token by token instead (one solve of ``B*S`` rows per token), as does
``graph=True`` (each token's solve replayed from CUDA graphs). Both give the same fixed
points and gradients to the solver's tolerance.

Generation (:meth:`CharLM.generate`, ``python -m deqkern generate``) runs the token
loop one token at a time: each token's solve is one call of the layer on that token's
slots, with the providers' states and the warm start carried from the previous token, so
a prompt's logits are the token loop's.

Warm start (token loop): each token's solve starts from the previous token's fixed point (detached;
the fixed point does not depend on its starting point, so no gradient is lost). On the
``small`` config it needs ~12% fewer Picard iterations than starting from zeros (7.2
against 8.2 per token, same losses; ``CharLMConfig.warm_start``).

Convergence: the layer RMS-normalises its frozen term (``FrozenContextDEQ(injection_norm=
True)``, the default), which makes the cell contract whatever the embeddings' scale
(``info["lipschitz_bound"]``, ~0.5). Before that the model had to start its embeddings at
std 3 so that the injection dominated ``h W^T`` (``embed_std``; kept as the default so
losses stay comparable with earlier runs).

Training data needs no download: the source text of a fixed list of Python
standard-library modules (``STDLIB_MODULES``), read through ``inspect.getsourcefile``
and concatenated in that order. Batches are random windows of it, drawn by a seeded
``torch.Generator``: the same seed and the same Python installation give the same
batches.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
import math
from typing import Callable, Optional

import torch
from torch import nn

from deqkern.nn import FrozenContextDEQ, MambaMemory, SlotAttentionContext
from deqkern.ops.launch import compute_dtype
from deqkern.models import token_step

__all__ = ["CharLMConfig", "CharLM", "PRESETS", "STDLIB_MODULES", "corpus", "batches", "Batches"]

VOCAB = 256

#: Modules whose source text is the training corpus (~0.7 MB of Python), in this order.
STDLIB_MODULES = (
    "textwrap", "string", "functools", "heapq", "bisect", "argparse", "dataclasses", "inspect",
    "json.decoder", "collections", "enum", "fractions", "difflib", "shlex", "tokenize", "pprint",
    "statistics",
)


@dataclass(frozen=True)
class CharLMConfig:
    """Model size, solver settings and training hyper-parameters of the reference model.

    Presets: :meth:`tiny` (tests), :meth:`small` (CPU, ``python -m deqkern`` in about a
    minute on two cores), :meth:`gpu` (batch 32, 8 slots, d_model 512, seq 256).
    """

    d_model: int = 64
    n_slots: int = 4
    n_heads: int = 2
    seq_len: int = 64
    batch: int = 16
    lr: float = 3e-3
    steps: int = 120
    damping: float = 0.85
    max_iter: int = 20
    tol: float = 1e-4
    stop_mode: str = "rel"
    spectral_target: float = 0.85
    spectral_every: int = 4
    warm_start: bool = True
    embed_std: float = 3.0
    grad_clip: float = 1.0
    graph: bool = False  # token loop, each solve and adjoint replayed from CUDA graphs (FrozenContextDEQ(graph=True))
    token_loop: bool = False  # solve token by token instead of all tokens at once (time-parallel sweeps)
    inner_iter: Optional[int] = None  # time-parallel: cell applications per token and sweep (None: the default)
    colors: Optional[int] = None  # time-parallel: 1 Jacobi sweeps, p Gauss-Seidel over p colors (None: the default)
    # time-parallel: the adjoint's tolerance, relative to the gradient's largest entry (None: tol). 1e-2 kept every
    # parameter gradient within 2e-4 (relative) of the 1e-4 solution on the small preset, with half the adjoint
    # sweeps. (The token loop's adjoint keeps the layer's default, b_tol = tol, per row.)
    b_tol: Optional[float] = 1e-2

    def __post_init__(self) -> None:
        for name in ("d_model", "n_slots", "n_heads", "seq_len", "batch", "steps", "max_iter", "spectral_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model={self.d_model}; got n_heads={self.n_heads}")
        if self.b_tol is not None and not self.b_tol > 0:
            raise ValueError(f"b_tol must be None or > 0; got {self.b_tol!r}")
        for name in ("inner_iter", "colors"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1; got {value!r}")
        for name in ("lr", "tol", "spectral_target", "grad_clip", "embed_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1]; got {self.damping!r}")

    @classmethod
    def tiny(cls) -> "CharLMConfig":
        """For tests: a few seconds for a few dozen steps on a CPU."""
        return cls(d_model=32, n_slots=2, n_heads=2, seq_len=16, batch=4, lr=5e-3, steps=40)

    @classmethod
    def small(cls) -> "CharLMConfig":
        """CPU default of ``python -m deqkern``: about a minute on two cores, eager."""
        return cls()

    @classmethod
    def gpu(cls) -> "CharLMConfig":
        """The GPU benchmark size."""
        return cls(d_model=512, n_slots=8, n_heads=8, seq_len=256, batch=32, lr=1e-3, steps=50)


PRESETS: dict[str, Callable[[], CharLMConfig]] = {
    "tiny": CharLMConfig.tiny, "small": CharLMConfig.small, "gpu": CharLMConfig.gpu,
}


# --------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def corpus() -> torch.Tensor:
    """The training text: uint8 ``(n_bytes,)``, the sources of :data:`STDLIB_MODULES`."""
    parts = []
    for name in STDLIB_MODULES:
        path = inspect.getsourcefile(importlib.import_module(name))
        with open(path, "rb") as source:
            parts.append(source.read())
    return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)


class Batches:
    """Endless random windows of :func:`corpus`: each ``next()`` is int64
    ``(batch, seq_len + 1)`` on the CPU; column ``t + 1`` is the target of column ``t``.

    Deterministic given ``seed``. :meth:`state_dict` / :meth:`load_state_dict` save and
    restore the data position (the generator's state), so a resumed run draws the same
    batches as one that never stopped.
    """

    def __init__(self, cfg: CharLMConfig, seed: int):
        self.text = corpus()
        if self.text.numel() < cfg.seq_len + 2:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than the corpus ({self.text.numel()} bytes)")
        self.batch, self.seq_len = cfg.batch, cfg.seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(cfg.seq_len + 1)
        self.drawn = 0

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, self.text.numel() - self.seq_len - 1, (self.batch, 1), generator=self.generator)
        self.drawn += 1
        return self.text[starts + self.window].long()

    def state_dict(self) -> dict:
        """``{"generator": uint8 tensor, "drawn": batches drawn so far}``."""
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def batches(cfg: CharLMConfig, seed: int) -> Batches:
    """The training stream of ``cfg`` drawn with ``seed`` (:class:`Batches`)."""
    return Batches(cfg, seed)


# --------------------------------------------------------------------------- model
class CharLM(nn.Module):
    """Byte-level LM: one :class:`FrozenContextDEQ` solved over the sequence (module docstring).

    ``forward(tokens)``: ``tokens`` int64 ``(B, T)`` of byte values; returns ``logits``
    ``(B, T, 256)`` (position ``t`` predicts token ``t + 1``) and ``stats``, 0-d device
    tensors over all ``B * T * n_slots`` rows (no host sync beyond the solver's):
    ``mean_nstep``, ``max_nstep`` (cell iterations per row: per token in the token loop,
    batched over all tokens time-parallel), ``unconverged`` (rows, of ``B * T * n_slots``,
    that missed ``tol``), ``contraction`` (max), ``hist_inj_ratio`` (mean over tokens of the
    memory context's RMS over the injection's RMS), ``sweeps`` (0 in the token loop).
    """

    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.emb = nn.Embedding(VOCAB, d)
        nn.init.normal_(self.emb.weight, std=cfg.embed_std)
        self.slot_emb = nn.Parameter(0.5 * cfg.embed_std * torch.randn(cfg.n_slots, d))
        self.deq = FrozenContextDEQ(
            d, contexts=[MambaMemory(d), SlotAttentionContext(d, n_heads=cfg.n_heads)],
            damping=cfg.damping, max_iter=cfg.max_iter, tol=cfg.tol, stop_mode=cfg.stop_mode,
            spectral_target=cfg.spectral_target, graph=cfg.graph,
        )
        self.readout_norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h_star, info = self.solve(tokens)
        stats = {
            "mean_nstep": info["mean_nstep"].float(),
            "max_nstep": info["nstep"].max().float(),
            "unconverged": (~info["converged"]).sum().float(),
            "contraction": info["contraction"].float(),
            "hist_inj_ratio": (info["ctx_rms"][0] / info["inj_rms"]).mean(),
            "sweeps": torch.full((), float(info["sweeps"]), device=tokens.device),
        }
        return self.readout(h_star), stats

    def solve(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The DEQ layer's fixed points for ``tokens`` ``(B, T)``: ``h_star`` ``(B, T, S, d)``
        and the layer's ``info`` (:meth:`FrozenContextDEQ.forward_sequence`; after a
        time-parallel backward it also holds the adjoint's ``b_*`` figures)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor of shape (B, T); got {got}")
        state = self.deq.init_state(tokens.shape[0], self.cfg.n_slots, device=tokens.device, dtype=self.slot_emb.dtype)
        inputs = self.emb(tokens)[:, :, None, :] + self.slot_emb     # (B, T, S, d)
        time_parallel = not (self.cfg.token_loop or self.cfg.graph)
        h_star, _, info = self.deq.forward_sequence(inputs, state, time_parallel=time_parallel,
                                                    warm_start=self.cfg.warm_start, inner_iter=self.cfg.inner_iter,
                                                    colors=self.cfg.colors, b_tol=self.cfg.b_tol)
        return h_star, info

    def readout(self, h_star: torch.Tensor) -> torch.Tensor:
        """``(B, T, S, d)`` fixed points -> ``(B, T, 256)`` logits."""
        return self.head(self.readout_norm(h_star.mean(2)))

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, n_tokens: int, *, temperature: float = 1.0,
        generator: Optional[torch.Generator] = None, on_step: Optional[Callable[[int], None]] = None,
        step_graph: Optional[bool] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sample ``n_tokens`` bytes after ``prompt``, one token at a time, without gradients.

        Every position, prompt included, is one step of the token loop: one call of the
        DEQ layer on the token's ``S`` slots (the providers' states carried from the
        previous token, the solve warm-started from its ``h*`` when ``cfg.warm_start``),
        then the readout; from the prompt's last position on, the next token is sampled
        from the logits. So the prompt's logits are :meth:`forward`'s with
        ``CharLMConfig(token_loop=True)``. The steps run on static buffers
        (:mod:`deqkern.models.token_step`); with ``step_graph`` each whole step is
        replayed from a CUDA graph (one graph launch per token). Nothing waits on the
        host between tokens: the layer's ``on_nonconvergence`` policy is applied once,
        after the last token, to the rows of every step that missed ``tol`` (a
        non-finite fixed point raises :class:`~deqkern.solver.errors.NonFiniteError`
        then, whatever the policy).

        Args:
            prompt: int64 ``(B, P)``, ``P >= 1``, byte values, on the model's device.
            n_tokens: bytes to sample after the prompt, ``>= 1``.
            temperature: ``>= 0``: sample from ``softmax(logits / temperature)``; 0: greedy
                (the argmax).
            generator: the sampling's random source (a ``torch.Generator`` on the model's
                device; None: the global one). The same seed gives the same tokens.
            on_step: called as ``on_step(position)`` after each step (positions ``0 ..
                P + n_tokens - 2``; the step at position ``t`` yields the logits of token
                ``t + 1``, and samples it when ``t >= P - 1``), e.g. to synchronize and time
                every token. Nothing else waits on the host.
            step_graph: replay each token step from a CUDA graph. None (default): where
                it can (:func:`~deqkern.models.token_step.capturable`: a CUDA device, the
                layer's one-launch solve, not ``cfg.graph``); True: required (ValueError
                saying why not); False: run the steps without capture.

        Returns:
            ``tokens`` int64 ``(B, P + n_tokens)``: the prompt, then the sampled bytes;
            ``stats``: ``logits`` ``(B, P + n_tokens - 1, 256)`` (position ``t`` predicts
            token ``t + 1``), and 0-d device tensors over every step's ``B * S`` rows:
            ``mean_nstep``, ``max_nstep`` (cell iterations per row), ``unconverged``
            (rows that missed ``tol``), ``contraction`` (max).
        """
        self._check_generate_args(prompt, n_tokens, temperature, generator)
        if step_graph is not None and not isinstance(step_graph, bool):
            raise TypeError(f"step_graph must be a bool or None; got {type(step_graph).__name__}")
        why_not = token_step.capturable(self)
        if step_graph and why_not:
            raise ValueError(f"step_graph=True: the token step cannot be captured in a CUDA graph: {why_not}")
        graph = why_not is None if step_graph is None else step_graph
        steps = token_step.TokenSteps(self, prompt, n_tokens, float(temperature), generator, _sample, graph)
        with token_step.deferred_policy(self.deq) as policy:
            for position in range(prompt.shape[1] + n_tokens - 1):
                steps.run()
                if on_step is not None:
                    on_step(position)
        return steps.finish(policy)

    def _check_generate_args(self, prompt: object, n_tokens: object, temperature: object, generator: object) -> None:
        """:meth:`generate`'s arguments (metadata, and the prompt's values in one read)."""
        device = self.slot_emb.device
        if (not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long
                or prompt.shape[0] < 1 or prompt.shape[1] < 1):
            got = (f"{prompt.dtype} of shape {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor)
                   else type(prompt).__name__)
            raise ValueError(f"prompt must be an int64 tensor of shape (B, P) with B, P >= 1; got {got}")
        if prompt.device != device:
            raise ValueError(f"prompt must be on the model's device {device}; got {prompt.device}")
        low, high = torch.stack(prompt.aminmax()).tolist()
        if low < 0 or high >= VOCAB:
            raise ValueError(f"prompt must hold byte values in [0, {VOCAB}); got values in [{low}, {high}]")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be an int >= 1; got {n_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature < 0):
            raise ValueError(f"temperature must be a finite float >= 0 (0: greedy); got {temperature!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise ValueError(f"generator must be on the model's device type {device.type!r}; "
                                 f"got {generator.device}")


def _sample(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next tokens int64 ``(B,)`` from ``logits`` ``(B, V)``: the argmax at temperature 0,
    else a draw from ``softmax(logits / temperature)`` by the exponential race
    (``argmax p_i / E_i`` with ``E_i ~ Exp(1)`` picks ``i`` with probability ``p_i``),
    which, unlike ``torch.multinomial``, never waits on the host. Computed in float32
    (float64 for float64 logits) from ``logits - max``: a tiny temperature gives the
    argmax, never ``inf / inf``."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.to(compute_dtype(logits))
    probs = ((scaled - scaled.amax(-1, keepdim=True)) / temperature).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)
