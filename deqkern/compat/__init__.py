"""Adapters that plug deqkern into other DEQ libraries without changing user code.

- :mod:`deqkern.compat.torchdeq`: ``register()`` adds deqkern's solver to torchdeq's
  solver registry (``get_deq(f_solver="deqkern", b_solver="deqkern")``). torchdeq is an
  optional dependency, imported only when ``register()`` runs.
"""
