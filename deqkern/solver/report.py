"""``info`` and the host check of the one-launch solves (:func:`deqkern.solve_cell`).

:class:`Info` holds :func:`deqkern.solve`'s keys, computed by the loop's own ``summarize``
and ``check_vector`` (one definition of every statistic) on first use: about forty small
device ops that a caller who never reads ``info`` does not pay for. The policies' check
comes from the persistent kernels' per-block parts (``block_check_tl``): one small
read-back, no reduction launch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from deqkern.ops.commit import RowState
from deqkern.solver.loop import Check, check_vector, host_check, summarize

__all__ = ["Info", "report", "read_check"]


def _most(state: RowState) -> torch.Tensor:
    nstep = state.nstep
    return nstep.amax() if nstep.numel() else torch.zeros((), dtype=torch.int32, device=nstep.device)


def _summary(h, state: RowState, tol: float, stop_mode: str, iterations) -> dict:
    """:func:`deqkern.solve`'s info tensors (``summarize``), ``iterations`` the largest
    ``nstep`` (the host int when a check read it, else a device tensor)."""
    info = summarize(h, state, check_vector(state, tol), tol, stop_mode)
    info["iterations"] = _most(state) if iterations is None else iterations
    return info


class Info(dict):
    """The ``info`` of :func:`deqkern.solve_cell`: :func:`deqkern.solve`'s keys, computed on first
    use. ``summarize`` is about forty small device ops -- on a small solve several times
    the kernel's own host time -- so a caller who never reads ``info`` (token-by-token
    generation) does not pay for it. Any read or write fills it first; it then is a plain
    dict. Until then it holds the solve's ``h*`` and ``RowState`` (and the adjoint's ``g``),
    and any value a caller deferred (:meth:`defer_value`)."""

    __slots__ = ("_pending", "_values")

    def __init__(self):
        super().__init__()
        self._pending: list = []
        self._values: list = []

    def defer_value(self, key: str, compute) -> None:
        """``info[key] = compute()``, computed when ``key`` itself is first read (or the
        whole dict is: iteration, ``len``, ``repr``...): the layer's diagnostics, which a
        caller reading only the solve's keys never pays for."""
        self._values.append((key, compute))

    def _deferred(self, key) -> int:
        """The index of ``key`` among the deferred values, -1 if it is not one."""
        return next((i for i, (name, _) in enumerate(self._values) if name == key), -1)

    def _read(self, key) -> None:
        """Fill what a read of ``key`` needs: that deferred value alone, or else the
        solves' statistics."""
        i = self._deferred(key)
        if i >= 0:
            _, compute = self._values.pop(i)
            dict.__setitem__(self, key, compute())
        elif not dict.__contains__(self, key):
            self._fill_pending()

    def __getitem__(self, key):
        self._read(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._read(key)
        return dict.get(self, key, default)

    def __contains__(self, key) -> bool:
        if self._deferred(key) >= 0:  # present, and not computed just to say so
            return True
        if not dict.__contains__(self, key):
            self._fill_pending()
        return dict.__contains__(self, key)

    def defer(self, prefix: str, h, state: RowState, tol: float, stop_mode: str, iterations) -> None:
        """Statistics of one solve, keys prefixed by ``prefix``; a later solve with the
        same prefix (a second backward) replaces a pending one."""
        self._pending = [p for p in self._pending if p[0] != prefix]
        self._pending.append((prefix, h, state, tol, stop_mode, iterations))

    def _fill_pending(self) -> None:
        while self._pending:
            prefix, *args = self._pending.pop(0)
            for name, value in _summary(*args).items():
                dict.__setitem__(self, prefix + name, value)

    def _fill(self) -> None:
        self._fill_pending()
        while self._values:
            key, compute = self._values.pop(0)
            dict.__setitem__(self, key, compute())


def _filled(name: str):
    method = getattr(dict, name)

    def wrapper(self, *args, **kwargs):
        self._fill()
        return method(self, *args, **kwargs)

    wrapper.__name__ = name
    return wrapper


for _name in ("__setitem__", "__delitem__", "__iter__", "__len__", "__repr__",
              "__eq__", "__ne__", "__or__", "__ior__", "__reversed__", "__reduce_ex__", "keys", "values",
              "items", "pop", "popitem", "setdefault", "update", "copy", "clear"):
    setattr(Info, _name, _filled(_name))


def read_check(parts: torch.Tensor) -> tuple[Check, int]:
    """The host check from the kernels' per-program parts (``block_check_tl``): the one sync."""
    p = parts.cpu().numpy()
    if len(p) == 0:
        return Check(0, 0, 0, 0.0), 0
    total, most = p.sum(0), p.max(0)  # columns: unconverged, first bad iteration, bad rows, max residual, iterations
    bad_rows = int(total[2])
    if bad_rows:
        # (a program's bad rows always come with their iteration; were one missing, the
        # rows are still reported non-finite, at iteration 1, rather than passed over)
        bad_iters = p[:, 1][p[:, 1] > 0]
        first_bad, max_residual = (int(bad_iters.min()) if bad_iters.size else 1), math.nan
    else:
        first_bad, max_residual = 0, float(most[3])
    return Check(int(total[0]), first_bad, bad_rows, max_residual), int(most[4])


def report(info: dict, prefix: str, h, state: RowState, parts: Optional[torch.Tensor], tol: float,
            stop_mode: str, policy: str) -> Optional[Check]:
    """Add the solve's statistics to ``info`` (deferred in an :class:`Info`) and return the
    host check for ``enforce`` -- the one sync -- unless ``policy == "ignore"``."""
    check = iterations = None
    if policy != "ignore":
        if parts is not None:
            check, iterations = read_check(parts)
        else:
            vector = torch.cat([check_vector(state, tol), _most(state).to(torch.float64).reshape(1)]).cpu()
            check, iterations = host_check(vector[:4]), int(vector[4])
    if isinstance(info, Info):
        info.defer(prefix, h, state, tol, stop_mode, iterations)
    else:
        info.update({prefix + name: value for name, value in _summary(h, state, tol, stop_mode, iterations).items()})
    return check
