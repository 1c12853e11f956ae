"""torch.compile: the fused op and FusedRMSNorm compile as one graph (fullgraph=True,
inductor); a module calling deqkern.solve compiles with exactly one graph break (the
solve, an eager region: its loop syncs with the host). Compiled and eager outputs and
gradients agree."""

import pytest
import torch
import torch._dynamo
from torch import nn

import deqkern
from deqkern.nn import FusedRMSNorm
from numerics import case_seed

D = 16


class UpdateModel(nn.Module):
    """One damped fused update followed by a FusedRMSNorm."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Linear(D, D)
        self.gain = nn.Parameter(torch.rand(D, generator=gen) + 0.5)
        self.norm = FusedRMSNorm(D)

    def forward(self, h, frozen):
        h_next, residual = deqkern.frozen_rmsnorm_update(self.W(h), frozen, h, self.gain, damping=0.7)
        return self.norm(h_next) * 2, residual


class SolveModel(nn.Module):
    """Injection, a Picard solve of the fused cell, a head."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.U = nn.Linear(D, D)
        self.W = nn.Linear(D, D, bias=False)
        self.gain = nn.Parameter(torch.rand(D, generator=gen) + 0.5)
        self.head = nn.Linear(D, 2)
        with torch.no_grad():
            self.W.weight.mul_(0.3)

    def forward(self, x):
        injection = self.U(x)
        h_star, _ = deqkern.solve(
            lambda h: deqkern.frozen_rmsnorm_update(self.W(h), injection, h, self.gain)[0],
            torch.zeros_like(injection), tol=1e-6, max_iter=60,
        )
        return self.head(h_star).tanh()


def _run(model: nn.Module, *inputs: torch.Tensor):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    model.zero_grad()
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), [t.grad for t in inputs], grads


def _assert_same(compiled, eager, atol=1e-5):
    torch.testing.assert_close(compiled[0], eager[0], atol=atol, rtol=atol)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    for name in eager[2]:
        torch.testing.assert_close(compiled[2][name], eager[2][name], atol=atol, rtol=atol, msg=name)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_op_and_norm_compile_fullgraph(fused, device):
    gen = torch.Generator().manual_seed(case_seed("compile-op"))
    model = UpdateModel(gen).to(device)
    h, frozen = torch.randn(5, D, generator=gen).to(device), torch.randn(5, D, generator=gen).to(device)
    assert torch._dynamo.explain(model)(h, frozen).graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)  # inductor
    got = _run(compiled, h, frozen)
    assert deqkern.last_backend() == fused  # the custom op ran its kernel
    _assert_same(got, _run(model, h, frozen))


def test_solve_module_compiles_with_one_graph_break(fused, device):
    gen = torch.Generator().manual_seed(case_seed("compile-solve"))
    model = SolveModel(gen).to(device)
    x = torch.randn(4, D, generator=gen).to(device)
    explanation = torch._dynamo.explain(model)(x)
    # One break: deqkern.solve is a torch.compiler.disable'd region (its early exit and
    # NaN checks read device values on the host). Everything around it is in 2 graphs.
    assert explanation.graph_break_count == 1
    assert explanation.graph_count == 2
    assert "deqkern.solve" in explanation.break_reasons[0].reason
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # inductor adds nothing to test here, only C++ build time
    got = _run(compiled, x)
    assert deqkern.last_backend() == fused
    _assert_same(got, _run(model, x), atol=1e-5)
