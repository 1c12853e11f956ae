"""The one place that decides which implementation of a fused op runs.

Backends:

- ``"triton"``: the Triton kernels on a CUDA GPU of compute capability >= 7.0
  (bfloat16 needs >= 8.0).
- ``"triton-interpreter"``: the same kernels run by Triton's interpreter on CPU
  tensors. Only when asked for (``DEQKERN_BACKEND=triton``) and ``TRITON_INTERPRET=1``
  was set before triton was imported; the test suite does both on CPU-only machines so
  CI runs the real kernels.
- ``"eager"``: plain torch, float32 math (float64 for float64 inputs).

``DEQKERN_BACKEND=auto|triton|eager`` (read at every call) forces the choice. ``auto``
(the default) picks Triton on a GPU whenever it can and eager otherwise -- never the
interpreter, a test tool some 20x slower than eager on a CPU, even with
``TRITON_INTERPRET=1`` set; ``triton`` raises a ``RuntimeError`` saying why when the
kernels cannot run on the given tensors.

Per-call cost: :func:`select` is cached on the raw values of the environment variables
it reads (:func:`environment`) and its arguments, so a change of the environment (a
test's ``monkeypatch.setenv``) is seen at the next call while a repeated call costs a
cache lookup. The ops in :mod:`deqkern.functional` key their per-signature plans on
:func:`environment` too.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

__all__ = ["select", "last_backend", "record", "interpreter_active", "environment", "mode", "MAX_FUSED_D"]

#: Largest feature width the fused kernels take (one row lives in registers). Wider rows
#: go to the eager path under ``auto``.
MAX_FUSED_D = 16384

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_last: Optional[str] = None


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _why_not_triton(device: torch.device, dtype: torch.dtype, d: int) -> Optional[str]:
    """None when the Triton kernels can run here, else the reason they cannot."""
    if not _triton_importable():
        return "triton is not installed"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not one of float32, float16, bfloat16"
    if d > MAX_FUSED_D:
        return f"feature width {d} is above the fused limit {MAX_FUSED_D}"
    if device.type == "cuda":
        if interpreter_active():
            return "TRITON_INTERPRET=1 is set, which runs CPU tensors only"
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if major < 7:
            return f"compute capability {major}.{minor} is below 7.0"
        if dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 needs compute capability >= 8.0, the GPU has {major}.{minor}"
        return None
    if device.type == "cpu":
        if interpreter_active():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return f"device type {device.type!r} is not supported by the Triton kernels"


_ENV_NAMES = ("DEQKERN_BACKEND", "TRITON_INTERPRET")
# os.environ.get costs about a microsecond (it encodes the key and decodes the value);
# CPython's os.environ keeps the encoded pairs in ``_data``, which os.environ[...] = ...
# (and so monkeypatch.setenv) updates: reading it raw is a dict lookup.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(os.environ.encodekey(name) for name in _ENV_NAMES) if hasattr(os.environ, "encodekey") else None


def raw_env(name: str) -> Optional[object]:
    """The raw value of the environment variable ``name`` (bytes on POSIX; None if unset),
    read as :func:`environment` reads its own: a dict lookup where CPython allows."""
    if _ENV_KEYS is not None and isinstance(_ENV_DATA, dict):
        return _ENV_DATA.get(_encoded(name))
    return os.environ.get(name)


@functools.lru_cache(maxsize=16)
def _encoded(name: str) -> object:
    return os.environ.encodekey(name)


def environment() -> tuple:
    """The raw values of the environment variables the choice depends on (a cache key)."""
    if _ENV_KEYS is not None and isinstance(_ENV_DATA, dict):
        data = _ENV_DATA
        return data.get(_ENV_KEYS[0]), data.get(_ENV_KEYS[1])
    return tuple(os.environ.get(name) for name in _ENV_NAMES)


def mode() -> str:
    """``DEQKERN_BACKEND``: ``"auto"`` (also when unset or empty), ``"triton"`` or ``"eager"``."""
    value = os.environ.get("DEQKERN_BACKEND", "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "eager"):
        raise ValueError(f"DEQKERN_BACKEND must be one of 'auto', 'triton', 'eager'; got {value!r}")
    return value


def select(device: torch.device, dtype: torch.dtype, d: int) -> str:
    """Choose ``"triton"``, ``"triton-interpreter"`` or ``"eager"`` for one op call.

    Metadata only: this never touches tensor values and never synchronizes.
    """
    return _select(environment(), device, dtype, d)


@functools.lru_cache(maxsize=4096)
def _select(env: tuple, device: torch.device, dtype: torch.dtype, d: int) -> str:
    """:func:`select` for the environment ``env`` (the cache key; the body reads it)."""
    mode_ = mode()
    if mode_ == "eager":
        return "eager"
    reason = _why_not_triton(device, dtype, d)
    if reason is None:
        if device.type != "cpu":
            return "triton"
        if mode_ == "triton":
            return "triton-interpreter"
        return "eager"  # auto never picks the interpreter (module docstring)
    if mode_ == "triton":
        raise RuntimeError(f"DEQKERN_BACKEND=triton but the Triton kernels cannot run: {reason}")
    return "eager"


def record(backend: str) -> None:
    global _last
    _last = backend


def last_backend() -> Optional[str]:
    """The backend that ran the most recent fused op call in this process.

    One of ``"triton"``, ``"triton-interpreter"``, ``"eager"``, ``"triton-persistent"``
    (:func:`deqkern.solve_cell`'s one-launch solve, on a GPU or the interpreter),
    ``"cuda-cluster"`` (its forward or adjoint by the thread-block-cluster kernels on sm_90), or
    ``None`` before the first call. Under ``torch.compile`` it reflects the last eager
    execution of the op.
    """
    return _last
