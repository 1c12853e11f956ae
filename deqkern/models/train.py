"""Training loop of the reference model (:class:`deqkern.models.charlm.CharLM`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from deqkern.models.charlm import VOCAB, CharLM, CharLMConfig, batches

__all__ = ["train", "TrainResult"]


@dataclass
class TrainResult:
    """What :func:`train` measured. ``logs``: one dict per logging interval (keys in
    :func:`train`); ``losses``: every step's training loss."""

    model: CharLM
    losses: list[float]
    logs: list[dict]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Throughput after the first logging interval (which holds warm-up and compilation)."""
        steady = self.logs[1:] or self.logs
        return sum(log["tokens"] for log in steady) / sum(log["seconds"] for log in steady)


def train(
    cfg: CharLMConfig,
    *,
    steps: Optional[int] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    log_every: int = 10,
    on_log: Optional[Callable[[dict], None]] = None,
    progress: bool = False,
    max_seconds: Optional[float] = None,
) -> TrainResult:
    """Train a fresh :class:`CharLM` (initialized from ``seed``) for ``steps`` steps.

    AdamW, gradient clipping at ``cfg.grad_clip``, and the layer's
    :class:`deqkern.SpectralNormSchedule` (``every=cfg.spectral_every``) attached to the
    optimizer. Device values are read back once per logging interval, in one transfer.
    ``max_seconds``: stop at the end of the logging interval in which training has run
    this long (``TrainResult.losses`` then holds fewer than ``steps`` entries).

    Each log dict (also passed to ``on_log``): ``step``, ``loss`` (mean over the
    interval), ``tokens``, ``seconds``, ``tokens_per_s``, ``mean_nstep``,
    ``max_nstep``, ``converged_fraction``, ``unconverged``, ``contraction`` (max over
    the interval), ``hist_inj_ratio`` (mean), ``sweeps`` (mean per step; 0 for the token
    loop), ``sigma_max`` (largest spectral-norm
    estimate of the scheduled weights, taken at the latest renormalization).
    """
    from tqdm.auto import tqdm

    steps = cfg.steps if steps is None else steps
    if steps < 1 or log_every < 1:
        raise ValueError(f"steps and log_every must be >= 1; got steps={steps}, log_every={log_every}")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = CharLM(cfg).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = model.deq.spectral_schedule(every=cfg.spectral_every)
    schedule.attach(optimizer)
    data = batches(cfg, seed)

    losses = torch.zeros(steps, device=device)
    sums = torch.zeros(4, device=device)          # mean_nstep, hist_inj_ratio, unconverged, sweeps
    maxima = torch.zeros(2, device=device)        # max_nstep, contraction
    logs: list[dict] = []
    tokens_per_step = cfg.batch * cfg.seq_len
    rows_per_step = tokens_per_step * cfg.n_slots
    start = interval_start = time.perf_counter()
    first = 0
    bar = tqdm(range(steps), disable=not progress, unit="step", dynamic_ncols=True)
    for step in bar:
        batch = next(data).to(device, non_blocking=True)
        logits, stats = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        losses[step] = loss.detach()
        sums += torch.stack([stats["mean_nstep"], stats["hist_inj_ratio"], stats["unconverged"], stats["sweeps"]])
        maxima.copy_(torch.maximum(maxima, torch.stack([stats["max_nstep"], stats["contraction"]])))
        if (step + 1) % log_every and step + 1 != steps:
            continue
        count = step + 1 - first
        values = torch.cat([losses[first:step + 1].mean()[None], sums, maxima,
                            schedule.sigma_tensor().max()[None].to(device)]).tolist()
        now = time.perf_counter()
        loss_mean, nstep_sum, ratio_sum, unconverged, sweeps_sum, max_nstep, contraction, sigma_max = values
        log = {
            "step": step + 1, "loss": loss_mean, "tokens": count * tokens_per_step,
            "seconds": now - interval_start, "tokens_per_s": count * tokens_per_step / (now - interval_start),
            "mean_nstep": nstep_sum / count, "max_nstep": int(max_nstep),
            "converged_fraction": 1.0 - unconverged / (count * rows_per_step), "unconverged": int(unconverged),
            "contraction": contraction, "hist_inj_ratio": ratio_sum / count, "sweeps": sweeps_sum / count,
            "sigma_max": sigma_max,
        }
        logs.append(log)
        if on_log is not None:
            on_log(log)
        bar.set_postfix(loss=f"{loss_mean:.3f}", iters=f"{log['mean_nstep']:.1f}")
        sums.zero_()
        maxima.zero_()
        first = step + 1
        interval_start = time.perf_counter()
        if max_seconds is not None and interval_start - start >= max_seconds:
            break
    bar.close()
    return TrainResult(model=model, losses=losses[:first].tolist(), logs=logs, seconds=time.perf_counter() - start)
