"""Mixed precision: the fused op, the solver and FusedRMSNorm under torch.autocast.

Policy (deqkern.functional._autocast_storage, deqkern.solver.config.autocast_iterate): under
autocast the iterate (signal, h_prev, h) is stored in the autocast dtype, math and
reductions stay float32, the residual is float32; frozen and gain keep their dtype.
FusedRMSNorm keeps x's dtype, as nn.RMSNorm does under autocast."""

import pytest
import torch
from torch import nn

import deqkern
from deqkern.nn import FusedRMSNorm
from numerics import case_seed

D = 32
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
# Relative (Frobenius) error of a 16-bit run against the fp32 run: a few units of the
# storage dtype's rounding (2^-8 bf16, 2^-11 fp16).
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Solver tolerance (rel. residual) under autocast: above the dtype's rounding floor, and
# low enough that the stopping error stays within REL_TOL.
SOLVE_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class Cell(nn.Module):
    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Linear(D, D, bias=False)
        self.gain = nn.Parameter(torch.rand(D, generator=gen) + 0.5)
        with torch.no_grad():
            self.W.weight.copy_(torch.randn(D, D, generator=gen) * 0.3 / D**0.5)

    def step(self, h: torch.Tensor, frozen: torch.Tensor):
        return deqkern.frozen_rmsnorm_update(self.W(h), frozen, h, self.gain, damping=0.8)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES, ids=str)
def test_op_under_autocast(amp_dtype, fused, device):
    gen = torch.Generator().manual_seed(case_seed("amp-op", amp_dtype))
    cell = Cell(gen).to(device)
    h = torch.randn(6, D, generator=gen).to(device)  # fp32, e.g. the solver's start
    frozen = torch.randn(6, D, generator=gen).to(device).requires_grad_()
    h_ref, res_ref = cell.step(h, frozen)
    grads_ref = torch.autograd.grad(h_ref.sum(), [cell.W.weight, cell.gain, frozen])

    with torch.autocast(device.type, dtype=amp_dtype):
        h_next, residual = cell.step(h, frozen)
    assert deqkern.last_backend() == fused
    assert h_next.dtype == amp_dtype and residual.dtype == torch.float32
    assert _rel_err(h_next, h_ref) < REL_TOL[amp_dtype]
    assert _rel_err(residual, res_ref) < 2 * REL_TOL[amp_dtype]
    grads = torch.autograd.grad(h_next.float().sum(), [cell.W.weight, cell.gain, frozen])
    for name, g, g_ref in zip(("W", "gain", "frozen"), grads, grads_ref):
        assert g.dtype == torch.float32, name  # fp32 parameters keep fp32 gradients
        assert _rel_err(g, g_ref) < 4 * REL_TOL[amp_dtype], name


def test_op_dtype_mismatch_still_an_error_without_autocast():
    gen = torch.Generator().manual_seed(case_seed("amp-mismatch"))
    signal = torch.randn(3, D, generator=gen).bfloat16()
    with pytest.raises(TypeError, match="h_prev must have signal's dtype"):
        deqkern.frozen_rmsnorm_update(signal, torch.zeros(D), torch.randn(3, D, generator=gen), torch.ones(D))


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES, ids=str)
def test_solve_under_autocast(amp_dtype, fused, device):
    gen = torch.Generator().manual_seed(case_seed("amp-solve", amp_dtype))
    cell = Cell(gen).to(device)
    frozen = torch.randn(6, D, generator=gen).to(device)
    h0 = torch.zeros(6, D, device=device)

    def f(h):
        return cell.step(h, frozen)[0]

    h_ref, _ = deqkern.solve(f, h0, tol=1e-6, max_iter=60)
    (h_ref * 2).sum().backward()
    grads_ref = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()

    with torch.autocast(device.type, dtype=amp_dtype):
        h_star, info = deqkern.solve(f, h0, tol=SOLVE_TOL[amp_dtype], max_iter=60, on_nonconvergence="raise")
    assert deqkern.last_backend() == fused
    assert h_star.dtype == amp_dtype and h0.dtype == torch.float32
    assert info["residual"].dtype == torch.float32 and bool(info["converged"].all())
    assert _rel_err(h_star, h_ref) < REL_TOL[amp_dtype]
    (h_star.float() * 2).sum().backward()  # IFT backward, outside autocast as usual
    for p, g_ref in zip(cell.parameters(), grads_ref):
        assert p.grad.dtype == torch.float32
        assert _rel_err(p.grad, g_ref) < 5 * REL_TOL[amp_dtype]


def test_solve_under_autocast_with_fp32_output(device):
    """f whose output autocast leaves in fp32 (a residual add with an fp32 term): the
    iterate is still stored in the autocast dtype."""
    gen = torch.Generator().manual_seed(case_seed("amp-fp32-out"))
    lin = nn.Linear(D, D).to(device)
    with torch.no_grad():
        lin.weight.mul_(0.2)
    x = torch.randn(5, D, generator=gen).to(device)

    def f(h):
        return x + torch.tanh(lin(h)).float()

    h_ref, _ = deqkern.solve(f, torch.zeros(5, D, device=device), tol=1e-6, max_iter=60)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        h_star, info = deqkern.solve(f, torch.zeros(5, D, device=device), tol=2e-2, max_iter=60)
    assert h_star.dtype == torch.bfloat16 and info["residual"].dtype == torch.float32
    assert _rel_err(h_star, h_ref) < REL_TOL[torch.bfloat16]


def test_fused_norm_keeps_input_dtype_under_autocast(device):
    gen = torch.Generator().manual_seed(case_seed("amp-norm"))
    torch_norm, fused = nn.RMSNorm(D).to(device), FusedRMSNorm(D).to(device)
    x = torch.randn(4, D, generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y_torch, y = torch_norm(x), fused(x)
    assert y.dtype == y_torch.dtype == torch.float32
    torch.testing.assert_close(y, y_torch)


def test_op_under_autocast_compiles_fullgraph():
    import torch._dynamo

    gen = torch.Generator().manual_seed(case_seed("amp-compile"))
    cell = Cell(gen)
    h, frozen = torch.randn(4, D, generator=gen), torch.randn(4, D, generator=gen)

    def run(h, frozen):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cell.step(h, frozen)

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got, want = compiled(h, frozen), run(h, frozen)
    torch._dynamo.reset()
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
def test_cuda_autocast_solve_runs_triton():
    gen = torch.Generator().manual_seed(case_seed("amp-cuda"))
    cell = Cell(gen).cuda()
    frozen = torch.randn(8, D, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_star, info = deqkern.solve(lambda h: cell.step(h, frozen)[0], torch.zeros(8, D, device="cuda"), tol=2e-2)
    assert deqkern.last_backend() == "triton"
    assert h_star.dtype == torch.bfloat16 and info["residual"].dtype == torch.float32
