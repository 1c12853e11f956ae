"""Pure-torch twin of ``deqkern._C`` (csrc/spectral.cpp): spectral-norm estimate and clamp.

Same checks, same messages and the same ATen ops in the same order as the C++ (results
agree to float32 rounding); the tests compare the two. :mod:`deqkern.spectral` uses this
module when the extension is not built.

Estimate (:func:`lanczos_reference`), per weight ``W`` (any float dtype, viewed as the
float32 matrix ``(rows, cols) = (out, numel / out)``), from its unit vector ``v_0 = vs[i]``:
Golub-Kahan-Lanczos bidiagonalization, ``P = min(2 n_iter + 1, 2 rows + 1, 2 cols)``
products alternating ``W`` and ``W^T``, each result orthogonalized against the earlier
vectors of its side (classical Gram-Schmidt, twice) and normalized::

    alpha_j u_j     = W v_j   - sum_{i<j}  (u_i . W v_j)   u_i
    beta_j  v_{j+1} = W^T u_j - sum_{i<=j} (v_i . W^T u_j) v_i

The first ``P - 1`` coefficients form ``K = U^T W V`` (upper bidiagonal, ``a x b`` with
``a = floor(P/2)``, ``b = ceil(P/2)``): ``W`` restricted to two Krylov spaces. The last
product's norm ``c`` measures what leaves them. With ``(theta, s, t)`` the top singular
triplet of ``K`` (``s``: top eigenvector of ``K^T K`` by repeated squaring in float64,
``t = K s / theta``), the new vectors are ``v = V s`` and ``u = U t``, and::

    ritz  = theta                            <= sigma_1(W)   (the norm of a projection)
    bound = theta + sqrt((|K^T t - theta s|^2 + (c * last)^2) / 2)

``last`` is ``s_b`` for odd ``P`` (the last product was ``W v_b``), ``t_a`` for even ``P``.
``bound - theta`` is the residual norm of the unit vector ``[v; u] / sqrt(2)`` for the
symmetric matrix ``[[0, W^T], [W, 0]]`` (eigenvalues ``+-sigma_i`` and 0), whose Rayleigh
quotient is ``theta``: some singular value of ``W`` lies within ``bound - theta`` of
``theta``, and when that is ``sigma_1`` (the Ritz pair approximates the top pair),
``sigma_1 <= bound``. ``n_iter = 1`` costs three products (``W v``, ``W^T u``, ``W v``),
the same as one power iteration and its Rayleigh quotient, and ``ritz`` is then exactly
the power iteration's ``sigma = u . W v``.

Clamp (:func:`clamp_reference`): ``W_i <- W_i * min(1, targets_i / sigmas_i)``, in float32.
Bad values never corrupt a weight: host values (CPU tensors, lists) are checked and raise
``ValueError``; values on a GPU are not read back (that would wait for the device every
clamp): a weight whose sigma is not finite or ``< 0``, or whose target is not finite and
``> 0``, is left untouched and its returned scale is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

__all__ = ["lanczos_reference", "clamp_reference"]

#: Same eps as ``torch.nn.utils.spectral_norm`` / ``F.normalize``: vectors are divided by
#: ``max(||x||, NORMALIZE_EPS)``.
NORMALIZE_EPS = 1e-12
#: Squarings of ``K^T K`` (trace-normalized every 4th): ``2^24`` power steps separate top
#: singular values of ``K`` that differ by more than ~1e-6 relative; closer ones agree to
#: that accuracy, and the bound's residual accounts for any mixture of their vectors.
GRAM_SQUARINGS = 24
#: float64 guard against 0/0 only (the small matrices are float64).
TINY = 1e-300


# --------------------------------------------------------------------------- checks
def _check_weights(weights: Sequence[torch.Tensor]) -> None:
    device = weights[0].device
    for i, weight in enumerate(weights):
        if not weight.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating-point tensor, got {weight.dtype}")
        if weight.dim() < 2:
            raise ValueError(f"weights[{i}] must have at least 2 dimensions, got shape {tuple(weight.shape)}")
        if weight.numel() == 0:
            raise ValueError(f"weights[{i}] must not be empty, got shape {tuple(weight.shape)}")
        if weight.device != device:
            raise ValueError(f"weights[{i}] is on {weight.device} but weights[0] is on {device}; "
                             "all weights of one call must share a device")


def _check_length(n_weights: int, values: Sequence, what: str) -> None:
    if len(values) != n_weights:
        raise ValueError(f"{what} has {len(values)} entries, expected one per weight ({n_weights})")


def _check_vector(vec: torch.Tensor, what: str, i: int, length: int, device: torch.device) -> None:
    if vec.dtype != torch.float32:
        raise TypeError(f"{what}[{i}] must be float32, got {vec.dtype}")
    if vec.dim() != 1 or vec.shape[0] != length:
        raise ValueError(f"{what}[{i}] must have shape ({length},) to match weights[{i}], got {tuple(vec.shape)}")
    if vec.device != device:
        raise ValueError(f"{what}[{i}] is on {vec.device} but weights[{i}] is on {device}")
    if not vec.is_contiguous():
        raise ValueError(f"{what}[{i}] must be contiguous (it is written in place)")


def _check_disjoint(named: Sequence[tuple[str, torch.Tensor, bool]]) -> None:
    """Raise if a written tensor (flag True) shares memory with any other tensor.

    Memory of a tensor: the bytes from its first to its last element. A sweep over the
    tensors sorted by (start, argument order) compares each with the one reaching
    furthest so far, which finds an overlap involving a written tensor if there is one.
    """
    spans = []
    for order, (name, tensor, written) in enumerate(named):
        start = tensor.data_ptr()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        spans.append((start, order, start + extent * tensor.element_size(), name, written))
    spans.sort()
    reach = None
    for start, order, end, name, written in spans:
        if reach is not None and start < reach[0] and (written or reach[3]):
            first, second = sorted([(reach[1], reach[2]), (order, name)])
            raise ValueError(f"{first[1]} and {second[1]} overlap in memory; a tensor written in place must "
                             "not share memory with any other argument")
        if reach is None or end > reach[0]:
            reach = (end, order, name, written)


def _check_values(values: Sequence[float], what: str, allow_zero: bool) -> None:
    for i, value in enumerate(values):
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise ValueError(f"{what}[{i}] must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                             f"got {value:.6g}")


# --------------------------------------------------------------------------- estimate
def _products(n_iter: int, rows: int, cols: int) -> int:
    """Products of the bidiagonalization: ``2 n_iter + 1``, fewer where ``K``'s bases
    (``floor(P/2)`` vectors of length ``rows``, ``ceil(P/2)`` of length ``cols``) would
    not fit."""
    return min(2 * n_iter + 1, 2 * rows + 1, 2 * cols)


def _unit_or(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` normalized; a row with zero or non-finite norm keeps ``fallback``'s."""
    norm = torch.linalg.vector_norm(x, dim=1)
    keep = torch.isfinite(norm) & (norm > 0)
    return torch.where(keep[:, None], x / norm.clamp_min(NORMALIZE_EPS)[:, None], fallback)


class _Run(NamedTuple):
    """The weights of one matrix shape, estimated together (every op but the products batched)."""

    members: list[int]  # their indices in ``weights``, g of them
    start: torch.Tensor  # (g, cols) start vectors
    n_products: int
    v_basis: torch.Tensor  # (g, b, cols), one basis vector per row
    u_basis: torch.Tensor  # (g, a, rows)
    k_matrix: torch.Tensor  # (g, a, b) float64
    last_norm: torch.Tensor  # (g,) the last product's norm


def _bidiagonalize(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], members: list[int],
                   n_iter: int) -> _Run:
    """Golub-Kahan for the weights ``members`` (one shape), from their ``vs``."""
    rows = weights[members[0]].shape[0]
    cols = weights[members[0]].numel() // rows
    matrices = [weights[i].reshape(rows, cols).to(torch.float32) for i in members]
    transposed = [matrix.t() for matrix in matrices]
    start = torch.stack([vs[i] for i in members])
    n_products = _products(n_iter, rows, cols)
    g, a, b = len(members), n_products // 2, (n_products + 1) // 2
    v_basis = start.new_zeros(g, b, cols)
    u_basis = start.new_zeros(g, a, rows)
    coef = start.new_empty(g, n_products)  # alpha_0, beta_0, alpha_1, ... in product order
    v_basis[:, 0] = start
    for p in range(n_products):
        j = p // 2
        if p % 2 == 0:
            out, basis, slot, source = start.new_empty(g, rows), u_basis, j, v_basis[:, j]
            for i, matrix in enumerate(matrices):
                torch.mv(matrix, source[i], out=out[i])
        else:
            out, basis, slot, source = start.new_empty(g, cols), v_basis, j + 1, u_basis[:, j]
            for i, matrix in enumerate(transposed):
                torch.mv(matrix, source[i], out=out[i])
        if p > 0:  # columns not filled yet are zero and remove nothing
            for _ in range(2):
                row = out[:, None]  # (g, 1, n): row-vector products are the fast bmm layout
                out = torch.baddbmm(row, torch.bmm(row, basis.transpose(1, 2)), basis, alpha=-1)[:, 0]
        norm = torch.linalg.vector_norm(out, dim=1)
        coef[:, p] = norm
        if slot < basis.shape[1]:
            basis[:, slot] = out / norm.clamp_min(NORMALIZE_EPS)[:, None]
    k_matrix = torch.zeros(g, a, b, dtype=torch.float64, device=start.device)
    k_matrix.diagonal(0, 1, 2).copy_(coef[:, 0:2 * a:2])
    k_matrix.diagonal(1, 1, 2).copy_(coef[:, 1:2 * min(a, b - 1):2])
    return _Run(members, start, n_products, v_basis, u_basis, k_matrix, coef[:, n_products - 1])


def _top_right_vectors(k_matrix: torch.Tensor) -> torch.Tensor:
    """Unit top eigenvectors of ``K^T K`` ``(k, b)`` for ``K (k, a, b)`` float64; ``e_1``
    where ``K`` is zero."""
    gram = torch.bmm(k_matrix.transpose(1, 2), k_matrix)
    for i in range(GRAM_SQUARINGS):
        if i % 4 == 0:  # eigenvalues in [1/b, 1] after, >= b^-16 four squarings later
            gram = gram / gram.diagonal(0, 1, 2).sum(1).clamp_min(TINY)[:, None, None]
        gram = torch.bmm(gram, gram)
    column = gram.diagonal(0, 1, 2).argmax(1)
    vec = torch.gather(gram, 2, column[:, None, None].expand(-1, gram.shape[1], 1))[:, :, 0]
    first = torch.zeros_like(vec)
    first[:, 0] = 1.0
    return _unit_or(vec, first)


def _finish(run: _Run, s: torch.Tensor, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]):
    """Ritz value and bound ``(g,)`` each (float64) from ``K``'s top right vectors ``s``
    ``(g, b)``; writes the Ritz vectors into the run's ``us`` and ``vs``."""
    _, a, b = run.k_matrix.shape
    ks = torch.bmm(run.k_matrix, s[:, :, None])[:, :, 0]
    theta = torch.linalg.vector_norm(ks, dim=1)
    t = ks / theta.clamp_min(TINY)[:, None]
    inner = torch.linalg.vector_norm(torch.bmm(run.k_matrix.transpose(1, 2), t[:, :, None])[:, :, 0]
                                     - theta[:, None] * s, dim=1)
    last = s[:, b - 1] if run.n_products % 2 else t[:, a - 1]
    margin = torch.sqrt((inner.square() + (run.last_norm.double() * last).square()) / 2)
    new_v = _unit_or(torch.bmm(s.float()[:, None], run.v_basis)[:, 0], run.start)
    group_us, group_vs = [us[i] for i in run.members], [vs[i] for i in run.members]
    new_u = _unit_or(torch.bmm(t.float()[:, None], run.u_basis)[:, 0], torch.stack(group_us))
    torch._foreach_copy_(group_vs, new_v.unbind(0))
    torch._foreach_copy_(group_us, new_u.unbind(0))
    return theta, theta + margin


@torch.no_grad()
def lanczos_reference(
    weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], n_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral-norm estimate per weight (module docstring); ``deqkern._C.lanczos_`` in torch.

    Args:
        weights: ``k`` float tensors ``(out_i, ...)`` on one device, read only.
        us: ``k`` float32 ``(out_i,)``: overwritten with the left Ritz vectors.
        vs: ``k`` float32 ``(numel_i / out_i,)`` unit start vectors, overwritten with the
            right Ritz vectors (warm start of the next call).
        n_iter: ``>= 1``; ``2 n_iter + 1`` products with the weight per call.

    Returns:
        ``(ritz, bound)``: float32 ``(k,)`` each on the weights' device; ``ritz <= sigma_1``,
        ``bound`` the upper estimate the schedule clamps with. No host sync. A vector
        whose update is zero or not finite (zero or NaN weight) keeps its old value.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, or a vector sharing memory
        with a weight or another vector.
    """
    _check_length(len(weights), us, "us")
    _check_length(len(weights), vs, "vs")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int):
        raise TypeError(f"n_iter must be an int >= 1, got {type(n_iter).__name__} {n_iter!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if not weights:
        return torch.empty(0), torch.empty(0)
    _check_weights(weights)
    device = weights[0].device
    for i, weight in enumerate(weights):
        _check_vector(us[i], "us", i, weight.shape[0], device)
        _check_vector(vs[i], "vs", i, weight.numel() // weight.shape[0], device)
    _check_disjoint([(f"weights[{i}]", w, False) for i, w in enumerate(weights)]
                    + [(f"us[{i}]", u, True) for i, u in enumerate(us)]
                    + [(f"vs[{i}]", v, True) for i, v in enumerate(vs)])

    groups: dict[tuple[int, int], list[int]] = {}
    for i, weight in enumerate(weights):
        groups.setdefault((weight.shape[0], weight.numel() // weight.shape[0]), []).append(i)
    runs = [_bidiagonalize(weights, vs, members, n_iter) for members in groups.values()]
    a_max = max(run.k_matrix.shape[1] for run in runs)
    b_max = max(run.k_matrix.shape[2] for run in runs)
    right = _top_right_vectors(torch.cat([
        torch.nn.functional.pad(run.k_matrix, (0, b_max - run.k_matrix.shape[2], 0, a_max - run.k_matrix.shape[1]))
        for run in runs]))
    ritz: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    bound: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    offset = 0
    for run in runs:
        g, _, b = run.k_matrix.shape
        theta, upper = _finish(run, right[offset:offset + g, :b], us, vs)
        offset += g
        for row, i in enumerate(run.members):
            ritz[i], bound[i] = theta[row], upper[row]
    return torch.stack(ritz).float(), torch.stack(bound).float()


# --------------------------------------------------------------------------- clamp
@torch.no_grad()
def clamp_reference(
    weights: Sequence[torch.Tensor], sigmas: torch.Tensor, targets: Union[torch.Tensor, Sequence[float]]
) -> torch.Tensor:
    """``W_i <- W_i * min(1, targets_i / sigmas_i)`` in place; ``deqkern._C.clamp_`` in torch.

    Args:
        weights: ``k`` float tensors on one device, pairwise disjoint in memory.
        sigmas: ``(k,)`` floating tensor, values finite and ``>= 0``.
        targets: ``(k,)`` floating tensor or ``k`` floats, values finite and ``> 0``.

    Returns:
        scales: float32 ``(k,)`` on the weights' device; NaN for a weight left untouched
        because its sigma or target (on a GPU, where values are not checked) was bad.
        No host sync. half/bfloat16 weights are scaled in float32 and rounded once.

    Raises:
        ValueError: bad shapes, overlapping weights, or bad values in a CPU tensor or list.
    """
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a tensor, got {type(sigmas).__name__}")
    if not isinstance(targets, torch.Tensor):
        targets = torch.tensor([float(t) for t in targets], dtype=torch.float64).to(torch.float32)
    k = len(weights)
    for name, tensor in (("sigmas", sigmas), ("targets", targets)):
        if tensor.dim() != 1 or tensor.shape[0] != k:
            raise ValueError(f"{name} must have shape ({k},), one per weight, got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not weights:
        return torch.empty(0)
    _check_weights(weights)
    _check_disjoint([(f"weights[{i}]", w, True) for i, w in enumerate(weights)])
    for name, tensor, allow_zero in (("sigmas", sigmas, True), ("targets", targets, False)):
        if tensor.device.type == "cpu":
            _check_values(tensor.double().tolist(), name, allow_zero)

    device = weights[0].device
    sig = sigmas.to(device, torch.float32, non_blocking=True)
    tau = targets.to(device, torch.float32, non_blocking=True)
    valid = torch.isfinite(sig) & (sig >= 0) & torch.isfinite(tau) & (tau > 0)
    scales = torch.where(valid, (tau / sig).clamp_max(1.0), math.nan)
    applied = scales.nan_to_num(nan=1.0)
    for weight, scale in zip(weights, applied):
        if weight.dtype in (torch.float32, torch.float64):
            weight.mul_(scale)
        else:
            # A half/bfloat16 multiply would round the scale to the weight dtype first.
            weight.copy_(weight.to(torch.float32).mul_(scale))
    return scales
