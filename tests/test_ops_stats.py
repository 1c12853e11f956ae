"""The solver's statistics kernels (deqkern.ops.stats: the host check, the info summary),
RowState.start's kernel and the commit's cached plan, each against its eager twin."""

import math

import pytest
import torch

from deqkern import _backend
from deqkern.ops import commit as commit_ops
from deqkern.ops.stats import SUMMARY_SCALARS, check_reference, check_triton, summary_reference, summary_triton
from numerics import case_seed

# FLT_MAX (a row not yet started) times a norm overflows to inf, as in torch: numpy says so.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

# 1: a single row; 257: not a power of two; 20000: more rows than one step of the
# one-program kernels walks under the interpreter (16384), so their loop runs twice.
ROWS = [1, 3, 257, 20000]


@pytest.fixture(autouse=True)
def kernels_run(device):
    if device.type != "cuda" and not _backend.interpreter_active():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")


def fresh_gen(*key):
    return torch.Generator().manual_seed(case_seed("stats", *key))


def random_state(n, scale, gen, device, bad=True):
    """Residuals at ``scale`` (some rows below tol=scale/2, a few NaN, +inf, and never
    started), a previous residual (some FLT_MAX or 0), step counts."""
    residual = scale * torch.rand(n, generator=gen)
    prev = scale * (0.5 + torch.rand(n, generator=gen))
    nstep = torch.randint(1, 40, (n,), generator=gen, dtype=torch.int32)
    if n >= 3:
        pick = torch.randperm(n, generator=gen)[:max(3, n // 50)]
        residual[pick[0]] = commit_ops.FLT_MAX  # not started
        prev[pick[1]] = commit_ops.FLT_MAX
        prev[pick[2]] = 0.0
        if bad:
            residual[pick[1]] = math.nan
            residual[pick[2]] = math.inf
    return [t.to(device) for t in (residual, prev, nstep)]


@pytest.mark.parametrize("n", ROWS)
def test_start_kernel_matches_the_fills(n, device, monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    fused = commit_ops.RowState.start(n, device)
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    eager = commit_ops.RowState.start(n, device)
    for name in ("residual", "prev", "lowest", "nstep", "lowest_step"):
        a, b = getattr(fused, name), getattr(eager, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("bad", [True, False], ids=["nonfinite", "finite"])
def test_check_kernel_matches_eager(n, scale, bad, device):
    gen = fresh_gen("check", n, scale, bad)
    residual, _, nstep = random_state(n, scale, gen, device, bad)
    tol = scale / 2
    got, want = check_triton(residual, nstep, tol), check_reference(residual, nstep, tol)
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if bad and n >= 3:
        assert got[1] > 0 and got[2] == 2 and math.isnan(got[3])


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
@pytest.mark.parametrize("returned", ["last", "lowest"])
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_summary_kernel_matches_eager(n, stop_mode, returned, scale, device):
    gen = fresh_gen("summary", n, stop_mode, returned, scale)
    last, prev, last_nstep = random_state(n, scale, gen, device)
    if returned == "lowest":  # the returned iterate's statistics differ from the current ones
        residual = (scale * torch.rand(n, generator=gen)).to(device)
        nstep = torch.randint(0, 40, (n,), generator=gen, dtype=torch.int32).to(device)
    else:
        residual, nstep = last, last_nstep
    norm = None if stop_mode == "max" else (scale * 10 * torch.rand(n, generator=gen)).to(device)
    tol = scale / 2
    got = summary_triton(residual, nstep, last, last_nstep, prev, norm, tol, stop_mode)
    want = summary_reference(residual, nstep, last, prev, norm, check_reference(last, last_nstep, tol), tol,
                             stop_mode)
    assert set(got) == set(want) == {"converged", "abs_lowest", "rel_lowest", *SUMMARY_SCALARS, "nonfinite_iter"}
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    assert torch.equal(got["converged"], want["converged"]) and torch.equal(got["nonfinite_iter"],
                                                                           want["nonfinite_iter"])
    # the same float32 operations; a GPU's division and square root round within 2 ulps
    exact = device.type == "cpu"
    for name in ("abs_lowest", "rel_lowest", "max_residual", "contraction"):
        torch.testing.assert_close(got[name], want[name], rtol=0 if exact else 2.4e-7, atol=0, equal_nan=True,
                                   msg=name)
    for name in ("mean_nstep", "converged_fraction"):  # the same exact sum over the row count
        torch.testing.assert_close(got[name], want[name], rtol=2e-7, atol=0, msg=name)
    if stop_mode != "max":
        assert not torch.isnan(got["rel_lowest"]).all()


def test_commit_plan_serves_each_layout(device, monkeypatch):
    """One cached plan, steps whose operands change layout (row padding, then contiguous,
    then without a residual): each launch matches the eager commit."""
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = fresh_gen("plan")
    n, d, tol = 7, 5, 1e-4
    state = commit_ops.RowState.start(n, device)
    state_e = commit_ops.RowState.start(n, device)
    x = torch.randn(n, d, generator=gen).to(device)
    for step, (padded, with_residual) in enumerate([(True, True), (False, True), (False, False), (True, True)]):
        h_next = torch.randn(n, d + 3 if padded else d, generator=gen).to(device)[:, :d]
        residual = (torch.rand(n, generator=gen) * (step + 1) * tol * 4).to(device) if with_residual else None
        out = commit_ops.commit_triton(x, h_next, residual, state, tol, "rel", False)
        out_e = commit_ops.commit_reference(x, h_next, residual, state_e, tol, "rel")
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        for name in ("residual", "prev", "lowest", "nstep", "lowest_step"):
            torch.testing.assert_close(getattr(state, name), getattr(state_e, name), rtol=1e-6, atol=0, msg=name)
        x = out
    plan = commit_ops.commit_plan(n, d, x.device, tol, "rel", False, False)  # the tensors' device: cuda:0
    assert len(plan.launches) == 3  # padded + residual, contiguous + residual, contiguous without
