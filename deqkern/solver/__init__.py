"""Fixed-point solver for DEQ layers (Picard, Anderson, Broyden): device-side
convergence, frozen rows, few host syncs, optional CUDA-graph capture, and implicit (IFT)
backward.

Iteration, per row of ``h: (..., d)`` (a "row" is one ``d``-vector): step ``k`` evaluates
``f`` at a point ``x_k`` chosen by the method and commits ``h_k = f(x_k)`` with the residual::

    r_k = ||h_k - x_k||  (stop_mode "abs"),  r_k / (||h_k|| + 1e-30)  ("rel"),  max|h_k - x_k|  ("max")

- ``method="picard"``: ``x_{k+1} = h_k``.
- ``method="anderson"``: ``x_{k+1}`` mixes the row's last ``m`` evaluations with
  weights from a regularized least squares on their residuals (:mod:`.anderson`).
- ``method="broyden"``: ``x_{k+1} = x_k - B_k (h_k - x_k)`` with a low-rank inverse
  Jacobian ``B_k`` updated from the row's secant pairs (:mod:`.broyden`).

Anderson and Broyden keep one history per row, batched on the device; their small
solves are batched ``torch`` calls that never check errors on the host (no sync,
capturable), in float32 for 16-bit iterates. Every method shares the loop's contract and
bookkeeping (:mod:`.loop`).

Residuals are float32 per row, accumulated in float32 (float64 for float64 iterates).
A row whose residual drops below ``tol`` at step ``k`` keeps ``h_k`` from then on (it is
*frozen* by a device-side mask and proposes its committed iterate to every later step),
so its answer never depends on slower rows as long as ``f`` acts row by row. A row
whose residual becomes NaN/Inf is frozen too, at the step that produced it, so the
first bad iteration can be read back later. ``return_iterate="lowest"`` returns each
row's lowest-residual iterate instead of its last (the same for a converged row).

Host synchronization. The loop itself never waits for the GPU. Every ``check_every``
iterations (and after the last one) it reads back four numbers in one transfer
(:func:`host_check`): how many rows are unconverged (all converged -> stop early), and
whether and when a non-finite residual appeared (-> :class:`NonFiniteError`).
``DEFAULT_CHECK_EVERY = 4``: a check costs one sync, i.e. the GPU queue drains and the
CPU must refill it (tens of microseconds on an H100); checking less often wastes up to
``check_every - 1`` iterations after convergence. With n iterations, sync cost s and
iteration cost t the total overhead ``n*s/c + (c-1)*t/2`` is smallest at
``c = sqrt(2*n*s/t)``: for n ~ 20 and s/t between 0.2 (large GPU-bound solves) and 1
(launch-bound ones) that is 3 to 6. 4 also divides the default ``max_iter=20``. It is a
default to be re-measured on the target GPU (``bench/bench_solve.py``).

``graph=True`` (CUDA only) captures the whole ``max_iter`` loop, with its bookkeeping and
the ``info`` statistics, in one CUDA graph and replays it: no early exit (converged rows
are frozen by masks), no host sync at all with ``on_nonconvergence="ignore"``, one at the
end otherwise. Graphs are cached per ``f`` (weakly: a graph dies with its ``f``) and per
``(shape, dtype, device, max_iter, tol, stop_mode)``. Requirements, because a replay
re-runs the recorded kernels on the recorded addresses:

- ``f`` must be capturable: no host syncs (``.item()``, printing tensors,
  data-dependent shapes) and no CPU tensors.
- Every tensor ``f`` reads must live at the same address at every call. Updating
  weights in place (what optimizers do) is fine; rebinding them to new tensors is not.
  Tensors reachable from ``f`` (closure cells, globals it names, default arguments,
  ``functools.partial`` arguments, the parameters, buffers and tensor attributes of an
  ``nn.Module`` that ``f`` is, is bound to, or refers to, and the same for functions it
  refers to, three levels deep) are guarded: if any moved, the graph is re-captured
  (with a warning, since recapturing every call is slow). Tensors ``f`` reaches any
  other way (attributes of plain objects, ``self.x`` inside a module's methods when
  ``x`` is not a tensor attribute of that module) are not guarded.
  Per-call inputs such as a frozen context should be ``copy_``-ed into a persistent
  buffer that ``f`` reads.
- ``f`` may return any tensor: :func:`solve` never writes into it (the bookkeeping
  writes the committed iterate into a tensor of its own, one more write per step);
  :func:`solve_fused`'s step must return a new tensor private to the solver, which
  writes frozen rows into it in place.

With a custom adjoint (:func:`solve_fused`'s ``adjoint``), ``graph=True`` also captures the
whole ``b_max_iter`` adjoint solve, the adjoint's set-up included, in a second graph cached
with the first; ``h*``, the incoming gradient and the factory's declared per-call tensors
(``adjoint.extra_inputs``, rebound with ``adjoint.rebind(*static)``) are copied into its
static inputs at each replay, and other tensors the factory closes over are guarded like
``f``'s.

Backward modes (the forward solve runs under ``no_grad`` except for ``"unrolled"``):

- ``"ift"``: exact implicit differentiation. One application ``f_out = f(h_in)``,
  ``h_in = h*.detach().requires_grad_()``, is recorded with autograd. Backward solves
  ``g = (df/dh)^T g + dL/dh*`` with the same device-side iteration (``b_max_iter``,
  ``b_tol``, same stop mode, frozen rows, ``check_every`` syncs; 16-bit gradients are
  iterated in float32), then sends ``g`` through the recorded ``f_out``, which yields the
  parameter gradients (autograd also forms one unused ``(df/dh)^T g`` for ``h_in``).
  Memory: one ``f`` graph plus one copy of ``h*`` (the returned tensor, so that in-place
  use of it cannot corrupt what ``f`` saved), independent of both iteration counts.
- ``"onestep"``: Jacobian-free: gradients of one ``f(h*.detach())``, as if ``h*`` were a
  constant input (JFB / torchdeq's default 1-step gradient).
- ``"unrolled"``: plain autograd through every iteration (memory grows with the
  iteration count; the reference the tests compare against).

The returned ``h_star`` *value* is always a committed iterate ``h_k`` itself, not
``f(h_k)``; with ``"ift"``/``"onestep"`` its gradient flows into the recorded ``f_out``.
``h0`` receives no gradient from ``"ift"``/``"onestep"`` (the fixed point does not
depend on the starting point).

Non-convergence is never silent: ``on_nonconvergence="warn"`` (:class:`ConvergenceWarning`),
``"raise"`` (:class:`ConvergenceError`) or ``"ignore"``. NaN/Inf always raises
:class:`NonFiniteError` (a ``ConvergenceError`` and a ``FloatingPointError``) naming the
first bad iteration -- with one exception: ``graph=True`` together with ``"ignore"``
promises no host sync, so there the blow-up is only reported through ``info``
(``info["nonfinite_iter"] > 0``, NaN ``residual``, ``converged`` False). Inside an
external CUDA-graph capture the solver runs the full ``max_iter`` without checks and
enforces no policy (it cannot sync); read ``info`` afterwards.

Fused steps. :func:`solve_fused` takes ``step(h) -> (h_next, residual)`` for layers whose
kernel already computes the per-row float32 residual (``deqkern.frozen_rmsnorm_update``):
the solver then never recomputes it. Same keyword arguments as :func:`solve`.

Bookkeeping kernel. One Triton kernel per iteration (:mod:`deqkern.ops.commit`) freezes
converged rows, computes the residual when the step does not provide one, updates the
per-row statistics and keeps the lowest-residual iterate when asked; its eager twin
serves float64, autograd (``"unrolled"``) and CPUs (the ``auto`` backend never picks the
Triton interpreter).

Layout: ``config`` (arguments, validation, autocast), ``loop`` (the loop every method
shares, host checks, policies, ``info``), ``anderson`` and ``broyden`` (their per-row
histories and proposals), ``capture`` (CUDA graphs and their guards), ``adjoint`` (the
implicit backward), ``api`` (:func:`solve`, :func:`solve_fused`).
"""


from deqkern.solver.api import solve, solve_fused
from deqkern.solver.capture import clear_graph_cache
from deqkern.solver.cell import solve_cell
from deqkern.solver.config import DEFAULT_CHECK_EVERY, DEFAULT_LAM, DEFAULT_M, METHODS
from deqkern.solver.errors import ConvergenceError, ConvergenceWarning, NonFiniteError

__all__ = [
    "solve",
    "solve_fused",
    "solve_cell",
    "ConvergenceError",
    "NonFiniteError",
    "ConvergenceWarning",
    "clear_graph_cache",
    "DEFAULT_CHECK_EVERY",
    "DEFAULT_M",
    "DEFAULT_LAM",
    "METHODS",
]
