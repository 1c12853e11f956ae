"""deqkern.solve / solve_fused: fixed points, IFT / one-step / unrolled gradients, frozen
rows, host-sync counting, non-convergence policies, validation, CUDA graphs, and
agreement with torchdeq."""

import math
import warnings

import pytest
import torch

import deqkern
import deqkern.solver as solver
from deqkern.ops import commit as commit_ops
from deqkern.solver import capture as capture_mod, loop as loop_mod
from deqkern import _backend
from deqkern.ops.residual import row_residual
from deqkern.ops.update import update_reference
from deqkern.solver import ConvergenceError, ConvergenceWarning, NonFiniteError, solve, solve_fused
from numerics import case_seed

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- problems
def scaled(d: int, sigma: float, dtype, gen, device="cpu") -> torch.Tensor:
    """A random (d, d) matrix with spectral norm sigma."""
    w = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return (sigma * w / torch.linalg.matrix_norm(w, 2)).to(device=device, dtype=dtype)


def tanh_problem(lead, d, dtype, gen, sigma=0.7, device="cpu"):
    """f(h) = tanh(h W^T + x): Lipschitz <= sigma in the 2-norm. W and x require grad."""
    w = scaled(d, sigma, dtype, gen, device).requires_grad_()
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()

    def f(h):
        return torch.tanh(h @ w.T + x)

    return f, [w, x]


def rms_cell(lead, d, dtype, gen, sigma=0.3, damping=0.8, device="cpu"):
    """The frozen-context cell h <- (1-b) h + b * g * RMSNorm(h W^T + frozen), as the
    fused op (`step`, also returning the residual) and as its differentiable `f`."""
    w = scaled(d, sigma, dtype, gen, device).requires_grad_()
    frozen = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    gain = (1 + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()

    def step(h, stop_mode="rel"):
        return deqkern.frozen_rmsnorm_update(h @ w.T, frozen, h, gain, damping=damping, stop_mode=stop_mode)

    def reference64(h):
        """The same map in float64 through the eager reference (autograd-able)."""
        h64 = h.double()
        out, _, _ = update_reference(h64 @ w.double().T, frozen.double(), h64, gain.double(), 1e-6, damping, "rel")
        return out

    return step, reference64, [w, frozen, gain]


def affine_rows(rates, d, dtype, gen, device="cpu"):
    """f(h) = a_row * h + b: row r contracts at rate a_r (residual r_k = ||b_r|| a_r^(k-1)
    from h0 = 0)."""
    a = torch.tensor(rates, dtype=dtype, device=device).unsqueeze(-1)
    b = torch.randn(len(rates), d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    b = b / b.norm(dim=-1, keepdim=True)  # ||b_r|| = 1
    return (lambda h: a * h + b), a, b


def picard(f, h0, iters):
    h = h0
    with torch.no_grad():
        for _ in range(iters):
            h = f(h)
    return h


def grads_of(out, params, cotangent):
    for p in params:
        p.grad = None
    torch.autograd.backward(out, cotangent)
    result = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return result


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def fresh_gen(*key):
    return torch.Generator().manual_seed(case_seed(*key))


# --------------------------------------------------------------------------- fixed points
@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
@pytest.mark.parametrize("lead,d", [((6,), 1), ((5,), 3), ((2, 3), 257)], ids=["6x1", "5x3", "2x3x257"])
def test_fixed_point_tanh(stop_mode, lead, d):
    gen = fresh_gen("tanh", stop_mode, lead, d)
    f, _ = tanh_problem(lead, d, torch.float64, gen)
    h0 = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    tol = 1e-8
    with torch.no_grad():
        h_star, info = solve(f, h0, tol=tol, max_iter=200, stop_mode=stop_mode)
        fixed_residual = row_residual(f(h_star), h_star, stop_mode)
    reference = picard(f, h0, 500)
    assert h_star.shape == h0.shape and h_star.dtype == h0.dtype
    assert bool(info["converged"].all()) and bool((info["residual"] < tol).all())
    # ||f(h_k) - h_k|| <= L ||h_k - h_{k-1}||, and ||h_k - h*|| <= L / (1 - L) ||h_k - h_{k-1}||
    # (2-norm, L = 0.7); the max-norm residual bounds the 2-norm one up to sqrt(d).
    slack = math.sqrt(d) if stop_mode == "max" else 1.0
    assert float(fixed_residual.max()) <= tol * slack
    scale = reference.norm(dim=-1) if stop_mode == "rel" else torch.ones(lead, dtype=torch.float64)
    dist = (h_star - reference).norm(dim=-1)
    assert bool((dist <= 0.7 / 0.3 * tol * slack * scale * 1.01).all()), f"max distance {dist.max():.3e}"


@pytest.mark.parametrize("entry", ["solve", "solve_fused"])
@pytest.mark.parametrize("dtype,tol,atol", [(torch.float64, 1e-10, 1e-9), (torch.float32, 1e-5, 2e-4)], ids=["f64", "f32"])
def test_fixed_point_rmsnorm_cell(entry, dtype, tol, atol):
    gen = fresh_gen("cell", entry, str(dtype))
    lead, d = (9,), 48
    step, reference64, _ = rms_cell(lead, d, dtype, gen)
    h0 = torch.zeros(*lead, d, dtype=dtype)
    with torch.no_grad():
        if entry == "solve":
            h_star, info = solve(lambda h: step(h)[0], h0, tol=tol, max_iter=100)
        else:
            h_star, info = solve_fused(step, h0, tol=tol, max_iter=100)
    reference = picard(reference64, h0.double(), 500)
    assert bool(info["converged"].all())
    assert (h_star.double() - reference).abs().max().item() <= atol
    # The step's own residual of the answer is below tol: it is a fixed point.
    with torch.no_grad():
        assert float(step(h_star)[1].max()) < tol


def test_solve_fused_uses_the_step_residual():
    """The residual the step returns is what the solver tests: a step that reports 0
    converges in one iteration whatever its iterates do."""
    gen = fresh_gen("fused-residual")
    f, _ = tanh_problem((4,), 6, torch.float64, gen)
    h_star, info = solve_fused(lambda h: (f(h), torch.zeros(h.shape[:-1])), torch.zeros(4, 6, dtype=torch.float64),
                               check_every=1)
    assert info["iterations"] == 1 and info["nstep"].tolist() == [1] * 4


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("problem", ["tanh", "cell"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ift_matches_unrolled(problem, dtype):
    gen = fresh_gen("ift", problem, str(dtype))
    lead, d = (6,), 24
    if problem == "tanh":
        f, params = tanh_problem(lead, d, dtype, gen)
    else:
        step, _, params = rms_cell(lead, d, dtype, gen)

        def f(h):
            return step(h)[0]
    tol, bound = (1e-12, 1e-6) if dtype == torch.float64 else (1e-6, 1e-4)
    h0 = torch.zeros(*lead, d, dtype=dtype)
    cotangent = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(dtype)
    kw = dict(tol=tol, max_iter=300, stop_mode="abs")
    h_ift, info = solve(f, h0, backward="ift", **kw)
    g_ift = grads_of(h_ift, params, cotangent)
    h_unrolled, _ = solve(f, h0, backward="unrolled", **kw)
    g_unrolled = grads_of(h_unrolled, params, cotangent)
    torch.testing.assert_close(h_ift.detach(), h_unrolled.detach(), rtol=0, atol=10 * tol)
    for g, ref in zip(g_ift, g_unrolled):
        assert rel_err(g, ref) <= bound
    assert bool(info["b_converged"].all()) and info["b_iterations"] >= 1


def test_gradcheck_ift():
    gen = fresh_gen("gradcheck")
    w0 = scaled(4, 0.6, torch.float64, gen)
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def fixed_point(w, x):
        h, _ = solve(lambda h: torch.tanh(h @ w.T + x), torch.zeros(3, 4, dtype=torch.float64),
                     tol=1e-13, max_iter=400, stop_mode="abs")
        return h

    assert torch.autograd.gradcheck(fixed_point, (w0.requires_grad_(), x0.requires_grad_()), atol=1e-6, rtol=1e-4)


def test_onestep_is_one_application_at_the_fixed_point():
    gen = fresh_gen("onestep")
    f, params = tanh_problem((5,), 7, torch.float64, gen)
    h0 = torch.zeros(5, 7, dtype=torch.float64)
    cotangent = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    h_star, _ = solve(f, h0, backward="onestep", tol=1e-6)
    got = grads_of(h_star, params, cotangent)
    with torch.no_grad():
        h_plain, _ = solve(f, h0, tol=1e-6)
    expected = grads_of(f(h_plain.detach()), params, cotangent)
    assert torch.equal(h_star.detach(), h_plain)  # value: the iterate itself, not f(h*)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_h0_gets_no_gradient_under_ift_and_inplace_on_output_is_allowed():
    gen = fresh_gen("h0")
    f, params = tanh_problem((3,), 5, torch.float64, gen)
    h0 = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    h_star, _ = solve(f, h0, tol=1e-8, max_iter=200)
    h_star.mul_(2)  # the output is not a view: in-place use is legal
    h_star.sum().backward()
    assert h0.grad is None and params[0].grad is not None


def count_saved(fn):
    """Number and total elements of tensors autograd saves while fn runs."""
    stats = {"count": 0, "numel": 0}

    def pack(t):
        stats["count"] += 1
        stats["numel"] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return stats


@pytest.mark.parametrize("backward", ["ift", "onestep"])
def test_backward_memory_does_not_grow_with_iterations(backward):
    gen = fresh_gen("memory", backward)
    affine, _, _ = affine_rows([0.999] * 4, 8, torch.float64, gen)  # residual 0.999^(k-1): never below tol
    w = torch.ones(8, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(4, 8, dtype=torch.float64)

    def run(max_iter, mode):
        def go():
            h, info = solve(lambda h: w * affine(h), h0, max_iter=max_iter, tol=1e-30, backward=mode,
                            on_nonconvergence="ignore")
            assert info["iterations"] == max_iter
        return count_saved(go)

    assert run(10, backward) == run(100, backward)
    assert run(100, "unrolled")["numel"] > 5 * run(10, "unrolled")["numel"]  # the sanity baseline grows


@cuda_only
def test_backward_memory_does_not_grow_with_iterations_cuda():
    gen = fresh_gen("memory-cuda")
    affine, _, _ = affine_rows([0.999] * 4096, 256, torch.float32, gen, device="cuda")
    w = torch.ones(256, device="cuda", requires_grad=True)
    params = [w]
    h0 = torch.zeros(4096, 256, device="cuda")

    def f(h):
        return w * affine(h)

    def peak(max_iter, mode):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h, _ = solve(f, h0, max_iter=max_iter, b_max_iter=max_iter, tol=1e-30, backward=mode,
                     on_nonconvergence="ignore")
        h.sum().backward()
        for p in params:
            p.grad = None
        del h
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak(100, "ift") <= peak(10, "ift") * 1.05 + (1 << 20)
    assert peak(100, "unrolled") > 3 * peak(10, "unrolled")


# --------------------------------------------------------------------------- frozen rows
@pytest.mark.parametrize("dtype,backend", [(torch.float64, "eager"), (torch.float32, "eager"), (torch.float32, "triton")],
                         ids=["f64-eager", "f32-eager", "f32-triton"], indirect=["backend"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
def test_converged_rows_keep_their_value(dtype, backend, stop_mode):
    gen = fresh_gen("frozen", str(dtype), backend, stop_mode)
    rates = [0.05, 0.9, 0.3, 0.97]
    f, a, b = affine_rows(rates, 5, dtype, gen)
    h0 = torch.zeros(4, 5, dtype=dtype)
    with torch.no_grad():
        h_star, info = solve(f, h0, tol=1e-4, max_iter=400, check_every=3)
        nstep = info["nstep"].tolist()
        assert nstep[0] < nstep[2] < nstep[1] < nstep[3]
        for row, k in enumerate(nstep):
            # The row holds exactly the iterate at which it converged ...
            alone = picard(lambda h: a[row] * h + b[row], h0[row], k)
            assert torch.equal(h_star[row], alone)
        # ... and the same answer as when solved without the slow rows, or with another check cadence.
        fast, fast_info = solve(lambda h: a[:1] * h + b[:1], h0[:1], tol=1e-4, max_iter=400, check_every=1)
        assert torch.equal(h_star[:1], fast) and fast_info["nstep"].tolist() == nstep[:1]


def clone_state(state):
    return commit_ops.RowState(*(None if t is None else t.clone() for t in (
        state.residual, state.prev, state.lowest, state.nstep, state.lowest_step, state.best)))


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # NaN row, interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [1, 3, 257])
@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
@pytest.mark.parametrize("in_place,keep_best", [(True, False), (False, False), (False, True), (True, True)],
                         ids=["in-place", "copy", "copy-best", "in-place-best"])
def test_commit_kernel_matches_eager(dtype, d, stop_mode, in_place, keep_best, device):
    """The Triton bookkeeping kernel (interpreted on CPU) against its eager twin: frozen,
    active, NaN and not-yet-started rows, with and without a step-provided residual,
    written in place or into a new tensor, with and without the lowest-residual copy."""
    if device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    gen = fresh_gen("commit", str(dtype), d, stop_mode, in_place, keep_best)
    n = 11
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    h_next = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    h_next[4, 0] = math.nan
    best = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype) if keep_best else None
    state = commit_ops.RowState.start(n, device, best=best)
    state.residual[:] = torch.tensor([1e-6, 0.5, math.nan, 3e38, 2.0, 1e-6, 0.1, 7.0, 1e-7, 0.3, math.inf])
    state.lowest[:] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 1e-9, math.inf, 0.2, 9.0, 0.2])
    state.nstep[:] = torch.arange(n, dtype=torch.int32)
    for residual in (None, torch.rand(n, generator=gen).to(device)):
        s_tri, s_eag = clone_state(state), clone_state(state)
        given = h_next.clone()
        out_tri = commit_ops.commit_triton(x, given, residual, s_tri, 1e-4, stop_mode, in_place)
        out_eag = commit_ops.commit_reference(x, h_next.clone(), residual, s_eag, 1e-4, stop_mode)
        torch.testing.assert_close(out_tri, out_eag, rtol=0, atol=0, equal_nan=True)
        assert (out_tri.data_ptr() == given.data_ptr()) == in_place
        if not in_place:  # the step's output is left as it was
            torch.testing.assert_close(given, h_next, rtol=0, atol=0, equal_nan=True)
        for name in ("nstep", "prev", "lowest_step"):
            assert torch.equal(getattr(s_tri, name), getattr(s_eag, name)), name
        for name in ("residual", "lowest"):
            torch.testing.assert_close(getattr(s_tri, name), getattr(s_eag, name), rtol=1e-5, atol=1e-7,
                                       equal_nan=True, msg=name)
        if keep_best:
            torch.testing.assert_close(s_tri.best, s_eag.best, rtol=0, atol=0, equal_nan=True)
            assert not torch.equal(s_tri.best, best)  # some row improved


# --------------------------------------------------------------------------- host syncs
def counting_checks(monkeypatch):
    calls = []
    original = loop_mod.host_check

    def counted(vector):
        calls.append(1)
        return original(vector)

    monkeypatch.setattr(loop_mod, "host_check", counted)
    return calls


def test_check_every_bounds_host_syncs(monkeypatch):
    calls = counting_checks(monkeypatch)
    gen = fresh_gen("checks")
    f, _, _ = affine_rows([0.9, 0.95], 4, torch.float64, gen)
    with torch.no_grad():
        _, info = solve(f, torch.zeros(2, 4, dtype=torch.float64), max_iter=20, check_every=5, tol=1e-30,
                        on_nonconvergence="ignore")
    assert len(calls) == 4 and info["iterations"] == 20


@pytest.mark.parametrize("check_every,checks,iterations", [(5, 2, 10), (None, 2, 8), (1, 8, 8), (100, 1, 60)])
def test_early_exit_at_the_first_check_after_convergence(monkeypatch, check_every, checks, iterations):
    calls = counting_checks(monkeypatch)
    gen = fresh_gen("early", check_every)
    f, _, _ = affine_rows([0.1, 0.1, 0.1], 4, torch.float64, gen)
    # residual_k = 0.1^(k-1) < 10^-6.5 first at k = 8
    with torch.no_grad():
        _, info = solve(f, torch.zeros(3, 4, dtype=torch.float64), max_iter=60, tol=10**-6.5, stop_mode="abs",
                        check_every=check_every)
    assert info["nstep"].tolist() == [8, 8, 8]
    assert len(calls) == checks and info["iterations"] == iterations


def test_backward_syncs_only_at_checks(monkeypatch):
    gen = fresh_gen("bwd-checks")
    f, a, b = affine_rows([0.5, 0.5], 4, torch.float64, gen)
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    h, info = solve(lambda h: w * f(h), torch.zeros(2, 4, dtype=torch.float64), max_iter=20, b_max_iter=30,
                    tol=1e-30, check_every=7, on_nonconvergence="ignore")
    calls = counting_checks(monkeypatch)
    h.sum().backward()
    assert len(calls) == 5  # iterations 7, 14, 21, 28 and the last (30)
    assert info["b_iterations"] == 30 and info["b_nstep"].tolist() == [30, 30]


# --------------------------------------------------------------------------- policies
def unconverging():
    gen = fresh_gen("policy")
    f, _, _ = affine_rows([0.1, 0.99, 0.99, 0.99], 3, torch.float64, gen)
    return f, torch.zeros(4, 3, dtype=torch.float64)


def test_warn_names_the_unconverged_rows():
    f, h0 = unconverging()
    with pytest.warns(ConvergenceWarning, match=r"3 of 4 row\(s\) did not converge in 10 iterations"):
        _, info = solve(f, h0, max_iter=10, tol=1e-6)
    assert info["converged"].tolist() == [True, False, False, False]
    assert info["converged_fraction"].item() == 0.25


def test_raise_and_ignore():
    f, h0 = unconverging()
    with pytest.raises(ConvergenceError, match="did not converge") as err:
        solve(f, h0, max_iter=10, tol=1e-6, on_nonconvergence="raise")
    assert isinstance(err.value, RuntimeError) and err.value.unconverged == 3 and err.value.max_residual > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(f, h0, max_iter=10, tol=1e-6, on_nonconvergence="ignore")
        solve(f, h0, max_iter=2000, tol=1e-6, on_nonconvergence="raise")  # converges: silent


def test_backward_nonconvergence_follows_the_policy():
    gen = fresh_gen("bwd-policy")
    f, params = tanh_problem((3,), 4, torch.float64, gen, sigma=0.9)
    h, info = solve(f, torch.zeros(3, 4, dtype=torch.float64), tol=1e-10, max_iter=500, b_max_iter=3,
                    on_nonconvergence="raise")
    with pytest.raises(ConvergenceError, match="adjoint solve"):
        h.sum().backward()


def nan_at(call_index, row, value=math.nan):
    """tanh problem whose call_index-th evaluation (1-based) returns `value` in `row`."""
    gen = fresh_gen("nan", call_index, row)
    f, _ = tanh_problem((4,), 6, torch.float32, gen)
    calls = [0]

    def g(h):
        calls[0] += 1
        out = f(h)
        if calls[0] == call_index:
            out = out.clone()
            out[row, 2] = value
        return out

    return g


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Inf row, interpreter's numpy
@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_nonfinite_always_raises_naming_the_iteration(policy, value, backend, device):
    if backend == "triton" and device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    with pytest.raises(NonFiniteError, match=r"at iteration 3 in 1 row") as err:
        with torch.no_grad():
            solve(nan_at(3, 1, value), torch.zeros(4, 6), tol=1e-6, max_iter=50, on_nonconvergence=policy)
    assert isinstance(err.value, FloatingPointError) and isinstance(err.value, ConvergenceError)
    assert err.value.iteration == 3 and err.value.rows == 1


def test_nonfinite_gradient_raises_in_backward():
    gen = fresh_gen("nan-bwd")
    f, _ = tanh_problem((3,), 4, torch.float64, gen)
    h, _ = solve(f, torch.zeros(3, 4, dtype=torch.float64), tol=1e-8, max_iter=200)
    cotangent = torch.ones(3, 4, dtype=torch.float64)
    cotangent[2, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"adjoint solve\): non-finite values .* at iteration 1 in 1 row"):
        h.backward(cotangent)


# --------------------------------------------------------------------------- info
def test_info_contents():
    gen = fresh_gen("info")
    rates = [0.5, 0.2, 0.5, 0.3, 0.1, 0.4]
    f, a, b = affine_rows(rates, 3, torch.float64, gen)
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(6, 3, dtype=torch.float64)
    tol = 3e-7
    h, info = solve(lambda h: (w * f(h.reshape(6, 3))).view(2, 3, 3), h0.view(2, 3, 3), tol=tol, stop_mode="abs",
                    max_iter=100)
    lead = (2, 3)
    for name, dtype in [("nstep", torch.int32), ("residual", torch.float32), ("converged", torch.bool),
                        ("abs_lowest", torch.float32), ("rel_lowest", torch.float32)]:
        assert info[name].shape == lead and info[name].dtype == dtype, name
    for name in ("max_residual", "mean_nstep", "converged_fraction", "contraction"):
        assert info[name].shape == () and info[name].dtype == torch.float32, name
    assert info["nonfinite_iter"].item() == 0
    assert torch.equal(info["converged"], info["residual"] < tol)
    assert info["mean_nstep"].item() == pytest.approx(info["nstep"].double().mean().item())
    assert info["max_residual"].item() == info["residual"].max().item()
    # abs residual of an affine row: ||b|| a^(k-1) = a^(k-1); the ratio of the last two is a.
    expected_nstep = [1 + math.ceil(math.log(tol) / math.log(r) - 1e-9) for r in rates]
    assert info["nstep"].flatten().tolist() == expected_nstep
    assert info["contraction"].item() == pytest.approx(max(rates), rel=1e-4)
    torch.testing.assert_close(info["abs_lowest"], info["residual"])
    torch.testing.assert_close(info["rel_lowest"], info["residual"] / h.detach().double().norm(dim=-1).float())
    assert not any(k.startswith("b_") for k in info)
    h.sum().backward()
    assert info["b_nstep"].shape == lead and bool(info["b_converged"].all())


def test_empty_batch():
    h, info = solve(torch.tanh, torch.zeros(0, 5))
    assert h.shape == (0, 5) and info["nstep"].shape == (0,) and info["converged_fraction"].item() == 1


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(max_iter=0), ValueError, "max_iter must be an int >= 1; got 0"),
    (dict(max_iter=2.0), ValueError, "max_iter must be an int >= 1; got 2.0"),
    (dict(max_iter=True), ValueError, "max_iter"),
    (dict(tol=0.0), ValueError, "tol must be a finite float > 0; got 0.0"),
    (dict(tol=-1e-3), ValueError, "tol"),
    (dict(tol=math.nan), ValueError, "tol"),
    (dict(stop_mode="l2"), ValueError, "stop_mode must be one of 'abs', 'rel', 'max'; got 'l2'"),
    (dict(backward="phantom"), ValueError, "backward must be one of 'ift', 'onestep', 'unrolled'; got 'phantom'"),
    (dict(on_nonconvergence="quiet"), ValueError, "on_nonconvergence must be one of 'warn', 'raise', 'ignore'"),
    (dict(check_every=0), ValueError, "check_every must be an int >= 1; got 0"),
    (dict(b_max_iter=0), ValueError, "b_max_iter"),
    (dict(b_tol=0), ValueError, "b_tol"),
    (dict(graph=1), TypeError, "graph must be a bool"),
    (dict(graph=True), ValueError, "needs CUDA tensors; h0 is on cpu"),
])
def test_bad_arguments(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        solve(torch.tanh, torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize("f,h0,exc,fragment", [
    ("not callable", torch.zeros(2, 3), TypeError, "f must be callable"),
    (torch.tanh, torch.zeros(2, 3, dtype=torch.int64), TypeError, "h0 must be float16, bfloat16"),
    (torch.tanh, torch.zeros(()), ValueError, r"h0 must have shape \(..., d\)"),
    (torch.tanh, [0.0], TypeError, "h0 must be a torch.Tensor"),
    (lambda h: h[:, :2], torch.zeros(2, 3), ValueError, r"f must return h's shape \(2, 3\); got \(2, 2\)"),
    (lambda h: h.double(), torch.zeros(2, 3), TypeError, "f must return h's dtype torch.float32; got torch.float64"),
    (lambda h: h.to("meta"), torch.zeros(2, 3), ValueError, "f must return a tensor on h's device cpu; got meta"),
    (lambda h: h.tolist(), torch.zeros(2, 3), TypeError, "f must return a torch.Tensor shaped like h; got list"),
])
def test_bad_inputs_and_bad_f(f, h0, exc, fragment):
    with pytest.raises(exc, match=fragment):
        solve(f, h0)


def test_bad_fused_step():
    h0 = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="step must return a tuple"):
        solve_fused(torch.tanh, h0)
    with pytest.raises(ValueError, match=r"residual must be float32 of shape \(2,\) on cpu; got torch.float64"):
        solve_fused(lambda h: (torch.tanh(h), torch.zeros(2, dtype=torch.float64)), h0)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        solve_fused(lambda h: (h, torch.zeros(2)), h0, max_iters=3)


# --------------------------------------------------------------------------- CUDA graphs
def graph_cell(n, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    step, _, params = rms_cell((n,), d, dtype, gen, device="cuda")
    return step, params


def test_graph_guards_follow_the_tensors_f_reads():
    """What decides a recapture: tensors reachable from f moving, not their values changing."""
    w, frozen, lin = torch.randn(3, 3), torch.randn(3), torch.nn.Linear(3, 3)

    def f(h):
        return lin(h @ w) + frozen

    before = capture_mod.tensor_guards(f)
    assert len(before) == 4  # w, frozen, lin.weight, lin.bias
    with torch.no_grad():
        w.mul_(2)
        lin.weight.add_(1)  # what an optimizer does: in place
    assert capture_mod.tensor_guards(f) == before
    assert capture_mod.tensor_guards(lin.forward) == capture_mod.tensor_guards(lin)
    frozen = frozen + 1  # rebinding the closed-over name: a new address
    assert capture_mod.tensor_guards(f) != before


@cuda_only
@pytest.mark.parametrize("entry", ["solve", "solve_fused"])
def test_graph_matches_eager_and_is_cached(entry, monkeypatch):
    solver.clear_graph_cache()
    step, params = graph_cell(256, 512)
    f = (lambda h: step(h)[0]) if entry == "solve" else step
    run = solve if entry == "solve" else solve_fused
    captures = []
    original = capture_mod.capture
    monkeypatch.setattr(capture_mod, "capture", lambda *a, **k: captures.append(1) or original(*a, **k))
    h0 = torch.randn(256, 512, device="cuda")
    with torch.no_grad():
        h_eager, info_eager = run(f, h0, max_iter=30, tol=1e-5)
        h_graph, info_graph = run(f, h0, max_iter=30, tol=1e-5, graph=True)
        kept = h_graph.clone(), info_graph["nstep"].clone()
        h_again, info_again = run(f, torch.randn_like(h0), max_iter=30, tol=1e-5, graph=True)
    assert len(captures) == 1
    # Same kernels, same frozen rows (cuBLAS may pick another algorithm under capture: not bitwise).
    torch.testing.assert_close(h_graph, h_eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(info_graph["nstep"], info_eager["nstep"])
    assert info_graph["iterations"] == 30
    # A later replay does not overwrite what an earlier one returned.
    assert torch.equal(h_graph, kept[0]) and torch.equal(info_graph["nstep"], kept[1])
    assert h_again.data_ptr() != h_graph.data_ptr()
    # IFT gradients through a graph solve equal those of an eager solve.
    cot = torch.randn_like(h0)
    g_graph = grads_of(run(f, h0, max_iter=30, tol=1e-5, graph=True)[0], params, cot)
    g_eager = grads_of(run(f, h0, max_iter=30, tol=1e-5)[0], params, cot)
    for a, b in zip(g_graph, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda_only
def test_graph_recaptures_when_a_closed_over_tensor_moves():
    solver.clear_graph_cache()
    step, params = graph_cell(64, 128, seed=1)
    w = params[0]
    frozen = torch.randn(64, 128, device="cuda")

    def f(h):
        return torch.tanh(h @ w.T + frozen)

    h0 = torch.zeros(64, 128, device="cuda")
    with torch.no_grad():
        first, _ = solve(f, h0, graph=True, tol=1e-5, max_iter=40)
        frozen = frozen + 1  # rebinding: a new tensor at a new address
        with pytest.warns(UserWarning, match="recapturing"):
            second, _ = solve(f, h0, graph=True, tol=1e-5, max_iter=40)
        expected, _ = solve(f, h0, tol=1e-5, max_iter=40)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_graph_solve_never_syncs(grad):
    solver.clear_graph_cache()
    step, params = graph_cell(256, 512, seed=2)
    h0 = torch.randn(256, 512, device="cuda")
    kw = dict(max_iter=20, tol=1e-4, graph=True, on_nonconvergence="ignore")
    with torch.set_grad_enabled(grad):
        solve_fused(step, h0, **kw)  # capture (synchronizes) outside the checked region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            h, info = solve_fused(step, h0, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert bool(info["converged"].all()) and h.requires_grad == grad


@cuda_only
def test_graph_reports_nonfinite_through_info_when_ignoring():
    solver.clear_graph_cache()
    h0 = torch.zeros(8, 16, device="cuda")
    bad = torch.zeros(8, 16, device="cuda")

    def f(h):
        return torch.tanh(h) + bad

    with torch.no_grad():
        solve(f, h0, graph=True, on_nonconvergence="ignore")
        bad[3, 3] = math.inf
        _, info = solve(f, h0, graph=True, on_nonconvergence="ignore")
        assert info["nonfinite_iter"].item() == 1 and not bool(info["converged"][3])
        with pytest.raises(NonFiniteError, match="iteration 1"):
            solve(f, h0, graph=True, on_nonconvergence="warn")


# --------------------------------------------------------------------------- torchdeq
def test_agrees_with_torchdeq():
    torchdeq = pytest.importorskip("torchdeq")
    from torchdeq.solver.fp_iter import fixed_point_iter

    gen = fresh_gen("torchdeq")
    f, params = tanh_problem((5,), 12, torch.float64, gen)
    h0 = torch.zeros(5, 12, dtype=torch.float64)
    tol = 1e-10
    with torch.no_grad():
        ours, _ = solve(f, h0, tol=tol, max_iter=300, stop_mode="abs")
        theirs, _, their_info = fixed_point_iter(f, h0, max_iter=300, tol=tol, stop_mode="abs")
    assert (ours - theirs).norm(dim=-1).max().item() <= 2 * 0.7 / 0.3 * tol  # both within L/(1-L) tol of h*
    assert float(their_info["abs_lowest"].max()) < tol

    cotangent = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    h_ours, _ = solve(f, h0, tol=1e-12, max_iter=300, stop_mode="abs")
    g_ours = grads_of(h_ours, params, cotangent)
    deq = torchdeq.get_deq(f_solver="fixed_point_iter", b_solver="fixed_point_iter", f_max_iter=300, b_max_iter=300,
                           f_tol=1e-12, b_tol=1e-12, f_stop_mode="abs", b_stop_mode="abs", ift=True)
    z_out, _ = deq(f, h0)
    g_theirs = grads_of(z_out[-1], params, cotangent)
    for a, b in zip(g_ours, g_theirs):
        assert rel_err(a, b) <= 1e-6
