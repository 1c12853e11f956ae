"""The host path of the fused ops: per-signature plans (cached validation), the eager
bypass of the custom ops, the backward's reductions and launch count, the cached
kernel launch."""

import pytest
import torch

import deqkern
from deqkern import functional
from deqkern.ops import launch as launch_module
from deqkern.ops.update import update_reference
from numerics import assert_parity, case_seed
from test_ops_update import BAD_CASES, _good, make_inputs, reference64, run_with_grads


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_cached_signature_still_rejects_a_bad_argument(case):
    """A good call caches its signature's plan; a call that differs in one bad argument
    (same tensors otherwise) still raises the public error, also when repeated."""
    _, mutate, kwargs, exc, message = case
    good = _good()
    deqkern.frozen_rmsnorm_update(*good)
    for _ in range(2):
        with pytest.raises(exc, match=message):
            deqkern.frozen_rmsnorm_update(*mutate(good), **kwargs)


@pytest.mark.parametrize("name, value", [("damping", True), ("eps", True)])
def test_bool_scalar_is_not_the_cached_number(name, value):
    """``True == 1`` and hashes like it: the key tells the two apart."""
    good = _good()
    deqkern.frozen_rmsnorm_update(*good, **{name: 1.0})
    with pytest.raises(ValueError, match=name):
        deqkern.frozen_rmsnorm_update(*good, **{name: value})


def test_cache_distinguishes_shapes_dtypes_strides_and_devices(device, fused_backend_name, monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(case_seed("signatures"))
    variants = [((6,), torch.float32, "contiguous"), ((6,), torch.bfloat16, "contiguous"),
                ((3,), torch.float32, "contiguous"), ((6,), torch.float32, "column-stride"),
                ((6,), torch.float32, "row-padding"), ((2, 3), torch.float32, "row-padding"),
                ((6,), torch.float32, "contiguous")]
    for lead, dtype, layout in variants:
        def make():
            if layout == "column-stride":
                return torch.randn(*lead, 16, generator=gen).to(device, dtype)[..., ::2]
            if layout == "row-padding":
                return torch.randn(*lead, 13, generator=gen).to(device, dtype)[..., :8]
            return torch.randn(*lead, 8, generator=gen).to(device, dtype)

        s, f, p = make(), make(), make()
        g = torch.rand(8, generator=gen).to(device) + 0.5
        h, res = deqkern.frozen_rmsnorm_update(s, f, p, g, damping=0.7)
        assert deqkern.last_backend() == fused_backend_name
        h_ref, res_ref, _ = update_reference(s.double(), f.double(), p.double(), g.double(), 1e-6, 0.7, "rel")
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(h.double(), h_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(res.double(), res_ref.double(), rtol=1e-4, atol=1e-5)
    good = _good(device)
    deqkern.frozen_rmsnorm_update(*good)
    with pytest.raises(ValueError, match="h_prev must be on signal's device"):
        deqkern.frozen_rmsnorm_update(good[0], good[1], good[2].to("meta"), good[3])


def test_backend_environment_is_read_at_every_call(device, fused_backend_name, monkeypatch):
    good = _good(device)
    for mode, expected in (("triton", fused_backend_name), ("eager", "eager"), ("triton", fused_backend_name)):
        monkeypatch.setenv("DEQKERN_BACKEND", mode)
        deqkern.frozen_rmsnorm_update(*good)
        assert deqkern.last_backend() == expected


def test_same_signature_other_weight_uses_the_passed_weight(device, monkeypatch):
    """A plan is shared by every call with the same metadata; the tensors are the call's."""
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    x = torch.randn(4, 16, device=device)
    for scale in (1.0, 3.0):
        weight = torch.full((16,), scale, device=device)
        torch.testing.assert_close(functional.rms_norm(x, weight, 1e-6),
                                   torch.nn.functional.rms_norm(x, (16,), weight, 1e-6))


# --------------------------------------------------------------------------- eager bypass
def _graph_targets(fn, *args):
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm

    import torch._dynamo

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out, seen


def test_custom_op_under_compile_function_in_eager(device, fused_backend_name, monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(case_seed("bypass"))
    inputs = make_inputs((5,), 12, torch.float32, device, True, gen)

    def step(s, f, p, g):
        return deqkern.frozen_rmsnorm_update(s, f, p, g, damping=0.6)

    _, targets = _graph_targets(step, *inputs)
    assert torch.ops.deqkern.frozen_rmsnorm_update.default in targets
    h, res = step(*inputs)
    assert "deqkern_frozen_rmsnorm_update" in h.grad_fn.name()  # the eager autograd.Function, no dispatcher
    # the dispatcher's path (registered autograd) gives the same numbers and gradients
    h_op, res_op, _ = torch.ops.deqkern.frozen_rmsnorm_update(*inputs, 1e-6, 0.6, "rel")
    assert torch.equal(h, h_op) and torch.equal(res, res_op)
    grad = torch.randn(5, 12, generator=gen).to(device)
    grads = torch.autograd.grad(h, inputs, grad)
    grads_op = torch.autograd.grad(h_op, inputs, grad)
    for a, b in zip(grads, grads_op):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert step(*inputs)[0].grad_fn is None


def test_opcheck_every_custom_op(device):
    gen = torch.Generator().manual_seed(case_seed("opcheck"))
    s, f, p, g = (t.detach().requires_grad_() for t in make_inputs((3,), 7, torch.float32, device, False, gen))
    torch.library.opcheck(functional._update_op.op, (s, f, p, g, 1e-6, 0.8, "abs"))
    rstd = torch.rand(3, generator=gen).to(device) + 0.5
    grad = torch.randn(3, 7, generator=gen).to(device)
    for need_frozen, need_h_prev in ((True, True), (False, False)):
        torch.library.opcheck(functional._update_backward_op.op,
                              (grad, s.detach(), f.detach(), g.detach(), rstd, 0.8, need_frozen, need_h_prev))


# --------------------------------------------------------------------------- backward reductions
@pytest.mark.parametrize("n, d", [(1, 3), (1, 1000), (40, 1000), (100, 1000), (300, 257)],
                         ids=["N1-d3", "N1-d1000", "N-below-programs", "N-above-programs", "odd-d"])
@pytest.mark.parametrize("broadcast", [True, False], ids=["frozen_bcast", "frozen_full"])
def test_backward_reductions_and_launch_count(n, d, broadcast, device, monkeypatch):
    """d_gain and a broadcast d_frozen, reduced over rows by one program (one launch) or
    by per-program partials plus one summing kernel (two launches), match float64."""
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(case_seed("bwd-reduce", n, d, broadcast))
    inputs = make_inputs((n,), d, torch.float32, device, broadcast, gen)
    grad_out = torch.randn(n, d, generator=gen).to(device)
    h, _ = deqkern.frozen_rmsnorm_update(*inputs, damping=0.7)
    launches = []
    original = launch_module.Launch.__call__
    monkeypatch.setattr(launch_module.Launch, "__call__", lambda self, *t: (launches.append(self), original(self, *t)))
    grads = torch.autograd.grad(h, inputs, grad_out)
    plan = functional._update_plan(*inputs, 1e-6, 0.7, "rel")
    ((_, _, n_programs),) = plan.backward_launches.values()
    assert len(launches) == (1 if n_programs == 1 else 2)
    _, _, grads_ref = reference64(inputs, grad_out, 1e-6, 0.7, "rel")
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    grads_eager = run_with_grads(inputs, grad_out, damping=0.7)[2]
    sums_abs = _row_sums_of_abs(inputs, grad_out, 0.7)
    for name, got, eager, ref in zip(("signal", "frozen", "h_prev", "gain"), grads, grads_eager, grads_ref):
        if name == "gain" or (name == "frozen" and broadcast):
            # A float32 sum over rows, in another order than torch's: its rounding error is
            # bounded by a few units of float32 times the sum of the terms' magnitudes.
            bound = 2 * (eager.double() - ref).abs() + 16 * 2.0**-24 * sums_abs[name] + 1e-6
            assert bool(((got.double() - ref).abs() <= bound).all()), f"d_{name}"
        else:
            assert_parity(got, eager, ref, torch.float32, f"d_{name}")


def _row_sums_of_abs(inputs, grad_out, damping, eps=1e-6):
    """Sums over rows of |term| for d_gain (dy * n) and d_frozen (dz), in float64."""
    s, f, _, g = (t.detach().double() for t in inputs)
    z = s + f
    rstd = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    n = z * rstd
    dyg = damping * grad_out.double() * g
    dz = rstd * (dyg - n * (dyg * n).mean(-1, keepdim=True))
    return {"gain": (damping * grad_out.double() * n).abs().sum(0), "frozen": dz.abs().sum(0)}


def test_full_frozen_of_signals_dtype_shares_signals_gradient(device, monkeypatch):
    """z = signal + frozen: like torch's add, one gradient tensor for both (one write
    less in the backward kernel); a frozen of another dtype gets its own."""
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(case_seed("shared-grad"))
    inputs = make_inputs((5,), 9, torch.float32, device, False, gen)
    h, _ = deqkern.frozen_rmsnorm_update(*inputs, damping=0.7)
    d_signal, d_frozen, _, _ = torch.autograd.grad(h, inputs, torch.ones_like(h))
    assert d_frozen is d_signal
    inputs[1] = inputs[1].detach().double().requires_grad_()
    h, _ = deqkern.frozen_rmsnorm_update(*inputs, damping=0.7)
    d_signal, d_frozen, _, _ = torch.autograd.grad(h, inputs, torch.ones_like(h))
    assert d_frozen.dtype == torch.float64
    torch.testing.assert_close(d_frozen, d_signal.double())


def test_backward_uses_several_programs_when_rows_allow(device, monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(case_seed("programs"))
    few = functional._update_plan(*make_inputs((1,), 1000, torch.float32, device, True, gen), 1e-6, 0.7, "rel")
    many = functional._update_plan(*make_inputs((100,), 1000, torch.float32, device, True, gen), 1e-6, 0.7, "rel")
    assert few._backward_launches(True, True)[2] == 1
    assert many._backward_launches(True, True)[2] > 1


# --------------------------------------------------------------------------- cached launch (GPU)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled-kernel handle exists on CUDA only")
def test_cached_launch_matches_jit_launch_and_handles_misaligned_pointers(monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(case_seed("launch"))
    s, f, p = (torch.randn(64, 96, generator=gen).cuda() for _ in range(3))
    g = torch.rand(96, generator=gen).cuda() + 0.5
    first = deqkern.frozen_rmsnorm_update(s, f, p, g)
    plan = functional._update_plan(s, f, p, g, 1e-6, 1.0, "rel")
    assert plan.forward_launch.run is not None  # the handle was kept from the first (aligned) launch
    second = deqkern.frozen_rmsnorm_update(s, f, p, g)  # through the handle
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    base = torch.randn(64 * 96 + 1, generator=gen).cuda()
    shifted = base[1:].view(64, 96)  # 4-byte offset: not 16-byte aligned
    shifted.copy_(s)
    third = deqkern.frozen_rmsnorm_update(shifted, f, p, g)
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])
