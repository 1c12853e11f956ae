"""Launch helpers shared by every row-wise kernel in :mod:`deqkern.ops` (host side).

Everything here runs before every launch, so it is plain Python and cached where it can
be: on small problems the host's time per launch *is* the iteration's time
(``triton.cdiv`` / ``triton.next_power_of_2`` cost microseconds a call; these do not).
:class:`Launch` is a kernel launch whose grid and scalar arguments are fixed once per
call signature, launched through Triton's compiled-kernel handle instead of
``JITFunction.run``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from triton import knobs as _knobs

__all__ = [
    "STOP_MODES", "rows", "frozen_rows", "cdiv", "next_power_of_2", "sm_count", "launch_config",
    "compute_dtype", "GPU_TILE", "GPU_STREAM_TILE", "INTERPRETER_TILE", "AS_IS", "VIEW", "COPY", "row_mode", "as_rows", "Launch",
]

#: Residual definitions and their kernel codes (a ``tl.constexpr``).
STOP_MODES = {"abs": 0, "rel": 1, "max": 2}

#: Elements per program on a GPU: near 4K keeps a few values per thread per tensor.
GPU_TILE = 4096
#: Elements per program of a purely streaming row kernel (the fused update's forward): one
#: row of 1024 in two warps moved 3.9 TB/s on the H200 where 4096-element tiles in eight
#: warps moved 3.2 (bf16 32768x1024: 69 against 84 us; 16384x2048: 68 against 83 us;
#: fp32 8192x512: 20 against 24 us; ``bench/probe_update.py``, commit 45c8739).
GPU_STREAM_TILE = 1024
#: Under Triton's interpreter every program costs milliseconds: pack many rows per program.
INTERPRETER_TILE = 16384


def rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> a 2-D (rows, d) view with unit column stride (copies only if needed)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, d)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


#: How a tensor becomes the 2-D ``(rows, d)`` operand of a kernel (:func:`row_mode`).
AS_IS, VIEW, COPY = 0, 1, 2


def row_mode(x: torch.Tensor) -> int:
    """How :func:`as_rows` turns ``x`` (``(..., d)``, or a ``(d,)`` vector) into rows with
    unit column stride; fixed by shape and strides, so decided once per call signature:
    ``AS_IS`` (1-D or 2-D with unit column stride: the kernel takes its row stride),
    ``VIEW`` (contiguous: one ``view``), ``COPY`` (anything else: :func:`rows`)."""
    if x.dim() <= 2 and x.stride(-1) == 1:
        return AS_IS
    return VIEW if x.is_contiguous() else COPY


def as_rows(x: torch.Tensor, mode: int, d: int) -> torch.Tensor:
    """``x`` as the kernel's operand, per its :func:`row_mode`."""
    if mode == AS_IS:
        return x
    return x.view(-1, d) if mode == VIEW else rows(x, d)


def frozen_rows(frozen: torch.Tensor, d: int) -> tuple[torch.Tensor, int]:
    """``frozen`` as (rows, d) and its row stride; a broadcast (d,) vector gets stride 0."""
    if frozen.dim() == 1:
        f = frozen if frozen.stride(0) == 1 else frozen.contiguous()
        return f, 0
    f = rows(frozen, d)
    return f, f.stride(0)


def stream_zeros(pool: dict, device: torch.device, size: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``size`` words for a launch on the current stream of
    ``device`` whose kernel leaves it at zero (counters): the stream's buffer cached in
    ``pool`` (launches on one stream run one after another), or a new one while a CUDA graph
    is being captured (a memset in the graph: the graph's launches then use memory of the
    graph's own)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(size, dtype=torch.int32, device=device)
        index = torch.cuda.current_device() if device.index is None else device.index
        key = (index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = (device, 0)
    counters = pool.get(key)
    if counters is None or counters.numel() < size:
        counters = pool[key] = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
    return counters


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def launch_config(n_rows: int, d: int, interpreted: bool, tile: int = GPU_TILE) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_M, num_warps)`` for a kernel that holds BLOCK_M whole rows per
    program (BLOCK_D >= d), about ``tile`` elements per program on a GPU (16 per thread)."""
    block_d = next_power_of_2(d)
    tile = INTERPRETER_TILE if interpreted else tile
    block_m = max(1, min(tile // block_d, next_power_of_2(max(n_rows, 1))))
    num_warps = min(16, max(1, (block_m * block_d) // 512))
    return block_d, block_m, num_warps


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The eager paths' arithmetic dtype: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Launch:
    """One kernel launch whose grid, scalar arguments (every argument after the tensors,
    constexprs included, in the kernel's order), ``num_warps`` and other compile options
    (``num_stages``) are fixed: what a call signature determines. ``launch(*tensors)`` runs it.

    Why not ``kernel[grid](...)``: ``JITFunction.run`` re-derives per launch what is fixed
    here -- it binds and specializes every argument, builds its cache key (a ``str`` of
    the options), reads the device and stream and builds launch metadata for the
    profiler hooks; tens of microseconds of host time per launch, the whole cost of a
    small kernel (measured: ``python -m bench --suite host``). Here the first launch goes
    through ``JITFunction.run``, which compiles and returns the compiled kernel; later
    launches call that kernel's launcher directly. That is exact as long as Triton would
    pick the same compiled kernel: the scalars are fixed (Triton specializes integers on
    ``== 1`` and divisibility by 16), and the one remaining specialization, a pointer's
    16-byte alignment, is checked per launch: the direct path is taken only when every
    pointer is aligned (the compiled kernel is only kept from such a launch).

    ``JITFunction.run`` still runs, correctly and slowly, for: misaligned pointers,
    registered launch hooks (profilers such as proton), a tensor on a device other than
    the current one (under a device guard), Triton's CPU interpreter, and a Triton whose
    compiled kernel lacks the ``run`` / ``function`` / ``packed_metadata`` handle this
    relies on (the same on triton 3.6 and 3.9).
    """

    __slots__ = ("kernel", "grid", "scalars", "num_warps", "options", "device_index", "function", "metadata", "run")

    def __init__(self, kernel: Any, grid: tuple, scalars: tuple, num_warps: int, device: torch.device,
                 **options: Any):
        self.kernel, self.scalars, self.num_warps, self.options = kernel, scalars, num_warps, options
        self.grid = (*grid, 1, 1)[:3]
        self.device_index = device.index if device.type == "cuda" else None
        # The compiled kernel's launcher and handles, once a launch with aligned pointers returned them.
        self.run: Any = None
        self.function = self.metadata = None

    def __call__(self, *tensors: torch.Tensor) -> None:
        run, index = self.run, self.device_index
        if run is not None and _DRIVER.device() == index and _hooks_idle():
            ptr_bits = 0
            for t in tensors:
                ptr_bits |= t.data_ptr()
            if not ptr_bits & 15:
                g0, g1, g2 = self.grid
                run(g0, g1, g2, _DRIVER.stream(index), self.function, self.metadata, None, None, None,
                    *tensors, *self.scalars)
                return
        if index is not None and torch.cuda.current_device() != index:
            with torch.cuda.device(index):
                self._jit_run(tensors)
        else:
            self._jit_run(tensors)

    def _jit_run(self, tensors: tuple) -> None:
        compiled = self.kernel[self.grid](*tensors, *self.scalars, num_warps=self.num_warps, **self.options)
        if (self.run is None and self.device_index is not None and _DRIVER.bind()
                and all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))
                and all(t.data_ptr() % 16 == 0 for t in tensors)):
            self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata


class _Driver:
    """Triton's own current-device and current-stream getters (on CUDA:
    ``torch.cuda.current_device`` and ``torch._C._cuda_getCurrentRawStream``), looked up
    once, after the first CUDA launch made Triton's driver active."""

    device: Any = None
    stream: Any = None

    def bind(self) -> bool:
        if self.stream is None:
            try:
                from triton.runtime import driver

                active = driver.active
                self.device, self.stream = active.get_current_device, active.get_current_stream
            except (AttributeError, RuntimeError):
                return False
        return True


_DRIVER = _Driver()


def _hooks_idle() -> bool:
    """True when no Triton launch hook is registered (hooks are ``HookChain`` s on triton
    3.6 and 3.9, empty by default; anything else counts as registered)."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True
