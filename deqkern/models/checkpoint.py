"""Checkpoints of the reference model's training (``train(save=..., resume=...)``,
``python -m deqkern --save PATH`` / ``--resume PATH``).

A checkpoint holds everything the training loop evolves, so that a resumed run
continues bit for bit: the model's parameters (full, unsharded: any number of ranks
can resume it) and its non-persistent buffers, the optimizer's state, the spectral
schedule's state (its step counter and power-iteration vectors: without them the
resumed run clamps at other steps with other vectors and silently diverges), the step
count, the RNG states (torch CPU and the training GPU's) and the data position (the
batch stream's generator). It also records the model configuration and dtype, and a
run with another configuration refuses it.

Writes are atomic: the file is written next to its destination under a temporary name,
flushed to disk, then renamed over it (``os.replace``), so a crash mid-write leaves the
previous checkpoint intact. Reads validate everything (readable, complete, this
format, this configuration, the same parameter names and shapes) before anything is
loaded: a bad file raises :class:`CheckpointError` and leaves the model untouched.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import nn

from deqkern.models import distributed
from deqkern.models.charlm import Batches, CharLMConfig
from deqkern.spectral import SpectralNormSchedule

__all__ = ["FORMAT", "CheckpointError", "save", "restore", "read", "write_atomic"]

#: Written into every checkpoint; a file without it (or with another) is refused.
FORMAT = "deqkern.charlm.train/1"
#: Configuration fields that may differ between the run that saved and the run that
#: resumes: how long to train and how to execute, not what the model is.
EXECUTION_FIELDS = frozenset({"steps", "graph"})
_KEYS = frozenset({"format", "step", "config", "dtype", "model", "buffers", "optimizer", "schedule", "data", "rng"})

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, truncated, of another
    format, or written for another configuration."""


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict())
    return {name: buf for name, buf in model.named_buffers() if name not in persistent}


def save(path: PathLike, *, step: int, cfg: CharLMConfig, dtype: torch.dtype, net: nn.Module, model: nn.Module,
         optimizer: torch.optim.Optimizer, schedule: SpectralNormSchedule, data: Batches) -> None:
    """Write the training state after ``step`` completed steps to ``path``, atomically.

    ``net``: the module being trained (``model`` or its DDP/FSDP2 wrapper). Every rank
    calls this (gathering FSDP2 shards is a collective); rank 0 writes.
    """
    model_state, optim_state = distributed.full_state(net, optimizer)
    if distributed.world()[0] != 0:
        return
    device = next(model.parameters()).device
    payload = {
        "format": FORMAT, "step": step, "config": dataclasses.asdict(cfg), "dtype": str(dtype).removeprefix("torch."),
        "model": model_state, "optimizer": optim_state,
        "buffers": {name: buf.detach().cpu() for name, buf in _non_persistent_buffers(model).items()},
        "schedule": schedule.state_dict(), "data": data.state_dict(),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
    }
    write_atomic(path, payload)


def write_atomic(path: PathLike, payload: Any) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file in the same folder,
    fsynced and renamed over ``path``: readers see the old file or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def read(path: PathLike) -> dict:
    """The checkpoint at ``path`` as a dict of CPU tensors (``torch.load(weights_only=True)``),
    its format checked. Raises :class:`CheckpointError` for a truncated, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise CheckpointError(
            f"checkpoint {str(path)!r} ({path.stat().st_size:,} bytes) cannot be read: it is truncated or corrupt "
            f"({type(err).__name__}: {err}). Nothing was loaded; resume from an intact checkpoint."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a deqkern training checkpoint of format "
                              f"{FORMAT!r} (found {found!r})")
    missing = _KEYS - set(payload)
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: missing {sorted(missing)}")
    return payload


def restore(path: PathLike, *, cfg: CharLMConfig, dtype: torch.dtype, net: nn.Module, model: nn.Module,
            optimizer: torch.optim.Optimizer, schedule: SpectralNormSchedule, data: Batches) -> int:
    """Load the checkpoint at ``path`` into a freshly built run; returns the step to
    continue from. Every rank calls it (and reads the file). Validates first: raises
    :class:`CheckpointError` (another configuration, other parameters) before loading
    anything. Call before attaching the schedule to the optimizer (see
    :func:`deqkern.models.distributed.load_full_state`)."""
    payload = read(path)
    where = f"checkpoint {str(path)!r}"
    saved_cfg = payload["config"]
    ours = dataclasses.asdict(cfg)
    differ = [f"{name} {saved_cfg.get(name)!r} (checkpoint) vs {value!r} (this run)"
              for name, value in ours.items() if name not in EXECUTION_FIELDS and saved_cfg.get(name) != value]
    dtype_name = str(dtype).removeprefix("torch.")
    if payload["dtype"] != dtype_name:
        differ.append(f"dtype {payload['dtype']} (checkpoint) vs {dtype_name} (this run)")
    if differ:
        raise CheckpointError(f"{where} was written for another configuration: {'; '.join(differ)}")
    _check_like(payload["model"], model.state_dict(), f"{where}['model']")
    _check_like(payload["schedule"], schedule.state_dict(), f"{where}['schedule']")
    _check_like(payload["data"], data.state_dict(), f"{where}['data']")
    names = {name for name, _ in model.named_parameters()}
    saved_names = {name for group in payload["optimizer"]["param_groups"] for name in group["params"]}
    if saved_names != names:
        raise CheckpointError(f"{where}['optimizer'] holds the parameters {sorted(saved_names ^ names)} that the "
                              "model does not, or lacks them")

    distributed.load_full_state(net, optimizer, payload["model"], payload["optimizer"])
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, saved in payload["buffers"].items():
            if name in buffers and buffers[name].shape == saved.shape:
                buffers[name].copy_(saved)
    schedule.load_state_dict(payload["schedule"])
    data.load_state_dict(payload["data"])
    torch.set_rng_state(payload["rng"]["cpu"])
    device = next(model.parameters()).device
    if device.type == "cuda" and payload["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(payload["rng"]["cuda"], device)
    return int(payload["step"])


def _check_like(saved: Any, reference: Any, what: str) -> None:
    """``saved`` has ``reference``'s nested keys, and tensors of its shapes."""
    if isinstance(reference, Mapping):
        if not isinstance(saved, Mapping) or set(saved) != set(reference):
            keys = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise CheckpointError(f"{what} has keys {keys}; expected {sorted(reference)}")
        for key, value in reference.items():
            _check_like(saved[key], value, f"{what}[{key!r}]")
    elif isinstance(reference, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != reference.shape:
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise CheckpointError(f"{what} has shape {got}; expected {tuple(reference.shape)}")
