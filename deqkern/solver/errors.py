"""The solver's exceptions and warning."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["ConvergenceError", "NonFiniteError", "ConvergenceWarning"]


class ConvergenceError(RuntimeError):
    """The solve did not reach ``tol`` in every row (``on_nonconvergence="raise"``).

    Attributes: ``unconverged`` (row count), ``max_residual`` (float), ``info`` (the
    solve's info dict, device tensors).
    """

    def __init__(self, message: str, *, unconverged: int = 0, max_residual: float = math.nan,
                 info: Optional[dict] = None):
        super().__init__(message)
        self.unconverged = unconverged
        self.max_residual = max_residual
        self.info = info


class NonFiniteError(ConvergenceError, FloatingPointError):
    """An iterate became NaN/Inf. ``iteration`` is the first (1-based) step that produced
    a non-finite residual; ``rows`` the number of rows affected. Always raised, whatever
    ``on_nonconvergence`` says (except ``graph=True`` with ``"ignore"``, see module doc)."""

    def __init__(self, message: str, *, iteration: int, rows: int, info: Optional[dict] = None):
        super().__init__(message, unconverged=rows, info=info)
        self.iteration = iteration
        self.rows = rows


class ConvergenceWarning(RuntimeWarning):
    """Issued by ``on_nonconvergence="warn"`` when some rows did not reach ``tol``."""

