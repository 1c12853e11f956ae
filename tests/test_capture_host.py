"""The graph=True host path without a GPU: guards (deqkern.solver.guards), the replay's
output views and the cache's recapture decisions, with the CUDA graph replaced by a
stand-in that only counts replays (the captured solve itself is tested on CUDA in
test_solver.py and test_deq.py)."""

import gc
import weakref

import pytest
import torch
from torch import nn

from deqkern.ops.commit import RowState
from deqkern.solver import capture as capture_mod
from deqkern.solver.config import Config
from deqkern.solver.guards import Guard, tensor_guards
from deqkern.solver.loop import check_vector, summarize

GLOBAL_W = torch.randn(3, 3)


def _uses_global(h):
    return h @ GLOBAL_W


def test_guard_holds_until_a_tensor_f_reads_moves():
    w, lin = torch.randn(3, 3), nn.Linear(3, 3)

    def f(h):
        return lin(h @ w)

    guard = Guard(f)
    assert guard.value == tensor_guards(f) and len(guard.value) == 3
    with torch.no_grad():
        w.mul_(2)
        lin.weight.add_(1)  # in place, as optimizers do
    assert guard.holds(f)
    lin.weight.data = torch.randn(3, 3)  # same Parameter object, new storage
    assert not guard.holds(f)
    guard = Guard(f)
    lin.bias = nn.Parameter(torch.randn(3))  # rebinding a parameter
    assert not guard.holds(f)
    guard = Guard(f)
    w = torch.randn(3, 3)  # rebinding the closed-over name  # noqa: F841
    assert not guard.holds(f)


def test_guard_follows_globals_and_bound_methods():
    global GLOBAL_W
    guard = Guard(_uses_global)
    assert guard.holds(_uses_global)
    GLOBAL_W = GLOBAL_W.clone()
    assert not guard.holds(_uses_global)
    lin = nn.Linear(4, 4)
    guard = Guard(lin.forward)
    assert guard.holds(lin.forward)  # a new bound-method object, same module and function
    assert not guard.holds(nn.Linear(4, 4).forward)
    lin.extra = torch.zeros(2)  # a new tensor attribute: a new walk finds it
    assert not guard.holds(lin.forward)
    assert Guard(lin.forward).value != guard.value


def test_guard_keeps_no_strong_reference_to_its_root():
    lin = nn.Linear(3, 3)

    def f(h):
        return lin(h)

    guard = Guard(f)
    alive = weakref.ref(f)
    del f
    gc.collect()
    assert alive() is None and guard.stale


def _captured(n=6, d=5):
    """A CapturedSolve whose 'graph' copies static_in into the packed h and counts replays."""
    h0 = torch.randn(n, d)
    state = RowState.start(n, h0.device)
    fields = summarize(h0, state, check_vector(state, 1e-4), 1e-4, "rel")
    fields["h"], fields["_check"] = h0, check_vector(state, 1e-4)
    static_in = torch.empty_like(h0)
    packed, layout = capture_mod.pack(fields)
    h_offset, h_bytes = next((off, nb) for name, off, nb, *_ in layout if name == "h")

    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1
            packed.narrow(0, h_offset, h_bytes).view(torch.float32).copy_(static_in.reshape(-1))

    return capture_mod.CapturedSolve(Graph(), static_in, packed, layout, []), fields, Graph


def test_replay_returns_every_field_and_independent_copies(monkeypatch):
    entry, fields, _ = _captured()
    h_a = torch.randn(6, 5)
    views = []
    field = capture_mod._field
    monkeypatch.setattr(capture_mod, "_field", lambda *args: views.append(args[1]) or field(*args))
    h, check, info = entry.run(h_a)
    assert len(views) == 2  # h and the check vector; the info fields when read
    assert info["nstep"].shape == fields["nstep"].shape and len(views) == 3
    assert set(info) | {"h", "_check"} == set(fields)
    for name, value in {**info, "h": h, "_check": check}.items():
        assert value.dtype == fields[name].dtype and value.shape == fields[name].shape
        if name != "h":
            assert torch.equal(value, fields[name])
    assert torch.equal(h, h_a)
    second = entry.run(torch.randn(6, 5))
    assert torch.equal(h, h_a) and not torch.equal(second[0], h_a)  # not overwritten


def test_graph_solve_recaptures_only_when_guarded_tensors_move(monkeypatch):
    captures = []

    def fake_capture(build, h0, extra, loop_kwargs, tol, stop_mode, guards):
        entry = _captured(*h0.shape)[0]
        entry.guards = guards
        captures.append(entry)
        return entry

    monkeypatch.setattr(capture_mod, "capture", fake_capture)
    capture_mod.clear_graph_cache()
    layer = nn.Linear(5, 5)
    cfg = Config(max_iter=3, tol=1e-4, stop_mode="rel", backward="ift", b_max_iter=3, b_tol=1e-4, check_every=4,
                 graph=True, on_nonconvergence="ignore")
    kwargs = dict(max_iter=3, tol=1e-4, stop_mode="rel")
    h0 = torch.randn(6, 5)

    def solve():
        return capture_mod.graph_solve(layer.forward, "f", None, h0, cfg, kwargs)

    h, _, _ = solve()
    assert torch.equal(h, h0) and len(captures) == 1
    layer.note = "an unrelated attribute"  # a changed link, same tensors: no recapture
    with torch.no_grad():
        layer.weight.mul_(0.5)
    solve()
    assert len(captures) == 1
    layer.weight = nn.Parameter(torch.randn(5, 5))
    with pytest.warns(UserWarning, match="recapturing"):
        solve()
    assert len(captures) == 2
    solve()
    assert len(captures) == 2
    capture_mod.clear_graph_cache()
