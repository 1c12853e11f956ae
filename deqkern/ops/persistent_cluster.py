"""The one-launch solves, forward and adjoint, on Hopper thread-block clusters (sm_90).

The Triton split kernel (:mod:`deqkern.ops.persistent_split`) spends its iterations on L2
round trips: the exchanged iterate, the partial sums, two group barriers in global memory,
and W's slice re-read. Triton has no thread-block clusters, so this kernel is CUDA C++
(``csrc/cuda/cell_cluster.cu``, built as ``deqkern._cluster`` where torch is a CUDA build
and nvcc is found): a cluster of ``C`` CTAs owns ``BM`` rows, each CTA keeps its ``d / C``
rows of W and a copy of the block's iterate rows in shared memory for the solve, stores its
tile of ``z`` into every CTA's ``z`` buffer through distributed shared memory, and after
one hardware cluster barrier every CTA forms the whole rows' next iterate, residual and
stop decision itself. An iteration reads nothing from global memory.

The adjoint (``csrc/cuda/cell_cluster_adjoint.cu``, :func:`adjoint_cluster`) has the same
layout with ``W``'s column slice resident (``u = dz @ W``), 16-row clusters, ``d <= 512``;
it forms ``z*`` from the same slice (a split-K product over the cluster, exchanged once).

Same arguments, outputs, stop rule and bookkeeping as :func:`persistent_split.solve_split`
(the float32 buffer has the same layout; ``check`` has one row per cluster). What the
kernel takes: bfloat16 or float16 (h0, W, frozen and gain of one dtype), ``d / C`` in (32,
64, 128) columns per CTA with ``C <= 16``, ``BM`` 16 or 32 rows, and shared memory for W's
slice, the iterate rows and two z buffers (``2 * BM * d`` float32): ``d`` up to about 800
(the widths tested on the GPU: 64 to 512).
h0's and W's rows 16-byte aligned. Anything else takes the Triton kernels
(:func:`cluster_for` decides). Float32 stays on Triton: the tensor cores would multiply
in TF32 (or three TF32 products, which measured no faster than the split kernel).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from deqkern import _backend
from deqkern.ops import persistent_split
from deqkern.ops.launch import STOP_MODES, cdiv, frozen_rows, rows, stream_zeros
from deqkern.ops.persistent import Solved
from deqkern.ops.persistent_adjoint import Adjoint
from deqkern.ops.persistent_split import row_views
from deqkern.ops.residual import REL_EPS

try:
    from deqkern import _cluster as _ext
except (ImportError, OSError):  # a CPU build of torch, no nvcc, DEQKERN_NO_CUDA_EXT=1 (setup.py), another torch
    _ext = None

__all__ = ["BACKEND", "available", "shapes", "cluster_config", "forced_config", "cluster_for", "solve_cluster",
           "adjoint_shapes", "adjoint_config", "adjoint_for", "adjoint_cluster"]

#: What :func:`deqkern.last_backend` reports after this kernel ran.
BACKEND = "cuda-cluster"
_DTYPES = (torch.bfloat16, torch.float16)
#: How the cluster shape is chosen, from device time per iteration on an H200
#: (bench/probe_split.py, bf16, BM 16; commits b5e015e and de74cbe):
#:   d=512: C=4 5.5-5.9 us, C=8 9.1-9.6, C=16 12.9-13.4 (BM 32: about twice BM 16's)
#:   d=256: C=2 3.7-3.9 us, C=4 3.1-3.3, C=8 3.8-4.3
#: the exchange and barrier grow with C and the product with d / C: C near 4 and 16-row
#: blocks were best at both widths. A second wave of clusters doubles the time, and
#: already at 1024x512 (64 clusters) the split kernel was faster (12.2 against 19.9 us per
#: iteration): the kernel is taken only where all clusters are resident at once.
_PREFERRED_C = 4
#: The adjoint kernel's rows per cluster (the extension's; None without it, or from a build
#: older than its export: then no cluster adjoint) and widest rows (its row phase keeps g, v
#: and n of a row in registers: 8 float4 groups per thread).
ADJOINT_ROWS = getattr(_ext, "adjoint_rows", None)
ADJOINT_MAX_D = 512
#: The adjoint's counters (clusters done per column slice, one line each) by (device, stream),
#: and their size (the extension's).
_COUNTERS: dict = {}
_COUNTER_WORDS = getattr(_ext, "adjoint_counter_words", None)


def available(device: torch.device) -> bool:
    """Whether the extension is built and ``device`` is a CUDA GPU of compute capability 9.x
    (the build's only target: sm_90 machine code, no PTX for later GPUs to compile)."""
    return _ext is not None and device.type == "cuda" and _capability(device.index or 0) == 9


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def forced_config() -> Optional[tuple[int, int]]:
    """``DEQKERN_CLUSTER_CONFIG="C,BM"`` (benchmarks and tests), or None. Read every call
    (tests set it per case) as a raw dict lookup, parsed once per value."""
    return _parse_forced(_backend.raw_env("DEQKERN_CLUSTER_CONFIG"))


@functools.lru_cache(maxsize=16)
def _parse_forced(raw: object) -> Optional[tuple[int, int]]:
    value = (raw.decode() if isinstance(raw, bytes) else raw or "").strip()
    if not value:
        return None
    try:
        c, bm = (int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(f"DEQKERN_CLUSTER_CONFIG must be 'C,BM' (two integers); got {value!r}") from None
    return c, bm


def shapes(d: int) -> list[tuple[int, int]]:
    """Every cluster shape ``(C, BM)`` the kernel has for width ``d``: ``d / C`` in (32, 64,
    128) columns per CTA with ``C <= 16``, and ``BM`` 16 or 32 rows (whether a GPU can hold it
    is :func:`cluster_config`'s question)."""
    return [(d // block_n, block_m) for block_m in (16, 32) for block_n in (32, 64, 128)
            if d % block_n == 0 and 1 <= d // block_n <= 16]


@functools.lru_cache(maxsize=1024)
def cluster_config(n_rows: int, d: int, dtype: torch.dtype, index: int, forced: Optional[tuple] = None) -> Optional[tuple]:
    """``(C, BM)`` for ``n_rows`` rows of width ``d`` on GPU ``index``, or None where the
    kernel should not run: of the :func:`shapes` whose ``cdiv(n_rows, BM)`` clusters the GPU
    holds at once, the ``C`` nearest 4, then ``BM`` 16 (the measurements above). ``forced``:
    that shape wherever the GPU can launch it (one wave or more; benchmarks and tests)."""
    if _ext is None or dtype not in _DTYPES or n_rows == 0:
        return None
    return _pick(n_rows, shapes(d), lambda c, block_m: _ext.max_active(dtype, index, n_rows, d, c, block_m), forced)


def _pick(n_rows: int, candidates: list, max_active, forced: Optional[tuple]) -> Optional[tuple]:
    """Of the ``(C, BM)`` ``candidates`` whose ``cdiv(n_rows, BM)`` clusters the GPU holds at
    once (``max_active(C, BM)``; a RuntimeError: none), the ``C`` nearest 4, then ``BM`` 16;
    ``forced``: that shape wherever the GPU can launch it."""
    best, best_key = None, None
    for c, block_m in candidates:
        if forced is not None and forced != (c, block_m):
            continue
        try:
            held = max_active(c, block_m)
        except RuntimeError:  # one the GPU cannot launch, e.g. too much shared memory
            held = 0
        if held == 0 or (forced is None and cdiv(n_rows, block_m) > held):
            continue
        key = (abs(math.log2(c / _PREFERRED_C)), block_m)
        if best_key is None or key < best_key:
            best, best_key = (c, block_m), key
    return best


def cluster_for(weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h0: torch.Tensor) -> Optional[tuple]:
    """The ``(C, BM)`` :func:`solve_cluster` would use for this solve, or None where it does
    not take it: ``DEQKERN_PERSISTENT_KERNEL`` other than "auto" / "cluster", no extension or
    not an sm_90 GPU, mixed or 32-bit dtypes, no resident tile (:func:`cluster_config`), or
    rows not 16-byte aligned. Metadata only."""
    return _config_for(weight, frozen, gain, h0, cluster_config)


def _config_for(weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h: torch.Tensor,
                choose) -> Optional[tuple]:
    """:func:`cluster_for`'s conditions, with ``choose`` (:func:`cluster_config` or
    :func:`adjoint_config`) for the shape."""
    dtype, device = h.dtype, h.device
    if (persistent_split.KERNEL not in ("auto", "cluster") or weight.dtype != dtype or frozen.dtype != dtype
            or gain.dtype != dtype or not available(device)):
        return None
    d = h.shape[-1]
    config = choose(h.numel() // d, d, dtype, device.index or 0, forced_config())
    return config if config is not None and _aligned(weight) and _aligned(h) else None


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned rows (the kernel copies rows in 16-byte words)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(-2) * size % 16 == 0)


def solve_cluster(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h0: torch.Tensor, eps: float,
    damping: float, max_iter: int, tol: float, stop_mode: str, with_rstd: bool, config: tuple,
) -> Solved:
    """:func:`deqkern.ops.persistent.solve_triton` by the cluster kernel (same arguments and
    outputs; ``check`` has one row per cluster), with the ``config`` :func:`cluster_for`
    returned for it (or :func:`cluster_config`'s, forced: benchmarks and tests)."""
    d = weight.shape[0]
    h_in = rows(h0, d)
    f, stride_f = frozen_rows(frozen, d)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_rows = h_in.shape[0]
    c, block_m = config
    blocks = cdiv(n_rows, block_m)
    h = torch.empty(h0.shape, dtype=h0.dtype, device=h0.device)
    buf = torch.empty(5 * n_rows + 5 * blocks, dtype=torch.float32, device=h0.device)
    _ext.solve(h_in, w, f, gain if gain.stride(0) == 1 else gain.contiguous(), h, buf, stride_f, c, block_m,
               eps, damping, tol, max_iter, STOP_MODES[stop_mode], with_rstd, REL_EPS)
    return Solved(h, *row_views(buf, n_rows, blocks, with_rstd))


# --------------------------------------------------------------------------- the adjoint
def adjoint_shapes(d: int) -> list[tuple[int, int]]:
    """The adjoint kernel's cluster shapes ``(C, ADJOINT_ROWS)`` for width ``d``: ``d / C`` in
    (32, 64, 128) with ``C <= 16``, and ``d <= 512``; none without the extension."""
    if d > ADJOINT_MAX_D or ADJOINT_ROWS is None:
        return []
    return [(c, block_m) for c, block_m in shapes(d) if block_m == ADJOINT_ROWS]


@functools.lru_cache(maxsize=1024)
def adjoint_config(n_rows: int, d: int, dtype: torch.dtype, index: int,
                   forced: Optional[tuple] = None) -> Optional[tuple]:
    """:func:`cluster_config` for the adjoint kernel (its shapes: :func:`adjoint_shapes`)."""
    if _ext is None or dtype not in _DTYPES or n_rows == 0:
        return None
    return _pick(n_rows, adjoint_shapes(d), lambda c, _: _ext.adjoint_max_active(dtype, index, n_rows, d, c), forced)


def adjoint_for(weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h_star: torch.Tensor) -> Optional[tuple]:
    """The ``(C, ADJOINT_ROWS)`` :func:`adjoint_cluster` would use for the adjoint solve at ``h_star``,
    or None where it does not take it (the conditions of :func:`cluster_for`, with
    :func:`adjoint_config`). Metadata only."""
    return _config_for(weight, frozen, gain, h_star, adjoint_config)


def adjoint_cluster(
    weight: torch.Tensor, frozen: torch.Tensor, gain: torch.Tensor, h_star: torch.Tensor, v: torch.Tensor,
    eps: float, damping: float, max_iter: int, tol: float, config: tuple,
) -> Adjoint:
    """:func:`deqkern.ops.persistent_adjoint.adjoint_triton` by the cluster kernel (same
    arguments and outputs; ``check`` has one row per cluster), with the ``config``
    :func:`adjoint_for` returned. ``v`` is read in h*'s dtype or float32 (another dtype, or
    rows not 16-byte aligned, are converted first)."""
    d = weight.shape[0]
    hs, vv = rows(h_star, d), rows(v, d)
    if vv.dtype not in (hs.dtype, torch.float32):
        vv = vv.float()
    if vv.stride(-1) != 1 or not _aligned(vv):
        vv = vv.contiguous()
    f, stride_f = frozen_rows(frozen, d)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_rows = hs.shape[0]
    blocks = cdiv(n_rows, ADJOINT_ROWS)
    # the outputs are made by the extension; buf: the row state, rstd, check, d_gain's parts
    # (blocks, d), d_gain, then d_gain in h*'s dtype (the last two also as views)
    g, dz, buf, d_gain, d_gain_cast = _ext.adjoint(
        hs, w, f, gain if gain.stride(0) == 1 else gain.contiguous(), vv,
        stream_zeros(_COUNTERS, h_star.device, _COUNTER_WORDS), stride_f, config[0], eps, damping, tol, max_iter, REL_EPS)
    state, rstd, check = row_views(buf, n_rows, blocks, True)
    return Adjoint(g, state, dz, rstd, d_gain, check, d_gain_cast)
