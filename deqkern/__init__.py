"""deqkern: fast, trustworthy Deep Equilibrium layers for PyTorch."""

from deqkern._backend import last_backend
from deqkern.functional import frozen_rmsnorm_update
from deqkern.solver import ConvergenceError, ConvergenceWarning, NonFiniteError, solve, solve_cell, solve_fused
from deqkern.spectral import SpectralNormSchedule
from deqkern import nn  # noqa: E402  (after the functions it uses)
from deqkern.patching import patch, unpatch

__all__ = [
    "frozen_rmsnorm_update", "last_backend", "solve", "solve_cell", "solve_fused", "SpectralNormSchedule",
    "ConvergenceError", "ConvergenceWarning", "NonFiniteError", "nn", "patch", "unpatch", "compat",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``deqkern.compat`` (with its ``torchdeq`` adapter) on first access, so that
    ``deqkern.compat.torchdeq.register()`` works after a plain ``import deqkern``. The
    adapter imports torchdeq itself only when ``register()`` runs."""
    if name == "compat":
        import importlib

        importlib.import_module("deqkern.compat.torchdeq")
        return importlib.import_module("deqkern.compat")
    raise AttributeError(f"module 'deqkern' has no attribute {name!r}")
