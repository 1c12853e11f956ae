"""Parity, gradients, dispatch and validation of deqkern.frozen_rmsnorm_update."""

import math

import pytest
import torch

import deqkern
from deqkern import _backend
from deqkern.ops.update import update_reference
from numerics import assert_parity, case_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [1, 3, 64, 257, 1000, 4096]
LEADS = [(0,), (), (7,), (2, 3), (2, 1, 3)]
STOP_MODES = ["abs", "rel", "max"]


def make_inputs(lead, d, dtype, device, broadcast, gen):
    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dt)

    signal = rand(*lead, d)
    frozen = rand(d) if broadcast else rand(*lead, d)
    h_prev = rand(*lead, d)
    gain = 1.0 + 0.5 * rand(d, dt=torch.float32)
    return [t.requires_grad_() for t in (signal, frozen, h_prev, gain)]


def run_with_grads(inputs, grad_out, **kw):
    """Forward + backward through the public op; returns (h_next, residual, grads)."""
    h, res = deqkern.frozen_rmsnorm_update(*inputs, **kw)
    backend = deqkern.last_backend()
    torch.autograd.backward(h, grad_out)
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return h.detach(), res, grads, backend


def reference64(inputs, grad_out, eps, damping, stop_mode):
    xs = [t.detach().double().requires_grad_() for t in inputs]
    h, res, _ = update_reference(*xs, eps, damping, stop_mode)
    torch.autograd.backward(h, grad_out.double())
    return h.detach(), res, [x.grad for x in xs]


def _row_terms(name, inputs, grad_out, grads_ref, kw) -> torch.Tensor:
    """``sum over rows |term|`` of a gradient reduced over rows, float64: ``d_gain``'s
    terms ``damping * grad_out * n`` (``n`` the normalized ``z``), a broadcast
    ``d_frozen``'s the rows of ``dz`` (= ``d_signal``)."""
    d = grad_out.shape[-1]
    if name == "frozen":
        return grads_ref[0].abs().reshape(-1, d).sum(0)
    z = (inputs[0].detach().double() + inputs[1].detach().double()).reshape(-1, d)
    n = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + kw["eps"])
    return (kw["damping"] * grad_out.double().reshape(-1, d) * n).abs().sum(0)


@pytest.mark.parametrize("stop_mode", STOP_MODES)
@pytest.mark.parametrize("damping", [1.0, 0.6])
@pytest.mark.parametrize("broadcast", [False, True], ids=["frozen_full", "frozen_bcast"])
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)) or "row")
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_parity(dtype, d, lead, broadcast, damping, stop_mode, device, fused_backend_name, monkeypatch):
    gen = torch.Generator().manual_seed(case_seed(dtype, d, lead, broadcast, damping, stop_mode))
    inputs = make_inputs(lead, d, dtype, device, broadcast, gen)
    grad_out = torch.randn(*lead, d, generator=gen).to(device=device, dtype=dtype)
    kw = dict(eps=1e-6, damping=damping, stop_mode=stop_mode)

    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    h, res, grads, backend = run_with_grads(inputs, grad_out, **kw)
    assert backend == fused_backend_name
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    h_e, res_e, grads_e, backend_e = run_with_grads(inputs, grad_out, **kw)
    assert backend_e == "eager"
    h_ref, res_ref, grads_ref = reference64(inputs, grad_out, **kw)

    assert h.dtype == dtype and h.shape == (*lead, d) and h.is_contiguous()
    assert res.dtype == torch.float32 and res.shape == lead and not res.requires_grad
    assert_parity(h, h_e, h_ref, dtype, "h_next")
    # The residual is float32 from float32 arithmetic in both paths. On the GPU the
    # kernel's rsqrt is the hardware approximation (~2 ulp) where eager rounds exactly;
    # "rel" divides by |h_next|, which amplifies that where h_next nearly cancels
    # (d = 1, damping < 1): 4x the float32 allowance (seen: 3.2e-5 vs 3.1e-5 on an H100).
    assert_parity(res, res_e, res_ref, torch.float32, "residual", ulps=4.0)
    for name, g, g_e, g_ref, t in zip(("signal", "frozen", "h_prev", "gain"), grads, grads_e, grads_ref, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
        # Reduced over rows (d_gain, a broadcast d_frozen): the kernel sums per-program
        # partials in another order than eager, from the GPU's approximate rsqrt: 4 ulps
        # of the terms' magnitudes (seen on the H200: 1.15e-6 against a bound of 1.09e-6
        # relative to |d_gain| itself, fp32, d=4096, 6 rows).
        reduced = name == "gain" or (name == "frozen" and broadcast)
        assert_parity(g, g_e, g_ref, t.dtype, f"d_{name}", ulps=4.0 if reduced else 1.0,
                      summed=math.prod(lead) if reduced else 1,
                      magnitude=_row_terms(name, inputs, grad_out, grads_ref, kw) if reduced else None)


@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 40, 2 * 33, generator=gen).to(device)
    signal = base[:, :, ::2].requires_grad_(False)  # column stride 2
    h_prev = torch.randn(33, 3, 40, generator=gen).to(device).permute(1, 2, 0)  # (3, 40, 33), non-contiguous
    frozen = torch.randn(3, 40, 33, generator=gen).to(device).transpose(0, 1).contiguous().transpose(0, 1)
    gain = torch.randn(66, generator=gen).to(device)[::2]
    assert not (signal.is_contiguous() or h_prev.is_contiguous() or frozen.is_contiguous() or gain.is_contiguous())
    h, res = deqkern.frozen_rmsnorm_update(signal, frozen, h_prev, gain, damping=0.7, stop_mode="abs")
    h_ref, res_ref, _ = update_reference(*(t.double() for t in (signal, frozen, h_prev, gain)), 1e-6, 0.7, "abs")
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.double(), res_ref.double(), rtol=1e-5, atol=1e-6)


def test_max_width_runs_fused_and_wider_falls_back(device, fused_backend_name, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    # The widest row runs fused when asked for (on a CPU "auto" never picks the interpreter);
    # a wider one falls back to eager under "auto" and is refused under "triton".
    for d, backend, expected in ((_backend.MAX_FUSED_D, "triton", fused_backend_name),
                                 (_backend.MAX_FUSED_D + 1, "auto", "eager")):
        monkeypatch.setenv("DEQKERN_BACKEND", backend)
        s, f, p = (torch.randn(2, d, generator=gen).to(device) for _ in range(3))
        g = torch.rand(d, generator=gen).to(device) + 0.5
        h, res = deqkern.frozen_rmsnorm_update(s, f, p, g)
        assert deqkern.last_backend() == expected
        h_ref, res_ref, _ = update_reference(s.double(), f.double(), p.double(), g.double(), 1e-6, 1.0, "rel")
        torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="above the fused limit"):
        deqkern.frozen_rmsnorm_update(s, f, p, g)


def test_float64_runs_eager_and_forced_triton_refuses(device, monkeypatch):
    s, f, p = (torch.randn(4, 8, dtype=torch.float64, device=device) for _ in range(3))
    g = torch.ones(8, dtype=torch.float64, device=device)
    deqkern.frozen_rmsnorm_update(s, f, p, g)
    assert deqkern.last_backend() == "eager"
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="float64"):
        deqkern.frozen_rmsnorm_update(s, f, p, g)


def test_cpu_without_interpreter_is_eager(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.select(torch.device("cpu"), torch.float32, 64) == "eager"
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.select(torch.device("cpu"), torch.float32, 64)
    monkeypatch.setenv("DEQKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="DEQKERN_BACKEND"):
        _backend.select(torch.device("cpu"), torch.float32, 64)


def test_gradcheck_float64_eager():
    gen = torch.Generator().manual_seed(3)
    for frozen_shape in ((3, 5), (5,)):
        s = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        f = torch.randn(*frozen_shape, generator=gen, dtype=torch.float64, requires_grad=True)
        p = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        g = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
        fn = lambda *xs: deqkern.frozen_rmsnorm_update(*xs, eps=1e-3, damping=0.7)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s, f, p, g))


@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
def test_backward_is_deterministic(backend, device):
    gen = torch.Generator().manual_seed(4)
    inputs = make_inputs((300,), 48, torch.float32, device, True, gen)
    grad_out = torch.randn(300, 48, generator=gen).to(device)
    first = run_with_grads(inputs, grad_out)[2]
    second = run_with_grads(inputs, grad_out)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, under the interpreter
@pytest.mark.parametrize("backend", ["triton", "eager"], indirect=True)
@pytest.mark.parametrize("stop_mode", STOP_MODES)
def test_non_finite_rows_give_nan_residual(backend, stop_mode, device):
    s, f, p = (torch.randn(4, 9, device=device) for _ in range(3))
    g = torch.ones(9, device=device)
    s[1, 3] = float("nan")
    f[2, 0] = float("inf")
    _, res = deqkern.frozen_rmsnorm_update(s, f, p, g, stop_mode=stop_mode)
    finite = torch.isfinite(res).cpu()
    assert finite.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="non-finite values in signal, frozen"):
        deqkern.frozen_rmsnorm_update(s, f, p, g, stop_mode=stop_mode, check_finite=True)


def test_torch_compile_traces_op_without_graph_break(device):
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs((6,), 20, torch.float32, device, False, gen)
    weight = torch.randn(20, 20, generator=gen).to(device).requires_grad_()

    def step(s, f, p, g, w):
        h, res = deqkern.frozen_rmsnorm_update(s @ w.T, f, p, g, damping=0.8)
        return h.square().sum() + res.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_loss = step(*inputs, weight)
    eager_grads = torch.autograd.grad(eager_loss, [*inputs, weight])
    comp_loss = compiled(*inputs, weight)
    comp_grads = torch.autograd.grad(comp_loss, [*inputs, weight])
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- validation
def _good(device="cpu"):
    return [torch.randn(4, 8, device=device), torch.randn(8, device=device), torch.randn(4, 8, device=device), torch.ones(8, device=device)]


BAD_CASES = [
    ("signal not a tensor", lambda a: (a[0].tolist(), *a[1:]), {}, TypeError, "signal must be a torch.Tensor"),
    ("integer signal", lambda a: (a[0].long(), *a[1:]), {}, TypeError, "signal must be float16, bfloat16, float32 or float64; got torch.int64"),
    ("integer gain", lambda a: (*a[:3], a[3].int()), {}, TypeError, "gain must be float16"),
    ("h_prev dtype", lambda a: (a[0], a[1], a[2].half(), a[3]), {}, TypeError, "h_prev must have signal's dtype torch.float32; got torch.float16"),
    ("h_prev shape", lambda a: (a[0], a[1], a[2][:3], a[3]), {}, ValueError, r"h_prev must have signal's shape \(4, 8\); got \(3, 8\)"),
    ("frozen shape", lambda a: (a[0], a[1][:5], *a[2:]), {}, ValueError, r"frozen must have signal's shape \(4, 8\) or \(8,\); got \(5,\)"),
    ("gain length", lambda a: (*a[:3], torch.ones(7)), {}, ValueError, r"gain must have shape \(8,\).*got \(7,\)"),
    ("empty width", lambda a: (torch.randn(4, 0), torch.randn(0), torch.randn(4, 0), torch.ones(0)), {}, ValueError, "d >= 1"),
    ("scalar signal", lambda a: (torch.tensor(1.0), *a[1:]), {}, ValueError, "signal must have shape"),
    ("eps zero", lambda a: a, {"eps": 0.0}, ValueError, "eps must be a finite float > 0; got 0.0"),
    ("eps nan", lambda a: a, {"eps": math.nan}, ValueError, "eps must be a finite float > 0"),
    ("damping zero", lambda a: a, {"damping": 0.0}, ValueError, r"damping must be a float in \(0, 1\]; got 0.0"),
    ("damping above one", lambda a: a, {"damping": 1.5}, ValueError, "damping must be a float in"),
    ("stop mode", lambda a: a, {"stop_mode": "l2"}, ValueError, "stop_mode must be one of 'abs', 'rel', 'max'; got 'l2'"),
    ("check_finite type", lambda a: a, {"check_finite": 1}, TypeError, "check_finite must be a bool"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_rejected_with_a_clear_message(case):
    _, mutate, kwargs, exc, message = case
    with pytest.raises(exc, match=message):
        deqkern.frozen_rmsnorm_update(*mutate(_good()), **kwargs)


def test_mixed_devices_rejected():
    a = _good()
    with pytest.raises(ValueError, match="frozen must be on signal's device cpu; got meta"):
        deqkern.frozen_rmsnorm_update(a[0], a[1].to("meta"), a[2], a[3])
