"""Sampling from the reference model as the ``generate`` command runs it: a model from a
training checkpoint (:func:`load_model`), and :meth:`CharLM.generate` timed token by
token (:func:`timed_generate`; also used by ``bench/bench_generate.py``)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch

from deqkern.models import checkpoint
from deqkern.models.charlm import CharLM, CharLMConfig

__all__ = ["GENERATE_WARMUP", "load_model", "timed_generate", "to_text"]

#: Tokens left out of the latency median (the first carry one-time costs: allocations,
#: kernel compilation, CUDA-graph capture).
GENERATE_WARMUP = 3
#: Control characters other than tab and newline, shown as U+FFFD by :func:`to_text` (a
#: sampled escape sequence must not drive the terminal).
_CONTROL = {code: "\ufffd" for code in (*range(9), *range(11, 32), 127)}


def load_model(path: "str | os.PathLike", device: torch.device, graph: bool = False) -> tuple[CharLM, int]:
    """The model of the training checkpoint at ``path`` (:func:`deqkern.models.checkpoint.read`:
    its configuration, parameters and dtype; the optimizer state is not used) on ``device``,
    with ``cfg.graph = graph``; and the step it was saved at. Raises
    :class:`~deqkern.models.checkpoint.CheckpointError` for a file it cannot build a model from."""
    payload = checkpoint.read(path)
    dtype = getattr(torch, str(payload["dtype"]), None)
    try:
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {payload['dtype']!r}")
        cfg = CharLMConfig(**{**payload["config"], "graph": graph})
        model = CharLM(cfg).to(device=device, dtype=dtype)
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r}: cannot build the model from it: {err}") from err
    return model, int(payload["step"])


def timed_generate(
    model: CharLM, prompt: torch.Tensor, n_tokens: int, *, temperature: float, generator: Optional[torch.Generator],
    warmup: int = GENERATE_WARMUP, step_graph: Optional[bool] = None,
) -> tuple[torch.Tensor, dict, dict]:
    """:meth:`CharLM.generate` (``step_graph`` passed on) with the device synchronized
    after every token (so each token's time is its true latency). Returns its tokens and stats, and ``timing``:
    ``latency_ms`` (median over the steps after the first ``warmup``; all steps if there
    are no more), ``seconds`` (the steps that sampled the ``n_tokens`` new tokens),
    ``tokens_per_s`` (``B * n_tokens / seconds``), ``steps`` and ``warmup`` (steps run,
    steps left out of the median)."""
    device = prompt.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    stamps = []

    def on_step(position: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    sync()
    stamps.append(time.perf_counter())
    tokens, stats = model.generate(prompt, n_tokens, temperature=temperature, generator=generator, on_step=on_step,
                                   step_graph=step_graph)
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    skipped = warmup if len(durations) > warmup else 0
    seconds = sum(durations[prompt.shape[1] - 1:])
    timing = {"latency_ms": 1e3 * statistics.median(durations[skipped:]), "seconds": seconds,
              "tokens_per_s": prompt.shape[0] * n_tokens / seconds, "steps": len(durations), "warmup": skipped}
    return tokens, stats, timing


def to_text(tokens: torch.Tensor) -> str:
    """Printable text of a byte sequence ``tokens`` int64 ``(n,)``: UTF-8 with invalid
    bytes as U+FFFD (``errors="replace"``), and control characters other than tab and
    newline as U+FFFD too."""
    return bytes(tokens.tolist()).decode("utf-8", errors="replace").translate(_CONTROL)
