"""The persistent whole-solve kernels (forward and adjoint) against their eager twins, a
float64 fixed point, and the loop path (GEMM + fused update + commit kernel).

Rows converge at different iterations (frozen scaled per row changes each row's
contraction); R is not a multiple of the kernels' 16-row blocks; d includes 1, 3 and odd
non-powers of two. Tolerances: a solve stops within ``tol`` of its fixed point, so the
iterates are compared per row in norm, against twice the eager twin's own error (the
numerics.py rule, row-wise) plus a few units of the storage dtype."""

import math

import pytest
import torch

from deqkern.functional import update_with_stats
from deqkern.ops import persistent, persistent_adjoint, persistent_split
from deqkern.ops.commit import FLT_MAX
from deqkern.solver import solve_fused
from deqkern.solver.report import read_check
from deqkern.solver.loop import check_vector, host_check
from numerics import case_seed

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EPS, DAMPING = 1e-6, 0.8
#: Tolerances each storage dtype can reach (16-bit rounding noise is ~1e-3 relative).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
UNIT = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: float32 rounding noise of a residual near convergence (a few ulps of |h| ~ 1), far below TOL.
NOISE = 4 * 2.0**-23


def make_cell(n_rows, d, dtype, gen, sigma=0.5, device="cpu"):
    """weight (||W||_2 = sigma), frozen scaled per row from 1 to 4 (a different
    contraction per row), gain, h0, in ``dtype``; and the same values in float64 (the
    problem the kernels solve, so the float64 reference carries no input rounding)."""
    w = torch.randn(d, d, generator=gen, dtype=torch.float64)
    w = sigma * w / torch.linalg.matrix_norm(w, 2)
    scale = torch.linspace(1.0, 4.0, n_rows, dtype=torch.float64)[:, None]
    frozen = torch.randn(n_rows, d, generator=gen, dtype=torch.float64) * scale
    gain = 1 + 0.2 * torch.randn(d, generator=gen, dtype=torch.float64)
    h0 = torch.randn(n_rows, d, generator=gen, dtype=torch.float64)
    cast = [t.to(device=device, dtype=dtype) for t in (w, frozen, gain, h0)]
    return [t.double() for t in cast], cast


def fixed_point64(w, frozen, gain, h0):
    h, state, _, _ = persistent.solve_reference(w, frozen, gain, h0, EPS, DAMPING, 400, 1e-14, "rel", False)
    assert bool((state.residual < 1e-14).all())
    return h


def row_err(h, ref):
    return (h.double().cpu() - ref.cpu()).norm(dim=-1) / ref.cpu().norm(dim=-1)


def assert_rows_close(out, eager, ref, dtype, what, units=8, states=None):
    """Row-wise: ||out - ref|| <= 2 ||eager - ref|| + units * unit(dtype) * ||ref||.
    ``states``: the kernel's and the eager twin's RowState. A row the kernel stopped an
    iteration before the eager twin (its last step fell under tol first: the nstep may
    differ by one) is as far from the fixed point as its last step allows, not as the
    twin's one more step: 2 * its relative residual more (the cell contracts by < 2/3)."""
    err, bound = row_err(out, ref), 2 * row_err(eager, ref) + units * UNIT[dtype]
    if states is not None:
        state, state_e = states
        earlier = (state.nstep < state_e.nstep).cpu()
        bound = bound + torch.where(earlier, 2 * state.residual.double().cpu(), 0.0)
    worst = int((err - bound).argmax())
    steps = "" if states is None else f" (nstep {int(states[0].nstep[worst])}, eager {int(states[1].nstep[worst])})"
    assert bool((err <= bound).all()), f"{what} ({dtype}): row {worst} error {err[worst]:.3e} > {bound[worst]:.3e}{steps}"


class Kernels:
    """One pair of one-launch kernels: the whole-row block kernels, or the split kernels
    (:mod:`deqkern.ops.persistent_split`; under the interpreter with SPLIT 1) with their
    own tile choice ("split") or with the product as a loop over K tiles ("split-kloop"),
    each with the forward's exchange of the iterate (two barriers an iteration, "-h") or
    of z (one, "-z"; the adjoint has one kind)."""

    def __init__(self, name):
        self.name = name

    def solve(self, *args, **kwargs):
        if self.name == "block":
            return persistent.solve_triton(*args, **kwargs)
        return persistent_split.solve_split(*args, **kwargs, config=self._config(args[3]))

    def adjoint(self, *args, **kwargs):
        if self.name == "block":
            return persistent_adjoint.adjoint_triton(*args, **kwargs)
        return persistent_split.adjoint_split(*args, **kwargs, config=self._config(args[3]))

    def _config(self, h):
        d = h.shape[-1]
        config = persistent_split.config_of(h.numel() // d, d, h)
        if config is None:
            pytest.skip(f"no split tile for d={d} at this size (the dispatcher takes the block kernel)")
        config = {**config, "EXCHANGE": self.name.rsplit("-", 1)[1]}
        return {**config, "ONE_DOT": False} if "kloop" in self.name else config


@pytest.fixture(params=["block", "split-h", "split-z", "split-kloop-h", "split-kloop-z"])
def kernel(request) -> Kernels:
    return Kernels(request.param)


@pytest.fixture(params=["block", "split-h", "split-kloop-h"])
def adjoint_kernel(request) -> Kernels:
    """The kernels of the adjoint alone (it has one exchange: "-z" would run "-h" again)."""
    return Kernels(request.param)


CASES = [(21, 20, "rel", True), (5, 3, "abs", False), (19, 33, "max", True), (3, 1, "rel", False)]


@pytest.mark.parametrize("n_rows,d,stop_mode,with_rstd", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_parity(kernel, dtype, n_rows, d, stop_mode, with_rstd, device):
    gen = torch.Generator().manual_seed(case_seed("fwd", dtype, n_rows, d, stop_mode))
    f64, cast = make_cell(n_rows, d, dtype, gen, device=device)
    tol, max_iter = TOL[dtype], 25
    h, state, rstd, _ = kernel.solve(*cast, EPS, DAMPING, max_iter, tol, stop_mode, with_rstd)
    h_e, state_e, _, _ = persistent.solve_reference(*cast, EPS, DAMPING, max_iter, tol, stop_mode, with_rstd)

    assert h.dtype == dtype and h.shape == (n_rows, d)
    converged = state.residual < tol
    assert bool(converged.all()), f"rows {torch.nonzero(~converged).flatten().tolist()} did not converge"
    if n_rows > 5:
        assert len(set(state.nstep.tolist())) >= 2, "rows should converge at different iterations"
    assert bool((state.lowest <= state.residual).all()) and bool((state.prev > state.residual).all())
    # the eager twin makes the same decisions (16-bit: the interpreter truncates stores, torch
    # rounds to nearest, so a row may take one step more or less)
    slack = 0 if dtype == torch.float32 else 1
    assert int((state.nstep - state_e.nstep).abs().max()) <= slack
    if dtype == torch.float32:
        torch.testing.assert_close(state.residual, state_e.residual, rtol=1e-3, atol=NOISE)
        torch.testing.assert_close(h, h_e, rtol=1e-5, atol=1e-6)
    assert_rows_close(h, h_e, fixed_point64(*f64), dtype, "h_star")
    if with_rstd:  # rstd of the returned iterate's z, against float64 at that iterate
        z64 = h.double() @ f64[0].T + f64[1]
        torch.testing.assert_close(rstd.double(), torch.rsqrt(z64.pow(2).mean(-1) + EPS), rtol=1e-5, atol=0)
    else:
        assert rstd is None


@pytest.mark.parametrize("n_rows,d", [(21, 20), (5, 3), (19, 33)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adjoint_parity(adjoint_kernel, dtype, n_rows, d, device):
    gen = torch.Generator().manual_seed(case_seed("adj", dtype, n_rows, d))
    f64, cast = make_cell(n_rows, d, dtype, gen, device=device)
    w64, frozen64, gain64, _ = f64
    h_star = fixed_point64(*f64).to(dtype)
    v = torch.randn(n_rows, d, generator=gen).to(device) * torch.logspace(-3, 3, n_rows)[:, None].to(device)
    args = (cast[0], cast[1], cast[2], h_star, v, EPS, DAMPING, 30, TOL[dtype])
    g, state, dz, rstd, d_gain = adjoint_kernel.adjoint(*args)[:5]
    g_e, state_e = persistent_adjoint.adjoint_reference(*args)[:2]
    g64, state64 = persistent_adjoint.adjoint_reference(w64, frozen64, gain64, h_star.double(), v.double(), EPS,
                                                        DAMPING, 400, 1e-14)[:2]
    assert bool((state64.residual < 1e-14).all())

    assert g.dtype == torch.float32 and dz.dtype == dtype
    assert bool((state.residual < TOL[dtype]).all())
    slack = 0 if dtype == torch.float32 else 1
    assert int((state.nstep - state_e.nstep).abs().max()) <= slack
    assert_rows_close(g, g_e, g64, dtype, "g")
    assert_adjoint_outputs(g, dz, rstd, d_gain, h_star, f64, dtype)


def assert_adjoint_outputs(g, dz, rstd, d_gain, h_star, f64, dtype):
    """dz, rstd and d_gain are functions of the returned g (and h*): check them at it in float64."""
    w64, frozen64, gain64, _ = f64
    z64 = h_star.double() @ w64.T + frozen64
    rstd64 = torch.rsqrt(z64.pow(2).mean(-1, keepdim=True) + EPS)
    n64 = z64 * rstd64
    dyg = DAMPING * g.double() * gain64
    dz64 = rstd64 * (dyg - n64 * (dyg * n64).mean(-1, keepdim=True))
    torch.testing.assert_close(rstd.double(), rstd64.squeeze(-1), rtol=1e-5, atol=0)
    assert_rows_close(dz, dz64, dz64, dtype, "dz", units=2)
    d_gain64 = DAMPING * (g.double() * n64).sum(0)
    torch.testing.assert_close(d_gain.double(), d_gain64, rtol=1e-4, atol=1e-4 * float(d_gain64.abs().max()))


def counts(check):
    return check.unconverged, check.first_bad_iter, check.bad_rows


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nonfinite_row_and_max_iter(kernel, device):
    """A NaN row freezes at step 1 with a NaN residual, rows that cannot converge stop at
    max_iter, the others are unaffected; same for the adjoint with a NaN row in v."""
    gen = torch.Generator().manual_seed(case_seed("nan"))
    _, (w, frozen, gain, h0) = make_cell(21, 12, torch.float32, gen, device=device)
    frozen[4, 3] = float("nan")
    max_iter = 6
    h, state, _, parts = kernel.solve(w, frozen, gain, h0, EPS, DAMPING, max_iter, 1e-6, "rel", True)
    h_e, state_e, _, _ = persistent.solve_reference(w, frozen, gain, h0, EPS, DAMPING, max_iter, 1e-6, "rel", True)
    assert state.nstep[4] == 1 and torch.isnan(state.residual[4]) and torch.isnan(h[4]).all()
    others = torch.arange(21, device=device) != 4
    assert bool((state.nstep[others] == max_iter).all()) and bool((state.residual[others] >= 1e-6).all())
    assert bool(((state.residual[others] > 0) & (state.residual[others] < FLT_MAX)).all())
    torch.testing.assert_close(h[others], h_e[others], rtol=1e-5, atol=1e-6)
    assert torch.equal(state.nstep, state_e.nstep)
    # the kernel's per-block parts of the host check read as the solver's check_vector
    check, iterations = read_check(parts)
    expected = host_check(check_vector(state, 1e-6))
    assert counts(check) == counts(expected) == (21, 1, 1)
    assert iterations == max_iter and check.max_residual != check.max_residual  # NaN, as amax

    v = torch.randn(21, 12, generator=gen).to(device)
    v[7, 0] = float("inf")
    frozen[4, 3] = 0.0
    out = kernel.adjoint(w, frozen, gain, h_e.nan_to_num(), v, EPS, DAMPING, 4, 1e-9)
    assert out.state.nstep[7] == 1 and torch.isnan(out.state.residual[7])
    assert bool((out.state.nstep[torch.arange(21, device=device) != 7] == 4).all())
    assert counts(read_check(out.check)[0]) == counts(host_check(check_vector(out.state, 1e-9))) == (21, 1, 1)

    frozen[4, 3] = 1.0  # all finite, the rows converge: the parts agree with check_vector again
    solved = kernel.solve(w, frozen, gain, h0, EPS, DAMPING, 40, 1e-4, "abs", False)
    check, iterations = read_check(solved.check)
    assert check == host_check(check_vector(solved.state, 1e-4)) and check.unconverged == 0
    assert iterations == int(solved.state.nstep.max())


def test_read_check_sums_the_parts_and_never_passes_bad_rows_over():
    """Columns: unconverged rows, first bad iteration (0: none), bad rows, max residual,
    iterations. Bad rows without a recorded iteration still count, at iteration 1."""
    check, iterations = read_check(torch.tensor([[2.0, 0.0, 0.0, 0.5, 3.0], [1.0, 0.0, 0.0, 0.25, 7.0]]))
    assert (check.unconverged, check.first_bad_iter, check.bad_rows, check.max_residual, iterations) == (3, 0, 0, 0.5, 7)
    check, _ = read_check(torch.tensor([[2.0, 0.0, 1.0, 0.5, 3.0], [1.0, 5.0, 2.0, 0.25, 7.0]]))
    assert (check.unconverged, check.first_bad_iter, check.bad_rows) == (3, 5, 3) and math.isnan(check.max_residual)
    check, _ = read_check(torch.tensor([[2.0, 0.0, 1.0, 0.5, 3.0]]))
    assert (check.first_bad_iter, check.bad_rows) == (1, 1)


def test_matches_the_loop_path(kernel, device):
    """float32: the loop path (F.linear + fused update + commit, deqkern.solve_fused) takes
    the same steps per row and lands on the same iterate."""
    gen = torch.Generator().manual_seed(case_seed("loop"))
    _, (w, frozen, gain, h0) = make_cell(40, 24, torch.float32, gen, device=device)
    tol, max_iter = 1e-5, 30
    h, state, rstd, _ = kernel.solve(w, frozen, gain, h0, EPS, DAMPING, max_iter, tol, "rel", False)

    def step(x):
        return update_with_stats(x @ w.T, frozen, x, gain, eps=EPS, damping=DAMPING, stop_mode="rel")[:2]

    h_loop, info = solve_fused(step, h0, max_iter=max_iter, tol=tol, stop_mode="rel", backward="onestep")
    assert torch.equal(state.nstep, info["nstep"])
    torch.testing.assert_close(h, h_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.residual, info["residual"], rtol=1e-3, atol=NOISE)
    assert rstd is None


@cuda_only
@pytest.mark.parametrize("n_rows,d", [(1000, 777), (4100, 2048), (300, 512), (8500, 384)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sizes_match_eager(kernel, dtype, n_rows, d):
    """Multi-tile GEMMs, several phase-B sub-blocks, 16..64-row blocks."""
    gen = torch.Generator().manual_seed(case_seed("gpu", dtype, n_rows, d))
    f64, cast = make_cell(n_rows, d, dtype, gen, sigma=0.5, device="cuda")
    tol = TOL[dtype]
    h, state, _, _ = kernel.solve(*cast, EPS, DAMPING, 40, tol, "rel", False)
    h_e, state_e, _, _ = persistent.solve_reference(*cast, EPS, DAMPING, 40, tol, "rel", False)
    assert bool((state.residual < tol).all())
    assert int((state.nstep - state_e.nstep).abs().max()) <= 1
    assert_rows_close(h, h_e, fixed_point64(*f64), dtype, "h_star", states=(state, state_e))
    v = torch.randn(n_rows, d, device="cuda")
    out = kernel.adjoint(cast[0], cast[1], cast[2], h, v, EPS, DAMPING, 40, tol)
    ref = persistent_adjoint.adjoint_reference(cast[0], cast[1], cast[2], h, v, EPS, DAMPING, 40, tol)
    assert bool((out.state.residual < tol).all())
    assert float(row_err(out.g, ref.g.double()).max()) < 20 * tol


@cuda_only
def test_captured_in_a_cuda_graph(kernel):
    """No host sync inside the launch: it records in a CUDA graph and replays to the same result."""
    gen = torch.Generator().manual_seed(case_seed("graph"))
    _, cast = make_cell(256, 512, torch.bfloat16, gen, device="cuda")
    assert_graph_replays(kernel.solve, (*cast, EPS, DAMPING, 20, 2e-2, "rel", True))


def assert_graph_replays(solve, args):
    """``solve(*args)`` records in a CUDA graph (after a side-stream warm-up) and its replay
    gives the eager call's first two outputs: h* (or the adjoint's g) and the row state's steps."""
    h_ref, state_ref = solve(*args)[:2]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        solve(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, state = solve(*args)[:2]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(h, h_ref) and torch.equal(state.nstep, state_ref.nstep)


def forced_split(n_rows, d, block_m, block_n, element_size):
    """A split configuration chosen by hand (the programs must fit on the GPU at once)."""
    split = -(-d // block_n)
    assert -(-n_rows // block_m) * split <= torch.cuda.get_device_properties(0).multi_processor_count
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split, SPLIT_P2=1 << (split - 1).bit_length(),
                BLOCK_K=64 if element_size <= 2 else 32, ONE_DOT=block_m * block_n <= 1024, num_warps=4, num_stages=2)


@cuda_only
@pytest.mark.parametrize("n_rows,d,block_m,block_n,stop_mode", [
    (300, 512, 128, 16, "rel"),  # 32 programs per group
    (100, 777, 32, 128, "max"),  # 7 per group: not a power of two, the last one partly masked
    (257, 96, 16, 32, "abs"),    # 3 per group; 17 groups, the last of one row
])
@pytest.mark.parametrize("exchange", ["h", "z"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_groups_on_the_gpu(dtype, n_rows, d, block_m, block_n, stop_mode, exchange):
    """Groups of programs meeting at the barrier give the eager twin's steps and iterates,
    forward (either exchange) and adjoint, with the row state and host check written by
    each group's first."""
    gen = torch.Generator().manual_seed(case_seed("split", dtype, n_rows, d))
    f64, cast = make_cell(n_rows, d, dtype, gen, device="cuda")
    cfg = {**forced_split(n_rows, d, block_m, block_n, cast[0].element_size()), "EXCHANGE": exchange}
    tol = TOL[dtype] * (d**0.5 if stop_mode == "abs" else 1.0)  # an absolute residual grows with ||h|| ~ sqrt(d)
    h, state, rstd, parts = persistent_split.solve_split(*cast, EPS, DAMPING, 40, tol, stop_mode, True, config=cfg)
    h_e, state_e, rstd_e, _ = persistent.solve_reference(*cast, EPS, DAMPING, 40, tol, stop_mode, True)
    assert bool((state.residual < tol).all())
    assert_same_steps(state.nstep, state_e.nstep)
    assert_rows_close(h, h_e, fixed_point64(*f64), dtype, "h_star")
    torch.testing.assert_close(rstd, rstd_e.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0)
    check, iterations = read_check(parts)
    assert check == host_check(check_vector(state, tol)) and iterations == int(state.nstep.max())
    v = torch.randn(n_rows, d, device="cuda") * torch.logspace(-3, 3, n_rows, device="cuda")[:, None]
    out = persistent_split.adjoint_split(cast[0], cast[1], cast[2], h, v, EPS, DAMPING, 40, TOL[dtype], config=cfg)
    ref = persistent_adjoint.adjoint_reference(cast[0], cast[1], cast[2], h, v, EPS, DAMPING, 40, TOL[dtype])
    assert bool((out.state.residual < TOL[dtype]).all())
    assert_same_steps(out.state.nstep, ref.state.nstep)
    assert float(row_err(out.g, ref.g.double()).max()) < 20 * TOL[dtype]
    scale = float(ref.d_gain.abs().max())
    torch.testing.assert_close(out.d_gain, ref.d_gain.float(), rtol=20 * TOL[dtype], atol=20 * TOL[dtype] * scale)


def assert_same_steps(nstep, expected):
    """Split sums round differently from torch's: a row whose residual lands within a
    rounding of ``tol`` may take one step more or less; at most 2% of the rows do."""
    diff = (nstep - expected).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02, diff.tolist()


def test_unsound_barrier_counters_give_nan_not_wrong_numbers(monkeypatch, device, fused):
    """A launch that gave up waiting at a group barrier marks its stream's counters unsound
    (flag BAR[0]): every later split launch on them writes NaN rows, reported as non-finite
    at step 1, with NaN dz in the adjoint; once a solve has reported them, the counters are
    dropped and the next solve is sound. (The flag is set by hand here: a real give-up needs
    a group whose programs cannot all be resident.)"""
    monkeypatch.setattr(persistent_split, "KERNEL", "split")
    gen = torch.Generator().manual_seed(case_seed("poison"))
    _, (w, frozen, gain, h0) = make_cell(21, 12, torch.float32, gen, device=device)
    good = persistent_split.solve_split(w, frozen, gain, h0, EPS, DAMPING, 30, 1e-5, "rel", False)
    persistent_split._barrier_counters(h0.device, 2)[0] = 1
    bad = persistent_split.solve_split(w, frozen, gain, h0, EPS, DAMPING, 30, 1e-5, "rel", False)
    assert torch.isnan(bad.h).all() and torch.isnan(bad.state.residual).all()
    check, _ = read_check(bad.check)
    assert (check.bad_rows, check.first_bad_iter) == (21, 1)
    out = persistent_split.adjoint_split(w, frozen, gain, good.h, torch.randn_like(h0), EPS, DAMPING, 30, 1e-5)
    assert torch.isnan(out.dz).all() and torch.isnan(out.g).all()

    import deqkern
    from deqkern.solver import NonFiniteError

    with pytest.raises(NonFiniteError, match="iteration 1"):
        deqkern.solve_cell(w, frozen, gain, h0, damping=DAMPING, eps=EPS, tol=1e-5, max_iter=30)
    h, info = deqkern.solve_cell(w, frozen, gain, h0, damping=DAMPING, eps=EPS, tol=1e-5, max_iter=30)
    assert bool(info["converged"].all())
    torch.testing.assert_close(h, good.h, rtol=0, atol=0)


def test_kernel_choice_is_validated(monkeypatch):
    monkeypatch.setattr(persistent_split, "KERNEL", "fast")
    h = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="DEQKERN_PERSISTENT_KERNEL.*'auto', 'cluster', 'split' or 'block'.*'fast'"):
        persistent_split.use_split(4, 8, h)
    monkeypatch.setattr(persistent_split, "KERNEL", "split")
    assert persistent_split.use_split(4, 8, h)  # on a CPU only when asked for
    monkeypatch.setattr(persistent_split, "KERNEL", "auto")
    assert not persistent_split.use_split(4, 8, h)


def test_split_row_state_is_made_when_first_read(device):
    """The split launch returns its row state as views made on first read (a solve whose
    statistics nobody reads pays for none), with the same values as the views made at once."""
    gen = torch.Generator().manual_seed(case_seed("lazy-state", 13, 24))
    _, cast = make_cell(13, 24, torch.float32, gen, device=device)
    out = persistent_split.solve_split(*cast, EPS, DAMPING, 25, TOL[torch.float32], "rel", False)
    assert out.state._fields is None
    ref = persistent.solve_reference(*cast, EPS, DAMPING, 25, TOL[torch.float32], "rel", False)
    assert out.state.nstep.dtype == torch.int32 and out.state._fields is not None
    assert torch.equal(out.state.nstep, ref.state.nstep.to(torch.int32))
    assert bool((out.state.residual < TOL[torch.float32]).all())
    assert bool((out.state.lowest <= out.state.residual).all()) and bool((out.state.prev > out.state.residual).all())
    assert out.state.lowest_step is None and out.state.best is None


@pytest.mark.parametrize("d", [3, 64, 512, 777, 1024, 2048])
@pytest.mark.parametrize("element_size", [2, 4])
def test_block_config_on_a_gpu_tiles_every_row(d, element_size):
    """The block kernel's GPU launch parameters (chosen on the H200, ``bench/probe_block.py``):
    at most 64 rows a program, at least 16 (``tl.dot``); phase B's steps cover the block
    exactly (``SUB_M`` divides ``BLOCK_M``: a step past it would write the next program's
    rows) with whole rows (``BLOCK_D >= d``) and 32 elements a thread per tensor at most."""
    for n_rows in (1, 100, 256, 2000, 8192, 8449, 32768, 10**6):
        cfg = persistent.persistent_config(n_rows, d, element_size, False, 132)
        assert 16 <= cfg["BLOCK_M"] <= 64 and cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1) == 0
        assert cfg["BLOCK_M"] % cfg["SUB_M"] == 0 and cfg["BLOCK_D"] >= d
        assert cfg["SUB_M"] == 1 or cfg["SUB_M"] * cfg["BLOCK_D"] <= 32 * 32 * cfg["num_warps"]
        assert cfg["num_warps"] == (8 if d > 512 else 4) and cfg["STAGES_B"] >= 1
    # one program per SM up to 64 rows each, then more programs
    assert persistent.persistent_config(8192, 1024, 2, False, 132)["BLOCK_M"] == 64
    assert persistent.persistent_config(2000, 1024, 2, False, 132)["BLOCK_M"] == 16
