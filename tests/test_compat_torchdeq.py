"""deqkern's solver registered in torchdeq: get_deq(f_solver="deqkern", b_solver="deqkern")
against torchdeq's own fixed_point_iter."""

import sys

import pytest
import torch
from torch import nn

import deqkern
from deqkern.compat import torchdeq as compat
from numerics import case_seed

torchdeq = pytest.importorskip("torchdeq")
from torchdeq.solver import fixed_point_iter  # noqa: E402

compat.register()

B, S, D_IN, D = 3, 4, 6, 16


class DEQFunc(nn.Module):
    """z = RMSNorm(W z + U x), a contraction for the small W used here."""

    def __init__(self, gen: torch.Generator, norm: type = nn.RMSNorm):
        super().__init__()
        self.W = nn.Linear(D, D, bias=False)
        self.U = nn.Linear(D_IN, D)
        self.norm = norm(D)
        with torch.no_grad():
            self.W.weight.copy_(torch.randn(D, D, generator=gen) * 0.15 / D**0.5)
            self.U.weight.copy_(torch.randn(D, D_IN, generator=gen) / D_IN**0.5)
            self.U.bias.copy_(torch.randn(D, generator=gen) * 0.1)
            self.norm.weight.copy_(torch.rand(D, generator=gen) + 0.5)

    def forward(self, z, x):
        return self.norm(self.W(z) + self.U(x))


def _run(solver: str, func: DEQFunc, x: torch.Tensor, **deq_kwargs):
    deq = torchdeq.get_deq(f_solver=solver, b_solver=solver, f_max_iter=60, f_tol=1e-6, f_stop_mode="rel",
                           b_max_iter=60, b_tol=1e-7, **deq_kwargs)
    func.zero_grad()
    z_out, info = deq(lambda z: func(z, x), torch.zeros(x.shape[0], S, D, device=x.device))
    loss = (z_out[-1] * torch.linspace(-1, 1, D, device=x.device)).sum()
    loss.backward()
    return z_out, info, {name: p.grad.clone() for name, p in func.named_parameters()}


@pytest.mark.parametrize("grad_kwargs", [dict(), dict(ift=True), dict(core="indexing", ift=True)],
                         ids=["1step", "ift", "indexing-ift"])
def test_same_fixed_point_and_gradients(grad_kwargs):
    gen = torch.Generator().manual_seed(case_seed("compat", tuple(grad_kwargs)))
    func = DEQFunc(gen)
    x = torch.randn(B, S, D_IN, generator=gen)
    z_ref, info_ref, grads_ref = _run("fixed_point_iter", func, x, **grad_kwargs)
    z, info, grads = _run("deqkern", func, x, **grad_kwargs)
    assert len(z) == len(z_ref)
    torch.testing.assert_close(z[-1], z_ref[-1], atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4, msg=name)
    assert bool((info["rel_lowest"] < 1e-6).all())
    assert bool((info["nstep"] <= info_ref["nstep"].max()).all())


def test_info_is_torchdeq_shaped():
    gen = torch.Generator().manual_seed(case_seed("info"))
    func = DEQFunc(gen)
    x = torch.randn(B, S, D_IN, generator=gen)
    deq = torchdeq.get_deq(f_solver="deqkern", f_max_iter=40, f_tol=1e-4)
    deq.eval()
    with torch.no_grad():
        z_out, info = deq(lambda z: func(z, x), torch.zeros(B, S, D))
    _, _, info_ref = fixed_point_iter(lambda z: func(z, x), torch.zeros(B, S, D), max_iter=40, tol=1e-4)
    assert set(info) == set(info_ref) | {"sradius"}
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        assert info[key].shape == (B,) and info[key].dtype == info_ref[key].dtype, key
    assert info["abs_trace"].shape == (B, 1) and info["rel_trace"].shape == (B, 1)
    assert bool((info["abs_lowest"] < 1e-4).all()) and bool((info["nstep"] >= 1).all())
    torch.testing.assert_close(info["nstep"], info_ref["nstep"], atol=2, rtol=0)
    assert len(z_out) == 1 and z_out[0].shape == (B, S, D)


def test_direct_call_damping_indexing_and_flat_samples():
    gen = torch.Generator().manual_seed(case_seed("direct"))
    weight = torch.randn(5, 5, generator=gen) * 0.3
    bias = torch.randn(5, generator=gen)

    def func(z):
        return torch.tanh(z @ weight.T + bias)

    z0 = torch.randn(4, 5, generator=gen)
    # Few iterations and no early stop: identical Picard iterates, states at each index.
    for tau in (1.0, 0.6):
        z, traj, info = compat.deqkern_solver(func, z0, max_iter=6, tol=1e-12, indexing=[2, 4, 6], tau=tau)
        z_ref, traj_ref, _ = fixed_point_iter(func, z0, max_iter=6, tol=1e-12, indexing=[2, 4, 6], tau=tau)
        assert len(traj) == len(traj_ref) == 3
        for a, b in zip(traj, traj_ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=1e-6)
        assert info["nstep"].tolist() == [6.0] * 4
    # 1-d x0: every element is a sample, as in torchdeq.
    z, _, info = compat.deqkern_solver(torch.cos, torch.zeros(7), max_iter=100, tol=1e-6)
    assert z.shape == (7,) and info["abs_lowest"].shape == (7,)
    torch.testing.assert_close(z, torch.cos(z), atol=1e-5, rtol=0)


def test_patched_model_runs_the_fused_norm(fused, device):
    gen = torch.Generator().manual_seed(case_seed("patched"))
    func = DEQFunc(gen).to(device)
    x = torch.randn(B, S, D_IN, generator=gen).to(device)
    z_ref, _, grads_ref = _run("fixed_point_iter", func, x)
    deqkern.patch(func)
    z, _, grads = _run("deqkern", func, x)
    assert deqkern.last_backend() == fused
    torch.testing.assert_close(z[-1], z_ref[-1], atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4, msg=name)


def test_missing_torchdeq_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq", None)
    monkeypatch.setitem(sys.modules, "torchdeq.solver", None)
    with pytest.raises(ImportError, match="pip install torchdeq"):
        compat.register()
