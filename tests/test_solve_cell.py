"""deqkern.solve_cell: gradients against float64 autograd through a long unrolled solve,
agreement with the loop path and the eager twin, scale-free adjoint stopping, policies,
info, validation, and torch.compile with no graph break."""

import warnings

import pytest
import torch
import torch._dynamo

import deqkern
from deqkern.functional import update_with_stats
from deqkern.solver import ConvergenceError, ConvergenceWarning, NonFiniteError
from deqkern.ops import persistent_split
from deqkern.solver import cell as cell_mod
from deqkern.solver import report as report_mod
from numerics import case_seed
from test_ops_persistent import make_cell

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: Relative (Frobenius) error of h* and of each gradient against float64 allowed per dtype.
GRAD_ERR = {torch.float32: 1e-3, torch.bfloat16: 6e-2}
INFO_KEYS = {"nstep", "residual", "converged", "abs_lowest", "rel_lowest", "max_residual", "mean_nstep",
             "converged_fraction", "contraction", "nonfinite_iter", "iterations"}



@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    """On a machine without CUDA, the Triton kernels through the interpreter ("auto"
    never picks it). With CUDA, "auto": the kernels on CUDA tensors, eager on CPU ones
    (forcing "triton" there would refuse the CPU tensors these tests use)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("DEQKERN_BACKEND", "triton")

def problem(lead, d, dtype, seed, broadcast=False, device="cpu"):
    """(weight, frozen, gain) requiring grad, h0, and a cotangent; rows of h0: ``lead``."""
    gen = torch.Generator().manual_seed(case_seed(seed, lead, d, dtype, broadcast))
    n_rows = 1
    for size in lead:
        n_rows *= size
    _, (w, frozen, gain, h0) = make_cell(n_rows, d, dtype, gen, device=device)
    frozen = frozen[0] if broadcast else frozen.reshape(*lead, d)
    cotangent = torch.randn(*lead, d, generator=gen).to(device)
    return [t.detach().requires_grad_() for t in (w, frozen, gain)], h0.reshape(*lead, d), cotangent


def grads(params, h, cotangent, scale=1.0):
    for p in params:
        p.grad = None
    (scale * (h.float() * cotangent).sum()).backward()
    return [p.grad for p in params]


def rel_err(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def float64_reference(params, h0, cotangent):
    """h* and gradients by float64 autograd through 300 unrolled iterations (the loop path)."""
    params64 = [p.detach().double().requires_grad_() for p in params]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEQKERN_BACKEND", "auto")  # float64: eager
        h, _ = deqkern.solve_cell(*params64, h0.double(), tol=1e-13, max_iter=300, backward="unrolled")
    assert deqkern.last_backend() == "eager"
    return h, grads(params64, h, cotangent.double())


@pytest.mark.parametrize("dtype,broadcast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
                         ids=str)
def test_gradients_match_float64_unrolled(dtype, broadcast, device):
    params, h0, cotangent = problem((3, 7), 12, dtype, "grad", broadcast, device)
    h, info = deqkern.solve_cell(*params, h0, tol=TOL[dtype], max_iter=40)
    assert deqkern.last_backend() == cell_mod.BACKEND
    assert h.shape == h0.shape and h.dtype == dtype and isinstance(info["iterations"], int)
    assert bool(info["converged"].all())
    got = grads(params, h, cotangent)
    assert {f"b_{k}" for k in INFO_KEYS} <= set(info) and bool(info["b_converged"].all())
    assert info["b_nstep"].shape == h0.shape[:-1] and isinstance(info["b_iterations"], int)
    h64, expected = float64_reference(params, h0, cotangent)
    assert rel_err(h, h64) < GRAD_ERR[dtype]
    for name, g, g64 in zip(("weight", "frozen", "gain"), got, expected):
        assert g.dtype == dtype and g.shape == g64.shape
        assert rel_err(g, g64) < GRAD_ERR[dtype], name


@pytest.mark.parametrize("path", ["eager", "loop"])
def test_paths_agree(path, monkeypatch, fused_backend_name, device):
    """The eager twin (DEQKERN_BACKEND=eager) and the loop path (the size heuristic says
    no) give the persistent kernel's steps, iterate, info keys and gradients (float32)."""
    params, h0, cotangent = problem((19,), 10, torch.float32, "paths", device=device)
    h, info = deqkern.solve_cell(*params, h0, tol=1e-5)
    got = grads(params, h, cotangent)
    if path == "eager":
        monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    else:
        monkeypatch.setattr(cell_mod, "PERSISTENT_MAX_ELEMENTS", 19 * 10 - 1)
    h_other, info_other = deqkern.solve_cell(*params, h0, tol=1e-5)
    assert deqkern.last_backend() == ("eager" if path == "eager" else fused_backend_name)
    other = grads(params, h_other, cotangent)
    assert set(info) == set(info_other)
    assert torch.equal(info["nstep"], info_other["nstep"])
    assert int((info["b_nstep"] - info_other["b_nstep"]).abs().max()) <= (0 if path == "eager" else 1)
    torch.testing.assert_close(h, h_other, rtol=2e-5, atol=2e-6)  # GPU: float32 GEMMs in tf32x3
    for g, g_other in zip(got, other):
        torch.testing.assert_close(g, g_other, rtol=2e-4, atol=2e-5)


def test_loss_scale_does_not_change_adjoint_iterations():
    """The adjoint stops on the relative residual: a loss x1e-3 or x1e3 takes the same
    adjoint steps per row and scales the gradients."""
    params, h0, cotangent = problem((9,), 8, torch.float32, "scale")
    results = {}
    for scale in (1.0, 1e-3, 1e3):
        h, info = deqkern.solve_cell(*params, h0, tol=1e-5)
        results[scale] = (grads(params, h, cotangent, scale), info["b_nstep"])
    base, base_nstep = results[1.0]
    assert int(base_nstep.min()) > 1
    for scale in (1e-3, 1e3):
        got, nstep = results[scale]
        assert torch.equal(nstep, base_nstep), scale
        for g, g0 in zip(got, base):
            torch.testing.assert_close(g, scale * g0, rtol=1e-4, atol=0)


def test_onestep_is_one_application_at_the_fixed_point():
    params, h0, cotangent = problem((6,), 8, torch.float32, "onestep")
    w, frozen, gain = params
    h, _ = deqkern.solve_cell(*params, h0, damping=0.7, tol=1e-5, max_iter=60, backward="onestep")
    got = grads(params, h, cotangent)
    h_star = h.detach()
    f_out = update_with_stats(h_star @ w.T, frozen, h_star, gain, eps=1e-6, damping=0.7)[0]
    expected = grads(params, f_out, cotangent)
    for g, g_ref in zip(got, expected):
        torch.testing.assert_close(g, g_ref)


def test_h0_gets_no_gradient_and_inplace_on_output_is_caught():
    params, h0, cotangent = problem((5,), 6, torch.float32, "inplace")
    h0.requires_grad_()
    h, _ = deqkern.solve_cell(*params, h0, tol=1e-5)
    grads(params, h, cotangent)
    assert h0.grad is None
    h, _ = deqkern.solve_cell(*params, h0, tol=1e-5)
    h.mul_(2)  # the backward reads h*: autograd's version check refuses, nothing is silently wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(params, h, cotangent)


def test_policies_and_nonfinite():
    params, h0, cotangent = problem((7,), 6, torch.float32, "policy")
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        deqkern.solve_cell(*params, h0, max_iter=2)
    with pytest.raises(ConvergenceError):
        deqkern.solve_cell(*params, h0, max_iter=2, on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h, info = deqkern.solve_cell(*params, h0, max_iter=2, on_nonconvergence="ignore")
    assert isinstance(info["iterations"], torch.Tensor) and int(info["iterations"]) == 2
    assert not bool(info["converged"].all())

    h, info = deqkern.solve_cell(*params, h0, tol=1e-5, max_iter=40, b_max_iter=1)
    with pytest.warns(ConvergenceWarning, match="adjoint solve"):
        grads(params, h, cotangent)
    assert info["b_iterations"] == 1

    w, frozen, gain = params
    bad = frozen.detach().clone()
    bad[3, 0] = float("nan")
    for policy in ("warn", "raise"):
        with pytest.raises(NonFiniteError, match="iteration 1"):
            deqkern.solve_cell(w, bad, gain, h0, on_nonconvergence=policy)
    _, info = deqkern.solve_cell(w, bad, gain, h0, on_nonconvergence="ignore")
    assert int(info["nonfinite_iter"]) == 1 and not bool(info["converged"][3])


def test_info_is_computed_on_first_use(monkeypatch):
    """info's statistics cost ~40 small device ops: none run until info is read; then it
    is a plain dict with solve's keys, including the b_* ones after backward."""
    calls = []
    summarize = report_mod.summarize
    monkeypatch.setattr(report_mod, "summarize", lambda *args: calls.append(1) or summarize(*args))
    params, h0, cotangent = problem((6,), 8, torch.float32, "lazy")
    h, info = deqkern.solve_cell(*params, h0, tol=1e-5, max_iter=40, on_nonconvergence="ignore")
    grads(params, h, cotangent)
    assert calls == [] and isinstance(info, dict)
    merged = {**info, "extra": 1}
    assert calls == [1, 1] and set(merged) == INFO_KEYS | {f"b_{k}" for k in INFO_KEYS} | {"extra"}
    assert isinstance(info["iterations"], torch.Tensor) and int(info["iterations"]) == int(info["nstep"].max())
    info["inj_rms"] = 0.0
    assert calls == [1, 1] and len(info) == 2 * len(INFO_KEYS) + 1


def test_empty_batch():
    params, _, _ = problem((3,), 5, torch.float32, "empty")
    w, _, gain = params
    frozen = torch.zeros(0, 5, requires_grad=True)
    h, info = deqkern.solve_cell(w, frozen, gain, torch.zeros(0, 5))
    assert h.shape == (0, 5) and info["iterations"] == 0
    h.sum().backward()
    assert float(w.grad.abs().sum()) == 0.0


def test_autocast_stores_the_iterate_in_the_autocast_dtype():
    params, h0, cotangent = problem((5,), 8, torch.float32, "autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, info = deqkern.solve_cell(*params, h0, tol=2e-2)
    assert h.dtype == torch.bfloat16 and bool(info["converged"].all())
    got = grads(params, h, cotangent)
    assert [g.dtype for g in got] == [torch.float32] * 3


@pytest.mark.parametrize("kernel", ["auto", "split"])
@pytest.mark.parametrize("backward", ["ift", "onestep"])
def test_compiles_with_no_graph_break(backward, kernel, fused_backend_name, device, monkeypatch):
    monkeypatch.setattr(persistent_split, "KERNEL", kernel)  # "split": its kernel on a CPU too
    params, h0, cotangent = problem((6,), 8, torch.float32, "compile", device=device)

    def loss(w, frozen, gain, h0):
        h, info = deqkern.solve_cell(w, 2 * frozen, gain, h0, tol=1e-5, backward=backward,
                                     on_nonconvergence="ignore")
        return (h.tanh() * cotangent).sum(), info["nstep"]

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(*params, h0).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out, nstep = compiled(*params, h0)
    got = torch.autograd.grad(out, params)
    assert deqkern.last_backend() == (cell_mod.BACKEND if backward == "ift" else fused_backend_name)
    out_e, nstep_e = loss(*params, h0)
    expected = torch.autograd.grad(out_e, params)
    torch._dynamo.reset()
    assert torch.equal(nstep, nstep_e)
    torch.testing.assert_close(out, out_e)
    for g, g_e in zip(got, expected):
        torch.testing.assert_close(g, g_e)


def test_custom_ops_pass_opcheck():
    params, h0, cotangent = problem((5,), 4, torch.float32, "opcheck")
    w, frozen, gain = params
    torch.library.opcheck(cell_mod._solve_op, (w, frozen, gain, h0, 1e-6, 0.85, 20, 1e-5, "rel", 20, 1e-5))
    h = h0.detach().clone()
    torch.library.opcheck(cell_mod._adjoint_op, (w.detach(), frozen.detach(), gain.detach(), h, cotangent, 1e-6, 0.85,
                                                 20, 1e-5))


_W, _F, _G, _H = torch.randn(4, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(3, 4)


@pytest.mark.parametrize("args,kwargs,exc,fragment", [
    ((_W[:3], _F, _G, _H), {}, ValueError, "weight must have shape (4, 4)"),
    ((_W.double(), _F, _G, _H), {}, TypeError, "weight must have h0's dtype torch.float32"),
    ((_W, _F[:2], _G, _H), {}, ValueError, "frozen must have shape (3, 4) or (4,)"),
    ((_W, _F, _G[:3], _H), {}, ValueError, "gain must have shape (4,)"),
    ((_W, _F.to("meta"), _G, _H), {}, ValueError, "frozen must be on h0's device cpu"),
    ((_W, _F, _G, [0.0]), {}, TypeError, "h0 must be a torch.Tensor; got list"),
    ((_W, _F, _G, _H.long()), {}, TypeError, "h0 must be float16"),
    ((_W, _F, _G, torch.zeros(3, 0)), {}, ValueError, "h0 must have shape (..., d) with d >= 1"),
    ((_W, _F, _G, _H), {"damping": 0.0}, ValueError, "damping must be a float in (0, 1]"),
    ((_W, _F, _G, _H), {"eps": -1.0}, ValueError, "eps must be a finite float > 0"),
    ((_W, _F, _G, _H), {"max_iter": 0}, ValueError, "max_iter must be an int >= 1"),
    ((_W, _F, _G, _H), {"tol": [1e-4]}, ValueError, "tol must be a finite float > 0"),
    ((_W, _F, _G, _H), {"stop_mode": "l2"}, ValueError, "stop_mode must be one of"),
    ((_W, _F, _G, _H), {"backward": "exact"}, ValueError, "backward must be one of"),
    ((_W, _F, _G, _H), {"on_nonconvergence": "loud"}, ValueError, "on_nonconvergence must be one of"),
    ((_W, _F, _G, _H), {"b_max_iter": 0}, ValueError, "b_max_iter must be an int >= 1"),
    ((_W, _F, _G, _H), {"b_tol": float("nan")}, ValueError, "b_tol must be a finite float > 0"),
])
def test_bad_input(args, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        deqkern.solve_cell(*args, **kwargs)


@pytest.mark.parametrize("kernel", ["block", "split"])
def test_wide_rows_take_the_persistent_path_only_on_the_split_kernel(kernel, monkeypatch, fused_backend_name, device):
    """Rows wider than PERSISTENT_BLOCK_MAX_D (here lowered to 8) solve on the persistent path
    only where the split kernel takes the size (forced: "split"); where only the block kernel
    would ("block"), on the loop path. The numbers are the block kernel's either way."""
    monkeypatch.setattr(cell_mod, "PERSISTENT_BLOCK_MAX_D", 8)
    monkeypatch.setattr(persistent_split, "KERNEL", kernel)
    params, h0, _ = problem((19,), 10, torch.float32, "wide", device=device)
    h, info = deqkern.solve_cell(*params, h0, tol=1e-5)
    assert persistent_split.use_split(19, 10, h0) == (kernel == "split")
    assert deqkern.last_backend() == (cell_mod.BACKEND if kernel == "split" else fused_backend_name)
    monkeypatch.setattr(cell_mod, "PERSISTENT_BLOCK_MAX_D", 10)
    monkeypatch.setattr(persistent_split, "KERNEL", "block")
    h_block, _ = deqkern.solve_cell(*params, h0, tol=1e-5)
    assert deqkern.last_backend() == cell_mod.BACKEND
    torch.testing.assert_close(h, h_block, rtol=2e-5, atol=2e-6)


def test_heuristic():
    assert cell_mod.use_persistent(256, 512) and cell_mod.use_persistent(4096, 1024)
    assert not cell_mod.use_persistent(256, 4096)  # too wide for the row-wise phase
    # the measured sizes either side of the multiply-add limit
    assert cell_mod.use_persistent(8192, 1024) and cell_mod.use_persistent(32768, 512)
    assert not cell_mod.use_persistent(16384, 2048) and not cell_mod.use_persistent(65536, 1024)
    assert not cell_mod.use_persistent(8193, 1024) and cell_mod.use_persistent(2048, 1024)
    # rows wider than 1024 only on the split kernel (the block kernel's programs each stream W)
    assert not cell_mod.use_persistent(1024, 2048) and cell_mod.use_persistent(256, 2048, split=True)
    assert not cell_mod.use_persistent(4096, 2048, split=True)  # the multiply-add limit still holds
    assert not cell_mod.use_persistent(2**20, 64)  # the element limit: beyond it unmeasured
    # float32 storage: three TF32 products an iteration, a lower multiply-add limit
    assert cell_mod.use_persistent(256, 512, element_size=4) and cell_mod.use_persistent(1024, 1024, element_size=4)
    assert not cell_mod.use_persistent(8192, 1024, element_size=4) and not cell_mod.use_persistent(32768, 512, element_size=4)
