"""Adapters that plug deqkern into other DEQ libraries without changing user code.

- :mod:`deqkern.compat.torchdeq`: ``register()`` adds deqkern's solvers to torchdeq's
  solver registry (``get_deq(f_solver="deqkern" | "deqkern_anderson" | "deqkern_broyden",
  b_solver=...)``) and to ``add_deq_args``' choices. torchdeq is an optional dependency,
  imported only when ``register()`` runs.
"""
