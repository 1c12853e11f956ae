"""Launch helpers shared by every row-wise kernel in :mod:`deqkern.ops` (host side).

Everything here runs before every launch, so it is plain Python and cached where it can
be: on small problems the host's time per launch *is* the iteration's time
(``triton.cdiv`` / ``triton.next_power_of_2`` cost microseconds a call; these do not).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "STOP_MODES", "rows", "frozen_rows", "cdiv", "next_power_of_2", "sm_count", "launch_config",
    "compute_dtype", "GPU_TILE", "INTERPRETER_TILE",
]

#: Residual definitions and their kernel codes (a ``tl.constexpr``).
STOP_MODES = {"abs": 0, "rel": 1, "max": 2}

#: Elements per program on a GPU: near 4K keeps a few values per thread per tensor.
GPU_TILE = 4096
#: Under Triton's interpreter every program costs milliseconds: pack many rows per program.
INTERPRETER_TILE = 16384


def rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> a 2-D (rows, d) view with unit column stride (copies only if needed)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, d)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def frozen_rows(frozen: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """``frozen`` as (rows, d) and its row stride; a broadcast (d,) vector gets stride 0."""
    if frozen.dim() == 1:
        f = frozen if frozen.stride(0) == 1 else frozen.contiguous()
        return f, 0
    f = rows(frozen, d)
    return f, f.stride(0)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def launch_config(n_rows: int, d: int, interpreted: bool) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_M, num_warps)`` for a kernel that holds BLOCK_M whole rows per
    program (BLOCK_D >= d)."""
    block_d = next_power_of_2(d)
    tile = INTERPRETER_TILE if interpreted else GPU_TILE
    block_m = max(1, min(tile // block_d, next_power_of_2(max(n_rows, 1))))
    num_warps = min(16, max(1, (block_m * block_d) // 512))
    return block_d, block_m, num_warps


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The eager paths' arithmetic dtype: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
