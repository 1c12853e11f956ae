"""Data-parallel training of the reference model on ``torch.distributed``.

``torchrun --nproc_per_node=N -m deqkern ...`` starts N processes; each joins the process
group that torchrun describes in its environment (:func:`init`: NCCL on GPUs, gloo on
CPUs), wraps the model (:func:`wrap`: DDP, or FSDP2's ``fully_shard``), takes its rows of
every global batch (:func:`local_rows`) and averages the logged figures over ranks
(:func:`all_reduce_`). Checkpoints hold the full, unsharded state whatever the wrapping
(:func:`full_state`, :func:`load_full_state`), so a run saved on N ranks resumes on any
number of ranks, or in one process.

Why the loss and the gradients equal a single process's: every rank holds ``batch / N``
rows of the same global batch and takes the mean over its own tokens; DDP (all-reduce)
and FSDP2 (reduce-scatter) average the gradients over ranks. With equal rows per rank
the average of the per-rank means is the mean over the global batch, and so is its
gradient: the same normalisation as one process, up to float rounding.

Nothing here runs inside a solve: the solver never calls a collective, so ranks that
need different iteration counts do not wait on each other until the gradient reduction.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["launched", "init", "shutdown", "world", "wrap", "local_rows", "all_reduce_", "full_state",
           "load_full_state"]


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a rank)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str) -> torch.device:
    """Join the process group that ``torchrun`` set up; returns this rank's device.

    ``device_type`` ``"cuda"``: NCCL, device ``cuda:LOCAL_RANK`` (made current);
    ``"cpu"``: gloo. Call once per process, before building the model.
    """
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        # device_id: bind the communicator to this GPU now (eager NCCL init), so a
        # rank on the wrong GPU fails here rather than hanging in the first all-reduce.
        dist.init_process_group("nccl", device_id=device)
    elif device_type == "cpu":
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"device_type must be 'cuda' or 'cpu'; got {device_type!r}")
    return device


def shutdown() -> None:
    """Leave the process group, if any. No barrier: a rank that failed must not wait
    for the others (torchrun stops them)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model: nn.Module, *, fsdp: bool = False) -> nn.Module:
    """The module to train: ``model`` itself without a process group, else DDP or FSDP2.

    DDP with its defaults. Its per-forward buffer broadcast is harmless here: the
    reference model's only buffer at wrapping time is the DEQ layer's ``_sigma_v`` (a
    power-iteration vector for ``info["lipschitz_bound"]``, computed from the weight
    alone, so already the same on every rank); the ``graph=True`` staging buffer is
    created later and rewritten inside every forward. No ``find_unused_parameters``:
    every parameter gets its gradient through ordinary autograd, once per backward
    (the implicit backward's adjoint solve differentiates with respect to ``h`` only).

    FSDP2 (``fsdp=True``): ``fully_shard`` on the whole model, one parameter group. Its
    parameters are all-gathered once before the forward and stay unsharded until the
    end of the backward (a root module is not resharded after its forward), so the T
    per-token DEQ calls of a step cost no collective each. After wrapping, the model's
    parameters are ``DTensor`` shards: build the optimizer and the spectral schedule
    from them.
    """
    if not dist.is_initialized():
        if fsdp:
            raise ValueError("fsdp=True needs a process group (launch with torchrun)")
        return model
    device = next(model.parameters()).device
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        return fully_shard(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch ``(B, ...)``: rows
    ``[rank * B / N, (rank + 1) * B / N)``. ``B`` must divide by the world size."""
    rank, size = world()
    if batch.shape[0] % size:
        raise ValueError(f"the global batch ({batch.shape[0]} rows) must divide by the number of ranks ({size})")
    per_rank = batch.shape[0] // size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def all_reduce_(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In place over ranks: ``op`` ``"mean"``, ``"sum"`` or ``"max"``; no-op in one process."""
    if op not in ("mean", "sum", "max"):
        raise ValueError(f"op must be 'mean', 'sum' or 'max'; got {op!r}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor.div_(dist.get_world_size())
    return tensor


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's full (unsharded) state dicts on the CPU, keyed by
    parameter names without the wrapper's prefixes: the same format for one process,
    DDP and FSDP2. A collective under FSDP2 (every rank must call it); the state is
    returned on rank 0, empty dicts elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(net, optimizer, options=_options(cpu_offload=True))


def load_full_state(net: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load :func:`full_state`'s output (on every rank) into ``net`` and ``optimizer``;
    under FSDP2 each rank keeps its shard.

    Loading into an optimizer that has no state yet runs one ``optimizer.step()`` with
    zero gradients and zero learning rate (``torch.distributed.checkpoint`` does, to
    create the state it then overwrites): attach step hooks, such as the spectral
    schedule's, after this."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(net, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=_options())
