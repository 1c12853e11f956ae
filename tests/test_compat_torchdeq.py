"""deqkern's solvers registered in torchdeq: get_deq(f_solver="deqkern" | "deqkern_anderson" |
"deqkern_broyden") against torchdeq's own fixed_point_iter, anderson and broyden."""

import argparse
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


class TupleFunc(nn.Module):
    """Two states: z = RMSNorm(W z + U x + c), c = tanh(V c + mean_s(z)) -- torchdeq
    flattens the tuple into one row per sample."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.cell = DEQFunc(gen)
        self.V = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.V.weight.copy_(torch.randn(D, D, generator=gen) * 0.2 / D**0.5)

    def forward(self, z, c, x):
        return self.cell(z + c.unsqueeze(1), x), torch.tanh(self.V(c) + z.mean(1))


def _run(solver: str, func: nn.Module, x: torch.Tensor, **deq_kwargs):
    deq = torchdeq.get_deq(f_solver=solver, b_solver=solver, f_max_iter=60, f_tol=1e-6, f_stop_mode="rel",
                           b_max_iter=60, b_tol=1e-7, **deq_kwargs)
    func.zero_grad()
    weight = torch.linspace(-1, 1, D, device=x.device)
    if isinstance(func, TupleFunc):
        z_out, info = deq(lambda z, c: func(z, c, x), (torch.zeros(x.shape[0], S, D), torch.zeros(x.shape[0], D)))
        loss = (z_out[-1][0] * weight).sum() + (z_out[-1][1] * weight).square().sum()
        z_out = [torch.cat([z.flatten(1), c], 1) for z, c in z_out]
    else:
        z_out, info = deq(lambda z: func(z, x), torch.zeros(x.shape[0], S, D, device=x.device))
        loss = (z_out[-1] * weight).sum()
    loss.backward()
    return z_out, info, {name: p.grad.clone() for name, p in func.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


PAIRS = [("deqkern", "fixed_point_iter"), ("deqkern_anderson", "anderson"), ("deqkern_broyden", "broyden")]
GRADS = {"1step": dict(), "ift": dict(ift=True), "hook_ift": dict(hook_ift=True),
         "indexing-ift": dict(core="indexing", ift=True), "indexing-n_states-phantom": dict(core="indexing", n_states=2, grad=3),
         "sliced-n_states-phantom": dict(n_states=2, grad=2), "tuple-ift": dict(ift=True)}


@pytest.mark.parametrize("grad", list(GRADS))
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[0] for p in PAIRS])
def test_same_fixed_point_and_gradients(ours, theirs, grad):
    """Where both converge (f_tol 1e-6 rel): same z* and parameter gradients, float32."""
    gen = torch.Generator().manual_seed(case_seed("compat", ours, grad))
    func = TupleFunc(gen) if grad.startswith("tuple") else DEQFunc(gen)
    x = torch.randn(B, S, D_IN, generator=gen)
    z_ref, info_ref, grads_ref = _run(theirs, func, x, **GRADS[grad])
    z, info, grads = _run(ours, func, x, **GRADS[grad])
    assert len(z) == len(z_ref)
    for a, b in zip(z, z_ref):
        assert _rel(a, b) <= 1e-5  # both within tol 1e-6 (rel) of z*, contraction ~0.2
    for name in grads_ref:
        assert _rel(grads[name], grads_ref[name]) <= 1e-4, name
    assert bool((info["rel_lowest"] < 1e-6).all())


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
    for key in ("abs_trace", "rel_trace"):  # torchdeq's layout: 1e8, one column per step, the lowest repeated
        assert info[key].shape == info_ref[key].shape == (B, 41), key
        assert bool((info[key][:, 0] == 1e8).all())
        torch.testing.assert_close(info[key][:, -1], info[key.replace("trace", "lowest")])
    # nstep: the step of the lowest residual, as torchdeq's
    assert torch.equal(info["nstep"], info["abs_trace"][:, 1:].argmin(1).float() + 1)
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


@pytest.mark.parametrize("solver", ["deqkern", "deqkern_anderson", "deqkern_broyden"])
def test_unknown_solver_arguments_are_named(solver):
    func = DEQFunc(torch.Generator().manual_seed(case_seed("unknown", solver)))
    x = torch.randn(B, S, D_IN)
    deq = torchdeq.get_deq(f_solver=solver, f_max_iter=10)
    with pytest.raises(TypeError, match=f"{solver} got unexpected solver argument\\(s\\): bogus, typo_m"):
        deq(lambda z: func(z, x), torch.zeros(B, S, D), solver_kwargs={"bogus": 1, "typo_m": 3})
    if solver == "deqkern_broyden":
        with pytest.raises(ValueError, match="ls must be False"):
            deq(lambda z: func(z, x), torch.zeros(B, S, D), solver_kwargs={"ls": True})


def test_add_deq_args_accepts_the_registered_solvers():
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    for name in ("deqkern", "deqkern_anderson", "deqkern_broyden"):
        args = parser.parse_args(["--f_solver", name, "--b_solver", name])
        assert args.f_solver == args.b_solver == name
        deq = torchdeq.get_deq(args)
        assert deq.b_solver is compat.SOLVERS[name[len("deqkern"):]]
    with pytest.raises(SystemExit):  # still a choice list
        parser.parse_args(["--b_solver", "no_such_solver"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_deq_with_anderson(dtype):
    """torchdeq's anderson cannot solve in 16 bits (its LU has no bf16/fp16 kernel);
    deqkern_anderson's least squares runs in float32."""
    gen = torch.Generator().manual_seed(case_seed("compat-16", dtype))
    func = DEQFunc(gen).to(dtype)
    x = torch.randn(B, S, D_IN, generator=gen).to(dtype)
    if dtype == torch.bfloat16:
        with pytest.raises((NotImplementedError, RuntimeError)):
            torchdeq.get_deq(f_solver="anderson", f_max_iter=20)(lambda z: func(z, x), torch.zeros(B, S, D, dtype=dtype))
    deq = torchdeq.get_deq(f_solver="deqkern_anderson", b_solver="deqkern_anderson", f_max_iter=30, f_tol=1e-2,
                           f_stop_mode="rel", b_max_iter=30, b_tol=1e-2, ift=True)
    z_out, info = deq(lambda z: func(z, x), torch.zeros(B, S, D, dtype=dtype))
    assert z_out[-1].dtype == dtype and bool((info["rel_lowest"] < 1e-2).all())
    z_out[-1].float().sum().backward()
    func32 = DEQFunc(torch.Generator().manual_seed(case_seed("compat-16", dtype)))
    with torch.no_grad():
        z32, _, _ = fixed_point_iter(lambda z: func32(z, x.float()), torch.zeros(B, S, D), max_iter=100, tol=1e-7)
    assert (z_out[-1].float() - z32).norm() / z32.norm() < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in func.parameters())


def test_return_final_and_outputs_left_alone():
    gen = torch.Generator().manual_seed(case_seed("final"))
    weight, bias = torch.randn(5, 5, generator=gen) * 0.3, torch.randn(5, generator=gen)
    outputs, copies = [], []

    def func(z):
        out = torch.tanh(z @ weight.T + bias)
        outputs.append(out)
        copies.append(out.clone())
        return out

    z0 = torch.randn(4, 5, generator=gen)
    z, _, info = compat.deqkern_anderson(func, z0, max_iter=12, tol=1e-3, return_final=True)
    assert len(outputs) == 12 and info["nstep"].tolist() == [12.0] * 4  # no early stop, the last step
    assert all(torch.equal(a, b) for a, b in zip(outputs, copies))
    z_ref, _, _ = compat.deqkern_anderson(func, z0, max_iter=200, tol=1e-7)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
