"""Training loop of the reference model (:class:`deqkern.models.charlm.CharLM`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from deqkern.models import checkpoint, distributed
from deqkern.models.charlm import VOCAB, CharLM, CharLMConfig, batches

__all__ = ["train", "TrainResult", "DEFAULT_SAVE_EVERY"]

#: Steps between checkpoints when ``save`` is given (one is also written at the end).
DEFAULT_SAVE_EVERY = 100


@dataclass
class TrainResult:
    """What :func:`train` measured. ``logs``: one dict per logging interval (keys in
    :func:`train`); ``losses``: the training loss (of the global batch) of every step
    this call ran, steps ``start_step + 1`` onwards (``start_step`` > 0 after a resume).
    ``model``: the unwrapped model (under FSDP2 its parameters are this rank's shards)."""

    model: CharLM
    losses: list[float]
    logs: list[dict]
    seconds: float
    start_step: int = 0

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
    save: Optional[Union[str, os.PathLike]] = None,
    save_every: int = DEFAULT_SAVE_EVERY,
    resume: Optional[Union[str, os.PathLike]] = None,
    fsdp: bool = False,
) -> TrainResult:
    """Train a fresh :class:`CharLM` (initialized from ``seed``) for ``steps`` steps.

    AdamW, gradient clipping at ``cfg.grad_clip``, and the layer's
    :class:`deqkern.SpectralNormSchedule` (``every=cfg.spectral_every``) attached to the
    optimizer. Device values are read back once per logging interval, in one transfer.
    ``max_seconds``: stop at the end of the logging interval in which training has run
    this long (``TrainResult.losses`` then holds fewer than ``steps`` entries).

    Checkpoints (:mod:`deqkern.models.checkpoint`): ``save``: write one to this path every
    ``save_every`` steps and at the end (atomically, replacing the previous one).
    ``resume``: continue from one (its configuration and dtype must match ``cfg`` and
    ``dtype``) up to ``steps`` steps in all, bit for bit as if the run had not stopped.

    Data parallel (:mod:`deqkern.models.distributed`): when a process group is
    initialized (``torchrun``), every rank trains on its ``cfg.batch / world_size``
    rows of the same global batch, wrapped in DDP or, with ``fsdp=True``, FSDP2; the
    logged loss and statistics are those of the global batch (reduced over ranks at
    each log; ``hist_inj_ratio`` and ``contraction``, statistics of a whole batch, are
    combined from the ranks' own: the mean ratio and the largest contraction), rank 0
    writes the checkpoints, every rank resumes from them.

    Each log dict (also passed to ``on_log``): ``step``, ``loss`` (mean over the
    interval), ``tokens``, ``seconds``, ``tokens_per_s``, ``mean_nstep``,
    ``max_nstep``, ``converged_fraction``, ``unconverged``, ``contraction`` (max over
    the interval), ``hist_inj_ratio`` (mean), ``sweeps`` (mean per step; 0 for the token
    loop), ``sigma_max`` (largest spectral-norm estimate of the scheduled weights right
    after the latest clamp, at most the target) and ``sigma_drift`` (largest estimate just
    before that clamp over its target: how far the weights had grown since the previous one).
    """
    from tqdm.auto import tqdm

    steps = cfg.steps if steps is None else steps
    if steps < 1 or log_every < 1 or save_every < 1:
        raise ValueError(f"steps, log_every and save_every must be >= 1; got steps={steps}, "
                         f"log_every={log_every}, save_every={save_every}")
    device = torch.device(device)
    rank, world_size = distributed.world()
    if cfg.batch % world_size:
        raise ValueError(f"the global batch cfg.batch={cfg.batch} must divide by the number of ranks ({world_size})")
    torch.manual_seed(seed)
    model = CharLM(cfg).to(device=device, dtype=dtype)
    net = distributed.wrap(model, fsdp=fsdp)
    # after wrapping: FSDP2 replaced the parameters with their shards
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = model.deq.spectral_schedule(every=cfg.spectral_every)
    data = batches(cfg, seed)
    start_step = 0
    if resume is not None:
        start_step = checkpoint.restore(resume, cfg=cfg, dtype=dtype, net=net, model=model, optimizer=optimizer,
                                        schedule=schedule, data=data)
        if start_step >= steps:
            raise ValueError(f"steps={steps}: the checkpoint {str(resume)!r} is already at step {start_step}")
    schedule.attach(optimizer)  # after restore (see distributed.load_full_state)

    def write_checkpoint(done: int) -> None:
        checkpoint.save(save, step=done, cfg=cfg, dtype=dtype, net=net, model=model, optimizer=optimizer,
                        schedule=schedule, data=data)

    losses = torch.zeros(steps, device=device)
    sums = torch.zeros(4, device=device)          # mean_nstep, hist_inj_ratio, unconverged, sweeps
    maxima = torch.zeros(2, device=device)        # max_nstep, contraction
    logs: list[dict] = []
    tokens_per_step = cfg.batch * cfg.seq_len
    rows_per_step = tokens_per_step * cfg.n_slots
    start = interval_start = time.perf_counter()
    first = saved = start_step
    bar = tqdm(range(start_step, steps), disable=not progress or rank != 0, unit="step", dynamic_ncols=True,
               initial=start_step, total=steps)
    for step in bar:
        batch = distributed.local_rows(next(data)).to(device, non_blocking=True)
        logits, stats = net(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        losses[step] = loss.detach()
        sums += torch.stack([stats["mean_nstep"], stats["hist_inj_ratio"], stats["unconverged"], stats["sweeps"]])
        maxima.copy_(torch.maximum(maxima, torch.stack([stats["max_nstep"], stats["contraction"]])))
        if save is not None and not (step + 1) % save_every:
            write_checkpoint(step + 1)
            saved = step + 1
        if (step + 1) % log_every and step + 1 != steps:
            continue
        count = step + 1 - first
        # the global batch's figures: per-rank means averaged over ranks (equal rows per
        # rank), except the count of unconverged rows, which is summed; maxima
        distributed.all_reduce_(losses[first:step + 1], "mean")
        distributed.all_reduce_(sums, "mean")
        sums[2].mul_(world_size)
        distributed.all_reduce_(maxima, "max")
        sigma = torch.stack([schedule.clamped_sigma_tensor().max(), schedule.drift_tensor().max()]).to(device)
        values = torch.cat([losses[first:step + 1].mean()[None], sums, maxima, sigma]).tolist()
        now = time.perf_counter()
        loss_mean, nstep_sum, ratio_sum, unconverged, sweeps_sum, max_nstep, contraction, sigma_max, sigma_drift = values
        log = {
            "step": step + 1, "loss": loss_mean, "tokens": count * tokens_per_step,
            "seconds": now - interval_start, "tokens_per_s": count * tokens_per_step / (now - interval_start),
            "mean_nstep": nstep_sum / count, "max_nstep": int(max_nstep),
            "converged_fraction": 1.0 - unconverged / (count * rows_per_step), "unconverged": round(unconverged),
            "contraction": contraction, "hist_inj_ratio": ratio_sum / count, "sweeps": sweeps_sum / count,
            "sigma_max": sigma_max, "sigma_drift": sigma_drift,
        }
        logs.append(log)
        if on_log is not None:
            on_log(log)
        bar.set_postfix(loss=f"{loss_mean:.3f}", iters=f"{log['mean_nstep']:.1f}")
        sums.zero_()
        maxima.zero_()
        first = step + 1
        interval_start = time.perf_counter()
        if max_seconds is not None and _any_rank(interval_start - start >= max_seconds, device):
            break
    bar.close()
    if save is not None and saved != first:
        write_checkpoint(first)
    return TrainResult(model=model, losses=losses[start_step:first].tolist(), logs=logs,
                       seconds=time.perf_counter() - start, start_step=start_step)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank: every rank stops at the same step (clocks differ)."""
    return bool(distributed.all_reduce_(torch.tensor([float(flag)], device=device), "max").item())
