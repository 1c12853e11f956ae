"""deqkern: fast, trustworthy Deep Equilibrium layers for PyTorch."""

from deqkern._backend import last_backend
from deqkern.functional import frozen_rmsnorm_update
from deqkern.spectral import SpectralNormSchedule

__all__ = ["frozen_rmsnorm_update", "last_backend", "SpectralNormSchedule"]
__version__ = "0.1.0"
