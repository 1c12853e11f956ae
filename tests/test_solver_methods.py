"""deqkern.solve(method="anderson" | "broyden"): fixed points, accuracy against torchdeq's
solvers at equal max_iter, speed-up over Picard, per-row freezing, return_iterate,
traces, gradients, 16-bit iterates, the solver never writing into f's outputs, and the
backend choice (auto never picks the Triton interpreter)."""

import math

import pytest
import torch

import deqkern
from deqkern import _backend
from deqkern.nn import cell_adjoint
from deqkern.ops import commit as commit_ops
from deqkern.ops.residual import row_residual
from deqkern.solver import NonFiniteError, solve, solve_fused
from test_solver import (affine_rows, counting_checks, fresh_gen, grads_of, nan_at, picard, rel_err, rms_cell,
                         scaled, tanh_problem)

METHODS = ["anderson", "broyden"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def symmetric_linear(d, radius, dtype, gen, n=6, scale=1.0):
    """f(h) = h W^T + b, W symmetric with eigenvalues spread over [-radius, radius]; and
    its exact fixed point (float64)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    w = (q * torch.linspace(-radius, radius, d, dtype=torch.float64)) @ q.T
    b = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    z_star = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - w, b.T).T
    w_c, b_c = w.to(dtype), b.to(dtype)
    return (lambda h: h @ w_c.T + b_c), z_star


def edge_tanh(d, dtype, gen, n=6):
    """f(h) = tanh(h W^T + x), W symmetric with spectral radius 0.99: near the edge of
    contraction. Its fixed point by a long float64 Broyden solve."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    w = (q * torch.linspace(-0.99, 0.99, d, dtype=torch.float64)) @ q.T
    x = 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        z_star, info = solve(lambda h: torch.tanh(h @ w.T + x), torch.zeros(n, d, dtype=torch.float64),
                             method="broyden", m=400, max_iter=400, tol=1e-13, stop_mode="abs")
    assert bool(info["converged"].all())
    w_c, x_c = w.to(dtype), x.to(dtype)
    return (lambda h: torch.tanh(h @ w_c.T + x_c)), z_star


# --------------------------------------------------------------------------- fixed points
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
@pytest.mark.parametrize("lead,d", [((6,), 1), ((5,), 3), ((2, 3), 257)], ids=["6x1", "5x3", "2x3x257"])
def test_fixed_point_tanh(method, stop_mode, lead, d):
    gen = fresh_gen("methods-tanh", method, stop_mode, lead, d)
    f, _ = tanh_problem(lead, d, torch.float64, gen, sigma=0.9)
    h0 = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        h_star, info = solve(f, h0, method=method, tol=1e-10, max_iter=200, stop_mode=stop_mode)
        reference = picard(f, h0, 2000)
    assert h_star.shape == h0.shape and h_star.dtype == h0.dtype
    assert bool(info["converged"].all())
    # ||h - h*|| <= ||f(h) - h|| / (1 - L), L = 0.9; the max-norm residual bounds the 2-norm up to sqrt(d).
    slack = (math.sqrt(d) if stop_mode == "max" else 1.0) * (reference.norm(dim=-1) if stop_mode == "rel" else 1.0)
    assert bool(((h_star - reference).norm(dim=-1) <= 1e-10 * slack / 0.1 * 1.01).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("max_iter", [30, 100])
@pytest.mark.parametrize("problem", ["linear-0.97", "tanh-edge"])
def test_error_at_equal_max_iter_within_2x_of_torchdeq(problem, max_iter, dtype):
    """No early stop (tol far below reach); both return their lowest-residual iterate.
    Equal work: torchdeq's anderson evaluates f max_iter times, as deqkern does; its
    broyden max_iter + 1 times (its first f(x0) is not a step), so deqkern's broyden gets
    max_iter + 1 steps. Errors below the dtype's floor (eps ||z*|| / (1 - rho)) are
    noise and count as equal."""
    solvers = pytest.importorskip("torchdeq.solver")
    gen = fresh_gen("vs-torchdeq", problem, max_iter, str(dtype))
    linear = problem == "linear-0.97"
    f, z_star = symmetric_linear(64, 0.97, dtype, gen, scale=3.0) if linear else edge_tanh(64, dtype, gen)
    floor = torch.finfo(dtype).eps * z_star.norm().item() / (0.03 if linear else 0.01)
    h0 = torch.zeros(z_star.shape, dtype=dtype)
    kw = dict(tol=1e-30, stop_mode="abs")
    ours_kw = dict(kw, return_iterate="lowest", on_nonconvergence="ignore")
    with torch.no_grad():
        ours = {"anderson": solve(f, h0, method="anderson", m=6, max_iter=max_iter, **ours_kw)[0],
                "broyden": solve(f, h0, method="broyden", m=max_iter + 1, max_iter=max_iter + 1, **ours_kw)[0]}
        theirs = {"anderson": solvers.anderson_solver(f, h0, m=6, max_iter=max_iter, **kw)[0],
                  "broyden": solvers.broyden_solver(f, h0, max_iter=max_iter, **kw)[0]}
    for method in METHODS:
        err, err_ref = ((z.double() - z_star).norm().item() for z in (ours[method], theirs[method]))
        assert err <= 2 * err_ref + floor, (method, err, err_ref, floor)


@pytest.mark.parametrize("entry", ["solve", "solve_fused"])
def test_at_least_2x_fewer_iterations_than_picard_on_a_slow_cell(entry):
    """The frozen-context cell damped to a contraction near 0.95 (measured)."""
    gen = fresh_gen("slow-cell", entry)
    step, _, _ = rms_cell((16,), 48, torch.float32, gen, sigma=0.5, damping=0.06)
    run = solve_fused if entry == "solve_fused" else solve
    fn = step if entry == "solve_fused" else (lambda h: step(h)[0])
    h0 = torch.zeros(16, 48)
    nsteps = {}
    with torch.no_grad():
        for method in ["picard", *METHODS]:
            _, info = run(fn, h0, method=method, tol=1e-5, max_iter=600, check_every=1, on_nonconvergence="raise")
            nsteps[method] = info["nstep"].max().item()
            if method == "picard":
                assert 0.9 <= info["contraction"].item() <= 0.99
    for method in METHODS:
        assert 2 * nsteps[method] <= nsteps["picard"], nsteps


@pytest.mark.parametrize("method", METHODS)
def test_iterations_do_not_depend_on_the_scale(method):
    """lam is relative: the same problem scaled by 1e-3..1e3 takes the same steps."""
    nsteps = []
    for scale in (1e-3, 1.0, 1e3):
        f, z_star = symmetric_linear(32, 0.95, torch.float64, fresh_gen("scale", method), scale=scale)
        with torch.no_grad():
            h, info = solve(f, torch.zeros(z_star.shape, dtype=torch.float64), method=method, tol=1e-9,
                            max_iter=300, stop_mode="rel", check_every=1)
        assert rel_err(h, z_star) < 1e-7
        nsteps.append(info["nstep"].tolist())
    assert nsteps[0] == nsteps[1] == nsteps[2]


def test_anderson_with_one_pair_is_picard():
    gen = fresh_gen("m1")
    f, _ = tanh_problem((5,), 7, torch.float64, gen)
    h0 = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        a, info_a = solve(f, h0, method="anderson", m=1, tol=1e-9, max_iter=100)
        p, info_p = solve(f, h0, tol=1e-9, max_iter=100)
    assert torch.equal(a, p) and torch.equal(info_a["nstep"], info_p["nstep"])


def test_anderson_damping_reaches_the_same_fixed_point():
    gen = fresh_gen("beta")
    f, _ = tanh_problem((4,), 9, torch.float64, gen, sigma=0.9)
    h0 = torch.zeros(4, 9, dtype=torch.float64)
    with torch.no_grad():
        undamped, _ = solve(f, h0, method="anderson", tol=1e-11, max_iter=200, stop_mode="abs")
        damped, info = solve(f, h0, method="anderson", beta=0.5, tol=1e-11, max_iter=200, stop_mode="abs")
    assert bool(info["converged"].all()) and (damped - undamped).abs().max().item() < 1e-9


# --------------------------------------------------------------------------- rows, syncs, errors
def rows_at_rates(gen, sigmas=(0.1, 0.6, 0.9, 0.98), d=7):
    """f acting row by row, row r as tanh(h W_r^T + x_r) with ||W_r|| = sigmas[r]."""
    w = torch.stack([scaled(d, s, torch.float32, gen) for s in sigmas])
    x = torch.randn(len(sigmas), d, generator=gen)

    def f(h):
        return torch.tanh(torch.einsum("rij,rj->ri", w[: h.shape[0]], h) + x[: h.shape[0]])

    return f, w, x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_rows_freeze_independently(method, backend, device):
    """Rows contracting at different rates: each converges at its own step and holds the
    iterate it would have alone."""
    if backend == "triton" and device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    f, w, x = rows_at_rates(fresh_gen("rows", method, backend))
    with torch.no_grad():
        h_star, info = solve(f, torch.zeros(4, 7), method=method, tol=1e-5, max_iter=200, check_every=3)
        nstep = info["nstep"].tolist()
        assert nstep[0] < nstep[3] and bool(info["converged"].all())
        for row, k in enumerate(nstep):
            alone, _ = solve(lambda h: torch.tanh(h @ w[row].T + x[row]), torch.zeros(1, 7), method=method,
                             tol=1e-30, max_iter=k, on_nonconvergence="ignore")
            torch.testing.assert_close(h_star[row], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_syncs_only_at_checks(monkeypatch, method):
    calls = counting_checks(monkeypatch)
    gen = fresh_gen("method-checks", method)
    f, _ = tanh_problem((3,), 6, torch.float64, gen, sigma=0.99)
    with torch.no_grad():
        _, info = solve(f, torch.zeros(3, 6, dtype=torch.float64), method=method, max_iter=20, check_every=5,
                        tol=1e-30, on_nonconvergence="ignore")
    assert len(calls) == 4 and info["iterations"] == 20


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_raises_naming_the_iteration(method):
    with pytest.raises(NonFiniteError, match="at iteration 5 in 1 row"), torch.no_grad():
        solve(nan_at(5, 2), torch.zeros(4, 6), method=method, tol=1e-7, max_iter=50)


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method):
    h, info = solve(torch.tanh, torch.zeros(0, 5), method=method)
    assert h.shape == (0, 5) and info["converged_fraction"].item() == 1


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(method="newton"), "method must be one of 'picard', 'anderson', 'broyden'; got 'newton'"),
    (dict(b_method="lbfgs"), "b_method must be one of"),
    (dict(m=3), "m applies to method 'anderson' or 'broyden'; got method='picard', b_method='picard'"),
    (dict(method="broyden", lam=0.1), "lam applies to method 'anderson'"),
    (dict(beta=0.5), "beta applies to method 'anderson'.*damped Picard step"),
    (dict(method="anderson", m=0), "m must be an int >= 1; got 0"),
    (dict(method="anderson", lam=-1.0), "lam must be a finite float > 0"),
    (dict(method="anderson", beta=math.inf), "beta must be a finite float > 0"),
    (dict(return_iterate="best"), "return_iterate must be one of 'last', 'lowest'; got 'best'"),
    (dict(method="anderson", backward="unrolled"), "backward='unrolled' .* method='picard' only"),
])
def test_bad_method_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        solve(torch.tanh, torch.zeros(2, 3), **kwargs)
    with pytest.raises(TypeError, match="trace must be a bool"):
        solve(torch.tanh, torch.zeros(2, 3), trace=1)


# --------------------------------------------------------------------------- returned iterate, info
def oscillating(gen, n=4, d=6):
    """f(h) = -1.05 h + b: the Picard residual grows every step (never converges)."""
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return lambda h: -1.05 * h + b


@pytest.mark.parametrize("method", ["picard", *METHODS])
@pytest.mark.parametrize("return_iterate", ["last", "lowest"])
def test_info_describes_the_returned_iterate(method, return_iterate):
    gen = fresh_gen("returned", method, return_iterate)
    f = oscillating(gen) if method == "picard" else tanh_problem((4,), 6, torch.float64, gen, sigma=1.3)[0]
    h0 = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    kw = dict(method=method, tol=1e-30, stop_mode="abs", on_nonconvergence="ignore", trace=True)
    with torch.no_grad():
        h, info = solve(f, h0, max_iter=12, return_iterate=return_iterate, **kw)
    trace = info["abs_trace"]
    assert trace.shape == (4, 12) and trace.dtype == torch.float32
    expected_step = trace.argmin(-1) + 1 if return_iterate == "lowest" else torch.full((4,), 12)
    assert info["nstep"].tolist() == expected_step.tolist()
    torch.testing.assert_close(info["residual"], trace.gather(1, expected_step.unsqueeze(1) - 1).squeeze(1))
    torch.testing.assert_close(info["abs_lowest"], info["residual"])
    for row in range(4):  # the returned row is the iterate that step produced
        k = int(info["nstep"][row])
        with torch.no_grad():
            at_k, _ = solve(f, h0, max_iter=k, **kw)
        torch.testing.assert_close(h[row], at_k[row], rtol=1e-12, atol=1e-12)
    if return_iterate == "lowest" and method == "picard":  # the residual grows: step 1 is the lowest
        assert info["nstep"].tolist() == [1] * 4


def test_traces_of_affine_rows():
    gen = fresh_gen("traces")
    rates = [0.5, 0.2, 0.7]
    f, _, _ = affine_rows(rates, 3, torch.float64, gen)
    h, info = solve(f, torch.zeros(3, 3, dtype=torch.float64), tol=1e-3, stop_mode="abs", max_iter=40,
                    trace=True, check_every=1)
    k = info["iterations"]
    assert info["abs_trace"].shape == info["rel_trace"].shape == (3, k)
    for row, rate in enumerate(rates):
        n = int(info["nstep"][row])
        expected = torch.tensor([rate ** (min(j, n) - 1) for j in range(1, k + 1)], dtype=torch.float32)
        torch.testing.assert_close(info["abs_trace"][row], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(info["rel_trace"][:, -1], info["rel_lowest"], rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b_method", ["picard", *METHODS])
def test_ift_gradients_match_picard_unrolled(method, b_method):
    gen = fresh_gen("method-ift", method, b_method)
    f, params = tanh_problem((5,), 12, torch.float64, gen, sigma=0.9)
    h0 = torch.zeros(5, 12, dtype=torch.float64)
    cotangent = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    kw = dict(tol=1e-12, max_iter=400, stop_mode="abs")
    h, info = solve(f, h0, method=method, b_method=b_method, **kw)
    grads = grads_of(h, params, cotangent)
    h_ref, _ = solve(f, h0, backward="unrolled", **kw)
    grads_ref = grads_of(h_ref, params, cotangent)
    assert bool(info["b_converged"].all())
    for g, ref in zip(grads, grads_ref):
        assert rel_err(g, ref) <= 1e-8


class TanhAdjoint:
    """A stateless custom adjoint of f(h) = tanh(h W^T + x): (h*, v) -> g -> v + J^T g."""

    stateless = True

    def __init__(self, w, x):
        self.w, self.x, self.calls = w.detach(), x.detach(), 0

    def __call__(self, h_star, v):
        self.calls += 1
        sech2 = 1 - torch.tanh(h_star @ self.w.T + self.x).pow(2)

        def step(g):
            g_next = v + (g * sech2) @ self.w
            return g_next, row_residual(g_next, g, "rel")  # the adjoint contract: relative

        return step


@pytest.mark.parametrize("b_method", METHODS)
def test_custom_adjoints_with_accelerated_adjoint_solves(b_method):
    """A stateless custom adjoint is iterated by Anderson/Broyden; a stateful one
    (deqkern.nn.cell_adjoint carries dz between calls, valid for Picard only) is replaced
    by autograd's products: both give the Picard gradients."""
    gen = fresh_gen("custom-adjoint", b_method)
    f, params = tanh_problem((5,), 12, torch.float64, gen, sigma=0.9)
    h0 = torch.zeros(5, 12, dtype=torch.float64)
    cotangent = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    kw = dict(tol=1e-12, max_iter=400, stop_mode="abs")
    reference = grads_of(solve(f, h0, **kw)[0], params, cotangent)
    adjoint = TanhAdjoint(*params)
    h, info = solve_fused(lambda h: (f(h), row_residual(f(h), h, "abs")), h0, adjoint=adjoint, b_method=b_method, **kw)
    for g, ref in zip(grads_of(h, params[1:], cotangent), reference[1:]):  # x: the recorded application
        assert rel_err(g, ref) <= 1e-8
    assert adjoint.calls == 1 and bool(info["b_converged"].all())

    step, _, cell_params = rms_cell((6,), 16, torch.float64, gen, sigma=0.5, damping=0.5)
    w, frozen, gain = cell_params
    cell_cotangent = torch.randn(6, 16, generator=gen, dtype=torch.float64)

    def cell_grads(**method_kw):
        adjoint = cell_adjoint(w, gain, frozen, damping=0.5, eps=1e-6)
        h, _ = solve_fused(step, torch.zeros(6, 16, dtype=torch.float64), adjoint=adjoint, tol=1e-12, max_iter=300,
                           **method_kw)
        return grads_of(h, cell_params, cell_cotangent)

    # cell_adjoint's statistics are float32 (float32-level agreement); the autograd
    # products that replace it under Anderson/Broyden are float64.
    unrolled, picard_grads, accelerated = (cell_grads(backward="unrolled"), cell_grads(),
                                           cell_grads(b_method=b_method))
    for g, g_picard, ref in zip(accelerated, picard_grads, unrolled):
        assert rel_err(g, ref) <= 1e-9 and rel_err(g_picard, ref) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_fused_bf16_cell(method, backend, device):
    """solve_fused on the frozen-context cell in bfloat16 (the fused update, and the
    bookkeeping kernel, interpreted on a CPU) against the float64 fixed point."""
    if backend == "triton" and device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    gen = fresh_gen("bf16-cell", method, backend)
    step, reference64, _ = rms_cell((6,), 40, torch.bfloat16, gen, sigma=0.5, damping=0.3, device=device)
    with torch.no_grad():
        z, info = solve_fused(step, torch.zeros(6, 40, device=device, dtype=torch.bfloat16), method=method,
                              tol=1e-2, max_iter=60, on_nonconvergence="raise")
        z64 = picard(reference64, torch.zeros(6, 40, dtype=torch.float64, device=device), 300)
    assert z.dtype == torch.bfloat16 and rel_err(z, z64) < 3e-2


# --------------------------------------------------------------------------- dtypes, ownership, backend
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_16bit_iterates(method, dtype, backend, device):
    """Histories and least squares in float32: bf16/fp16 solves converge to the float64
    fixed point within the dtype's resolution (torchdeq's anderson raises on bf16)."""
    if backend == "triton" and device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    gen = fresh_gen("16bit", method, str(dtype), backend)
    f64, params = tanh_problem((6,), 33, torch.float64, gen, sigma=0.9)
    w, x = (p.detach().to(device=device, dtype=dtype) for p in params)
    with torch.no_grad():
        z64, _ = solve(f64, torch.zeros(6, 33, dtype=torch.float64), tol=1e-12, max_iter=500)
        z, info = solve(lambda h: torch.tanh(h @ w.T + x), torch.zeros(6, 33, device=device, dtype=dtype),
                        method=method, tol=1e-2, max_iter=100, on_nonconvergence="raise")
    assert z.dtype == dtype and bool(info["converged"].all())
    assert rel_err(z.cpu(), z64) < 2e-2


@pytest.mark.parametrize("method", ["picard", *METHODS])
@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_never_writes_into_what_f_returned(method, backend, device):
    if backend == "triton" and device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    gen = fresh_gen("ownership", method, backend)
    f, _, _ = rows_at_rates(gen)  # rows freeze at different steps: an in-place commit writes into f's outputs
    outputs, copies = [], []

    def recording(h):
        out = f(h)
        outputs.append(out)
        copies.append(out.clone())
        return out

    h0 = torch.randn(4, 7, generator=gen)
    h0_copy = h0.clone()
    with torch.no_grad():
        _, info = solve(recording, h0, method=method, tol=1e-5, max_iter=300, check_every=2)
    assert info["nstep"].min() < info["nstep"].max() and torch.equal(h0, h0_copy)
    for out, copy in zip(outputs, copies):
        assert torch.equal(out, copy)


def test_auto_never_picks_the_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 with DEQKERN_BACKEND unset: a CPU solve and op run eager."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DEQKERN_BACKEND", raising=False)
    assert _backend.select(torch.device("cpu"), torch.float32, 8) == "eager"
    launched = []
    original = commit_ops.CommitPlan.__call__
    monkeypatch.setattr(commit_ops.CommitPlan, "__call__", lambda *a: launched.append(1) or original(*a))
    gen = fresh_gen("auto-eager")
    step, _, _ = rms_cell((4,), 8, torch.float32, gen)
    with torch.no_grad():
        solve(lambda h: step(h)[0], torch.zeros(4, 8), tol=1e-5, max_iter=50)
    assert deqkern.last_backend() == "eager" and not launched
    if not torch.cuda.is_available():  # asked for, it runs (conftest set TRITON_INTERPRET before importing triton)
        monkeypatch.setenv("DEQKERN_BACKEND", "triton")
        with torch.no_grad():
            solve(lambda h: step(h)[0], torch.zeros(4, 8), tol=1e-5, max_iter=50)
        assert deqkern.last_backend() == "triton-interpreter" and launched


# --------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graph_matches_eager_and_never_syncs(method, dtype):
    deqkern.solver.clear_graph_cache()
    gen = torch.Generator().manual_seed(7)
    step, _, params = rms_cell((256,), 512, dtype, gen, sigma=0.5, damping=0.2, device="cuda")
    h0 = torch.randn(256, 512, device="cuda", dtype=dtype)
    kw = dict(method=method, max_iter=30, tol=1e-5 if dtype == torch.float32 else 1e-2, on_nonconvergence="ignore")
    with torch.no_grad():
        h_eager, info_eager = solve_fused(step, h0, **kw)
        solve_fused(step, h0, graph=True, **kw)  # capture outside the checked region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            h_graph, info_graph = solve_fused(step, h0, graph=True, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert bool(info_graph["converged"].all())
    torch.testing.assert_close(h_graph.float(), h_eager.float(), rtol=1e-3, atol=1e-3 if dtype == torch.float32 else 3e-2)
    cot = torch.randn_like(h0)
    g_graph = grads_of(solve_fused(step, h0, graph=True, **kw)[0], params, cot)
    g_eager = grads_of(solve_fused(step, h0, **kw)[0], params, cot)
    for a, b in zip(g_graph, g_eager):
        assert rel_err(a, b) < (1e-4 if dtype == torch.float32 else 3e-2)


@cuda_only
@pytest.mark.parametrize("method", METHODS)
def test_eager_solve_syncs_only_at_checks_cuda(monkeypatch, method):
    """No hidden sync per iteration (the small solves never check errors on the host):
    the only synchronizing operations are the check_every reads."""
    calls = counting_checks(monkeypatch)
    gen = torch.Generator().manual_seed(8)
    step, _, _ = rms_cell((512,), 256, torch.float32, gen, sigma=0.5, damping=0.1, device="cuda")
    h0 = torch.randn(512, 256, device="cuda")
    with torch.no_grad():
        solve_fused(step, h0, method=method, max_iter=3, tol=1e-30, on_nonconvergence="ignore")  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning) as record:
                _, info = solve_fused(step, h0, method=method, max_iter=20, check_every=5, tol=1e-30,
                                      on_nonconvergence="ignore")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(calls) == 5 and len(syncs) == 4 and info["iterations"] == 20  # 1 warm-up check + 4
