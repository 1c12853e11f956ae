"""Spectral-norm schedule: keep chosen weights' spectral norms at or below a target.

A DEQ converges only while its h-dependent path is a contraction. Every ``every``-th
optimizer step, :class:`SpectralNormSchedule` estimates an upper bound on each weight's
largest singular value (a few Lanczos steps from warm-started vectors, plus the
estimate's own residual) and rescales the weight in place, ``W <- W * min(1, tau / sigma)``.
Unlike torchdeq's spectral norm (a learnable scale on top of W / sigma) the rescale is a
hard bound, up to the accuracy of the estimate; unlike
``torch.nn.utils.parametrizations.spectral_norm`` it costs nothing on the steps in
between and nothing per weight access in the forward.

Backends, same math op for op (agree to float32 rounding):

- ``"cpp"``: ``deqkern._C`` (csrc/spectral.cpp), one C++ call over all weights.
- ``"torch"``: :func:`lanczos_reference` / :func:`clamp_reference`
  (:mod:`deqkern.spectral_reference`), the same torch ops from Python. It is the
  reference the tests compare with, and documents the math.

``DEQKERN_SPECTRAL_BACKEND=auto|cpp|torch`` (read at construction) forces one; the
``backend=`` argument overrides the variable. ``auto`` picks ``cpp`` when the extension
is built and ``torch`` otherwise.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from deqkern.spectral_reference import NORMALIZE_EPS, clamp_reference, lanczos_reference

try:
    from deqkern import _C
except ImportError as err:  # built without the extension (DEQKERN_NO_EXT=1) or not built yet
    _C = None
    _C_IMPORT_ERROR: Optional[ImportError] = err
else:
    _C_IMPORT_ERROR = None

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

__all__ = ["SpectralNormSchedule", "lanczos_reference", "clamp_reference"]

_BACKENDS = ("cpp", "torch")
_DEFAULT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Named = tuple[str, torch.Tensor]
ParamsOrModule = Union[nn.Module, Iterable[Named], Iterable[torch.Tensor]]


def _is_dtensor(t: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


class _TorchBackend:
    lanczos_ = staticmethod(lanczos_reference)
    clamp_ = staticmethod(clamp_reference)


def _resolve_backend(backend: Optional[str]) -> tuple[str, Any]:
    """(name, implementation) for ``backend=`` or, when None, ``DEQKERN_SPECTRAL_BACKEND``."""
    if backend is None:
        choice = os.environ.get("DEQKERN_SPECTRAL_BACKEND", "auto").strip().lower() or "auto"
        if choice not in ("auto",) + _BACKENDS:
            raise ValueError(f"DEQKERN_SPECTRAL_BACKEND must be one of 'auto', 'cpp', 'torch'; got {choice!r}")
        source = f"DEQKERN_SPECTRAL_BACKEND={choice}"
    elif backend in _BACKENDS:
        choice, source = backend, f"backend={backend!r}"
    else:
        raise ValueError(f"backend must be None, 'cpp' or 'torch'; got {backend!r}")
    if choice == "auto":
        choice = "cpp" if _C is not None else "torch"
    if choice == "torch":
        return "torch", _TorchBackend
    if _C is None:
        raise ImportError(
            f"{source} needs the C++ extension deqkern._C, which could not be imported "
            f"({_C_IMPORT_ERROR}). Build it with `pip install -e . --no-build-isolation` "
            "(without DEQKERN_NO_EXT=1), or use backend='torch'."
        ) from _C_IMPORT_ERROR
    return "cpp", _C


# --------------------------------------------------------------------------- selection
def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _candidates(params_or_module: ParamsOrModule, names: Optional[Sequence[str]]) -> list[Named]:
    """(name, tensor) pairs the user selected, in a stable order."""
    if isinstance(params_or_module, nn.Module):
        if names is None:
            chosen: dict[int, Named] = {}  # by identity: a weight tied between layers is clamped once
            for path, mod in params_or_module.named_modules():
                if isinstance(mod, _DEFAULT_LAYERS):
                    chosen.setdefault(id(mod.weight), (f"{path}.weight" if path else "weight", mod.weight))
            return list(chosen.values())
        pool = list(params_or_module.named_parameters())
    else:
        if isinstance(params_or_module, torch.Tensor):
            raise TypeError(
                "params_or_module must be an nn.Module or an iterable of parameters or (name, parameter) "
                "pairs, got a single Tensor; wrap it in a list"
            )
        pool = []
        for index, item in enumerate(params_or_module):
            if isinstance(item, torch.Tensor):
                pool.append((str(index), item))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
                pool.append((str(item[0]), item[1]))
            else:
                raise TypeError(
                    f"params_or_module[{index}] must be a Tensor or a (name, Tensor) pair, got {type(item).__name__}"
                )
        if names is None:
            return pool
    if isinstance(names, str):
        raise TypeError(f"names must be a list of names or patterns, got the string {names!r}")
    for pattern in names:
        if not any(_matches(name, pattern) for name, _ in pool):
            raise ValueError(
                f"names: {pattern!r} matches no parameter; available: {[name for name, _ in pool]}"
            )
    return [(name, tensor) for name, tensor in pool if any(_matches(name, p) for p in names)]


def _check_int_at_least(value: Any, arg: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{arg} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {value}")
    return value


def _check_target(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{arg} must be a float > 0, got {type(value).__name__} {value!r}")
    if not (0.0 < float(value) < float("inf")):
        raise ValueError(f"{arg} must be a finite float > 0, got {value!r}")
    return float(value)


def _resolve_targets(target: Union[float, Mapping[str, float]], names: Sequence[str]) -> list[float]:
    if not isinstance(target, Mapping):
        tau = _check_target(target, "target")
        return [tau for _ in names]
    patterns = {str(p): _check_target(tau, f"target[{p!r}]") for p, tau in target.items()}
    for pattern in patterns:
        if not any(_matches(name, pattern) for name in names):
            raise ValueError(f"target: pattern {pattern!r} matches none of the selected weights {list(names)}")
    taus = []
    for name in names:
        tau = next((t for p, t in patterns.items() if _matches(name, p)), None)
        if tau is None:
            raise ValueError(
                f"target: weight {name!r} matches none of the patterns {list(patterns)}; "
                "add a pattern for it (e.g. '*': tau) or leave it out with names="
            )
        taus.append(tau)
    return taus


# --------------------------------------------------------------------------- the schedule
class SpectralNormSchedule:
    """Clamp the spectral norm of chosen weights every ``every`` optimizer steps.

    On every ``every``-th :meth:`step` (or on :meth:`apply_now`), under ``torch.no_grad()``,
    per weight ``W`` (a weight of shape ``(out, ...)``, e.g. a conv kernel
    ``(out, in, kh, kw)``, is treated as the matrix ``(out, -1)``): ``n_power_iter``
    Golub-Kahan-Lanczos steps (``2 n_power_iter + 1`` products with ``W`` or ``W^T``)
    from the persistent vector ``v`` (``(numel / out,)``, warm-started: the previous
    estimate's right singular vector; ``u`` ``(out,)`` is the left one) give the Ritz
    value ``theta`` (the norm of ``W`` restricted to the Krylov spaces, ``<= sigma_1``)
    and its residual ``r``; ``sigma = theta + r / sqrt(2)``, then
    ``W <- W * min(1, tau / sigma)`` in place. Math is float32 (small matrices float64)
    whatever the weight dtype; no call syncs the host except :meth:`sigmas`.

    The bound. ``r / sqrt(2)`` is the residual of the Ritz pair as an eigenpair of
    ``[[0, W^T], [W, 0]]``, so some singular value of ``W`` lies within it of ``theta``:
    when the Krylov spaces hold the top singular direction, ``sigma >= sigma_1`` and the
    clamp leaves ``||W||_2 <= tau``. A power-iteration estimate is a lower bound instead,
    and lags where the top of the spectrum is flat -- which the clamp itself produces
    (it presses every singular value that outgrew ``tau`` back to ``tau``, and the next
    one to grow may be one the vector does not point at): in the tests' MLP the true
    norm after a clamp reached 1.04-1.09 ``tau`` (SGD lr 0.05, ``every=2``) and 1.08-1.17
    ``tau`` (Adam lr 1e-3, ``every=4``) with one power iteration per clamp. With the
    default ``n_power_iter=2`` it stays <= 1.0015 ``tau`` in both. The estimate is still
    not a certificate: a direction absent from the Krylov spaces can be missed (1.01
    ``tau`` once in those tests with ``n_power_iter=3``). The price: clamping a little
    more than needed while the estimate is unsure (the true norm after such a clamp was
    0.945-1 ``tau``), and 5 products with each weight per clamp instead of 3 (about 2x
    the time per clamp on a CPU; ``n_power_iter=1`` costs 3 products and reached
    1.03-1.08 ``tau`` in those tests).

    Distributed: under DDP every rank holds the same weights after the gradient
    all-reduce and the same ``u``, ``v`` (same ``seed``), so every rank computes the same
    sigma and applies the same clamp, bit for bit. Under FSDP2 (``fully_shard``: the
    weights are sharded ``DTensor`` s) the power iteration runs on the all-gathered
    matrix and each rank scales its own shard by the same factor. Build the schedule
    after ``fully_shard``, which replaces the module's parameter objects.

    Args:
        params_or_module: an ``nn.Module`` (default selection: the ``.weight`` of every
            ``nn.Linear`` and ``nn.Conv1d/2d/3d``, named by module path, e.g.
            ``"layers.0.weight"``), or an iterable of ``(name, tensor)`` pairs or of
            tensors (named ``"0"``, ``"1"``, ...). The schedule keeps references to these
            tensors: replacing a parameter object later (rather than its data, as
            ``module.to(...)`` does) detaches it from the schedule.
        every: renormalize on every ``every``-th :meth:`step`, ``>= 1``.
        target: ``tau > 0``, one float for all, or ``{name_or_fnmatch_pattern: tau}``
            (first matching pattern wins; every selected weight must match one, every
            pattern must match a selected weight).
        n_power_iter: Lanczos steps per renormalization, ``>= 1`` (each costs a product
            with ``W`` and one with ``W^T``, like a power iteration).
        init_power_iter: warm-up Lanczos steps at construction, ``>= 0`` (0: no
            estimate until the first renormalization; :meth:`sigma_tensor` is NaN).
        names: exact names or fnmatch patterns selecting weights among the module's
            ``named_parameters()`` (or the given pairs); each must match something.
        seed: seed of the CPU ``torch.Generator`` that draws the initial ``u``, ``v``,
            so every process of a distributed job gets the same vectors (and sigmas).
        backend: ``None`` (``DEQKERN_SPECTRAL_BACKEND``, default ``auto``), ``"cpp"``
            or ``"torch"``.

    Attributes:
        names: the selected weights' names, in the order of :meth:`sigma_tensor`.
        targets: name -> tau.
        backend: ``"cpp"`` or ``"torch"``.
        step_count: optimizer steps counted by :meth:`step`.
    """

    def __init__(
        self,
        params_or_module: ParamsOrModule,
        *,
        every: int = 4,
        target: Union[float, Mapping[str, float]] = 0.85,
        n_power_iter: int = 2,
        init_power_iter: int = 20,
        names: Optional[Sequence[str]] = None,
        seed: int = 0,
        backend: Optional[str] = None,
    ) -> None:
        self.every = _check_int_at_least(every, "every", 1)
        self.n_power_iter = _check_int_at_least(n_power_iter, "n_power_iter", 1)
        init_power_iter = _check_int_at_least(init_power_iter, "init_power_iter", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.backend, self._impl = _resolve_backend(backend)

        selected = _candidates(params_or_module, names)
        if not selected:
            raise ValueError(
                "params_or_module: no weights selected (a module needs an nn.Linear or nn.Conv1d/2d/3d, "
                "or pass names=)"
            )
        self._check_weights(selected)
        self.names: tuple[str, ...] = tuple(name for name, _ in selected)
        self._weights: list[torch.Tensor] = [weight for _, weight in selected]
        taus = _resolve_targets(target, self.names)
        self.targets: dict[str, float] = dict(zip(self.names, taus))

        self._device = self._weights[0].device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self._us: list[torch.Tensor] = []
        self._vs: list[torch.Tensor] = []
        for weight in self._weights:
            for length, store in ((weight.shape[0], self._us), (weight.numel() // weight.shape[0], self._vs)):
                vec = torch.randn(length, generator=generator, dtype=torch.float32)
                store.append((vec / vec.norm().clamp_min(NORMALIZE_EPS)).to(self._device))
        self._targets = torch.tensor(taus, dtype=torch.float32, device=self._device)
        self.step_count = 0
        self._sigma = torch.full((len(self._weights),), math.nan, dtype=torch.float32, device=self._device)
        if init_power_iter:
            _, self._sigma = self._impl.lanczos_(self._full_weights(), self._us, self._vs, init_power_iter)

    @staticmethod
    def _check_weights(selected: Sequence[Named]) -> None:
        seen: dict[int, str] = {}
        for name, weight in selected:
            if not weight.is_floating_point():
                raise TypeError(f"weight {name!r} must be a floating-point tensor, got dtype {weight.dtype}")
            if weight.dim() < 2:
                raise ValueError(
                    f"weight {name!r} must have at least 2 dimensions (out, in, ...), got shape {tuple(weight.shape)}"
                )
            if weight.numel() == 0:
                raise ValueError(f"weight {name!r} must not be empty, got shape {tuple(weight.shape)}")
            if id(weight) in seen:
                raise ValueError(f"weight {name!r} is the same tensor as {seen[id(weight)]!r}; select it once")
            seen[id(weight)] = name
        devices = {weight.device for _, weight in selected}
        if len(devices) > 1:
            raise ValueError(f"all selected weights must be on one device, got {sorted(map(str, devices))}")

    def _follow_device(self) -> None:
        """Move the vectors along when the weights moved (``module.to(device)``)."""
        devices = {weight.device for weight in self._weights}
        if len(devices) > 1:
            raise RuntimeError(f"the scheduled weights are on several devices {sorted(map(str, devices))}")
        device = devices.pop()
        if device != self._device:
            self._us = [u.to(device) for u in self._us]
            self._vs = [v.to(device) for v in self._vs]
            self._targets = self._targets.to(device)
            self._sigma = self._sigma.to(device)
            self._device = device

    def _full_weights(self) -> list[torch.Tensor]:
        """The whole matrices the power iteration needs: a sharded ``DTensor`` weight
        (FSDP2) is all-gathered -- a collective, which every rank reaches because every
        rank steps its optimizer (and so this schedule) the same number of times."""
        return [w.full_tensor() if _is_dtensor(w) else w for w in self._weights]

    def _local_weights(self) -> list[torch.Tensor]:
        """What each rank rescales in place: its own shard of a ``DTensor`` weight. The
        scale is one number per weight, so scaling every shard by it scales the matrix."""
        return [w.to_local() if _is_dtensor(w) else w for w in self._weights]

    def step(self) -> bool:
        """Count one optimizer step; renormalize if it is an ``every``-th one.

        Returns:
            whether this step renormalized.
        """
        self.step_count += 1
        if self.step_count % self.every:
            return False
        self.apply_now()
        return True

    def apply_now(self) -> torch.Tensor:
        """Renormalize now (estimate, then clamp), whatever the step count.

        A weight holding NaN/Inf has a NaN estimate: on a CPU the clamp raises
        ``ValueError`` (``sigmas[i] must be a finite number``); on a GPU, where values are
        not read back, that weight is left untouched and its scale is NaN.

        Returns:
            scales: float32 ``(k,)`` on the weights' device, ``min(1, tau / sigma)`` per
            weight in the order of :attr:`names`. No host sync.
        """
        self._follow_device()
        with torch.no_grad():
            _, self._sigma = self._impl.lanczos_(self._full_weights(), self._us, self._vs, self.n_power_iter)
            return self._impl.clamp_(self._local_weights(), self._sigma, self._targets)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call :meth:`step` after every ``optimizer.step()``.

        Returns:
            the hook handle; ``handle.remove()`` detaches the schedule.
        """

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.step()

        return optimizer.register_step_post_hook(hook)

    def sigma_tensor(self) -> torch.Tensor:
        """Latest sigma estimates (upper estimates, taken just before the latest clamp, or
        at warm-up).

        Returns:
            float32 ``(k,)`` on the weights' device, order of :attr:`names`. No host sync.
        """
        return self._sigma

    def clamped_sigma_tensor(self) -> torch.Tensor:
        """Each weight's sigma estimate right after the latest clamp: ``min(sigma, tau)``,
        always ``<= tau`` (before the first renormalization: what it would leave).

        Returns:
            float32 ``(k,)`` on the weights' device, order of :attr:`names`; NaN where the
            estimate is (a weight holding NaN/Inf, left untouched). No host sync.
        """
        return torch.minimum(self._sigma, self._targets)

    def drift_tensor(self) -> torch.Tensor:
        """``sigma / tau`` per weight before the latest clamp: how far each weight had grown
        past its target (``> 1``: the clamp shrank it by that factor).

        Returns:
            float32 ``(k,)`` on the weights' device, order of :attr:`names`. No host sync.
        """
        return self._sigma / self._targets

    def sigmas(self) -> dict[str, float]:
        """Latest sigma estimates (:meth:`sigma_tensor`) as ``{name: float}`` (one host sync)."""
        return dict(zip(self.names, self._sigma.tolist()))

    def state_dict(self) -> dict[str, Any]:
        """Step counter, vectors and latest sigmas (copies), enough to resume bit-identically."""
        return {
            "step_count": self.step_count,
            "u": {name: u.clone() for name, u in zip(self.names, self._us)},
            "v": {name: v.clone() for name, v in zip(self.names, self._vs)},
            "sigma": self._sigma.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the selected names must be the same."""
        missing = {"step_count", "u", "v", "sigma"} - set(state_dict)
        if missing:
            raise KeyError(f"state_dict is missing {sorted(missing)}")
        for key in ("u", "v"):
            saved = set(state_dict[key])
            if saved != set(self.names):
                raise ValueError(
                    f"state_dict[{key!r}] has weights {sorted(saved)}, this schedule has {sorted(self.names)}"
                )
        for key, vectors in (("u", self._us), ("v", self._vs)):
            for name, vec in zip(self.names, vectors):
                saved = state_dict[key][name]
                if saved.shape != vec.shape:
                    raise ValueError(
                        f"state_dict[{key!r}][{name!r}] has shape {tuple(saved.shape)}, expected {tuple(vec.shape)}"
                    )
        sigma = state_dict["sigma"]
        if sigma.shape != self._sigma.shape:
            raise ValueError(f"state_dict['sigma'] has shape {tuple(sigma.shape)}, expected {tuple(self._sigma.shape)}")
        for key, vectors in (("u", self._us), ("v", self._vs)):
            for name, vec in zip(self.names, vectors):
                vec.copy_(state_dict[key][name])
        self._sigma = sigma.to(self._sigma.device, torch.float32, copy=True)
        self.step_count = int(state_dict["step_count"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.names)} weights, every={self.every}, "
            f"n_power_iter={self.n_power_iter}, backend={self.backend!r}, step_count={self.step_count})"
        )
