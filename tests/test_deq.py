"""FrozenContextDEQ: fixed point, the frozen-context property, fused vs autograd vs
unrolled implicit gradients, contexts, spectral schedule, bad input."""

import warnings

import pytest
import torch

import deqkern
from deqkern.nn import ContextProvider, FrozenContextDEQ, MambaMemory, SlotAttentionContext, cell_adjoint
from numerics import case_seed

D = 12


def make_layer(d=D, *, dtype=torch.float64, contexts=True, seed=0, **kw):
    torch.manual_seed(seed)
    ctx = [MambaMemory(d), SlotAttentionContext(d, n_heads=2 if d % 2 == 0 else 1)] if contexts else []
    return FrozenContextDEQ(d, contexts=ctx, **kw).to(dtype)


def random_state(layer, batch, slots, gen, dtype):
    return tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64).to(dtype)
                 for s in layer.init_state(batch, slots, dtype=dtype))


def cell(h, frozen, layer):
    """The loop body, written out in float64 autograd-able torch ops (the reference)."""
    z = h @ layer.weight.T + frozen
    y = layer.gain * z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + layer.eps)
    return (1 - layer.damping) * h + layer.damping * y


def frozen_of(layer, x, state):
    """The frozen term written out: c * u / rms(u), u = inj(x) + sum of contexts."""
    frozen = layer.inj(x)
    for provider, st in zip(layer.contexts, state):
        ctx = provider.prelude(st)
        frozen = frozen + (ctx.unsqueeze(1) if ctx.dim() == 2 else ctx)
    if not layer.injection_norm:
        return frozen
    return layer.injection_scale * frozen / torch.sqrt(frozen.pow(2).mean(-1, keepdim=True) + layer.eps)


@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
def test_fixed_point_matches_long_reference(stop_mode):
    gen = torch.Generator().manual_seed(case_seed("deq-fp", stop_mode))
    layer = make_layer(tol=1e-10, max_iter=200, stop_mode=stop_mode)
    x = torch.randn(3, 5, D, generator=gen, dtype=torch.float64)
    state = random_state(layer, 3, 5, gen, torch.float64)
    with torch.no_grad():
        h_star, _, info = layer(x, state)
        frozen = frozen_of(layer, x, state)
        ref = torch.zeros_like(h_star)
        for _ in range(500):
            ref = cell(ref, frozen, layer)
    assert bool(info["converged"].all())
    torch.testing.assert_close(h_star, ref, rtol=0, atol=1e-8)
    assert float((cell(h_star, frozen, layer) - h_star).detach().abs().max()) < 1e-8


def test_jacobian_in_h_does_not_see_the_contexts():
    """The loop body's Jacobian with the contexts attached (autograd through the whole
    call, prelude included) equals that of a context-free layer whose injection alone
    produces the same frozen term: no cross terms, d ctx / d h = 0."""
    gen = torch.Generator().manual_seed(case_seed("deq-jac"))
    with_ctx = make_layer(tol=1e-12, max_iter=300)
    without = make_layer(contexts=False, injection_norm=False, tol=1e-12, max_iter=300)
    without.load_state_dict({k: v for k, v in with_ctx.state_dict().items() if not k.startswith("contexts")})
    with torch.no_grad():  # the context-free layer's injection: identity, no bias
        without.inj.weight.copy_(torch.eye(D, dtype=torch.float64))
        without.inj.bias.zero_()
    x = torch.randn(2, 3, D, generator=gen, dtype=torch.float64)
    state = random_state(with_ctx, 2, 3, gen, torch.float64)
    frozen = frozen_of(with_ctx, x, state)  # carries a graph into the providers
    assert frozen.requires_grad
    h = torch.randn(2, 3, D, generator=gen, dtype=torch.float64)

    jac_ctx = torch.autograd.functional.jacobian(lambda t: with_ctx._step(frozen)(t)[0], h)
    jac_plain = torch.autograd.functional.jacobian(lambda t: without._step(frozen.detach())(t)[0], h)
    torch.testing.assert_close(jac_ctx, jac_plain, rtol=0, atol=1e-14)
    jac_ref = torch.autograd.functional.jacobian(lambda t: cell(t, frozen.detach(), with_ctx), h)
    torch.testing.assert_close(jac_ctx, jac_ref, rtol=1e-12, atol=1e-12)

    h_ctx, _, _ = with_ctx(x, state)
    h_plain, _, _ = without(frozen.detach())
    torch.testing.assert_close(h_ctx, h_plain, rtol=0, atol=1e-10)


def test_contexts_move_the_fixed_point():
    gen = torch.Generator().manual_seed(case_seed("deq-move"))
    layer = make_layer(tol=1e-10, max_iter=200)
    x = torch.randn(2, 4, D, generator=gen, dtype=torch.float64)
    state_a = random_state(layer, 2, 4, gen, torch.float64)
    state_b = random_state(layer, 2, 4, gen, torch.float64)
    with torch.no_grad():
        h_a, new_a, info = layer(x, state_a)
        h_b, _, _ = layer(x, state_b)
    assert float((h_a - h_b).abs().max()) > 1e-2
    assert all(float(r) > 0 for r in info["ctx_rms"]) and float(info["inj_rms"]) > 0
    # post-convergence updates: memory mixes in h*, slot state becomes h*
    assert not torch.equal(new_a[0], state_a[0])
    torch.testing.assert_close(new_a[1], h_a)


def _grads(layer, x, state, weights):
    layer.zero_grad()
    h_star, new_state, info = layer(x, state)
    loss = (h_star * weights).sum() + new_state[0].pow(2).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}, info


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def test_ift_fused_equals_autograd_adjoint_and_unrolled_float64():
    gen = torch.Generator().manual_seed(case_seed("deq-ift64"))
    opts = dict(tol=1e-12, max_iter=400)
    x = torch.randn(2, 3, D, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, D, generator=gen, dtype=torch.float64)
    layer = make_layer(**opts)
    state = random_state(layer, 2, 3, gen, torch.float64)
    fused, info = _grads(layer, x, state, weights)
    assert int(info["b_iterations"]) > 1 and bool(info["b_converged"].all())
    results = {}
    for name, kw in {"autograd": dict(fused_backward=False), "unrolled": dict(backward="unrolled")}.items():
        other = make_layer(**opts, **kw)
        other.load_state_dict(layer.state_dict())
        results[name], _ = _grads(other, x, state, weights)
    for name, grads in results.items():
        for param, g in grads.items():
            assert _rel(fused[param], g) <= 1e-6, (name, param, _rel(fused[param], g))


def test_ift_finite_differences_tiny():
    gen = torch.Generator().manual_seed(case_seed("deq-fd"))
    layer = make_layer(4, contexts=False, tol=1e-13, max_iter=500)
    x = torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)

    def loss():
        h, _, _ = layer(x)
        return (h * weights).sum()

    loss().backward()
    analytic = layer.weight.grad.clone()
    numeric = torch.zeros_like(analytic)
    # central differences: truncation ~ step^2 ~ 1e-10, solve noise ~ tol / step ~ 1e-8
    step = 1e-5
    with torch.no_grad():
        for i in range(4):
            for j in range(4):
                layer.weight[i, j] += step
                up = loss()
                layer.weight[i, j] -= 2 * step
                down = loss()
                layer.weight[i, j] += step
                numeric[i, j] = (up - down) / (2 * step)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d", [3, 33])
def test_fused_path_float32_matches_float64(d, device, fused_backend_name, monkeypatch):
    """float32 on the fused kernels (Triton; interpreter on CPU) against the float64 eager
    reference: forward h* and all parameter gradients within float32 solve accuracy."""
    gen = torch.Generator().manual_seed(case_seed("deq-f32", d))
    ref = make_layer(d, tol=1e-12, max_iter=300)
    x = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    state = random_state(ref, 2, 3, gen, torch.float64)
    weights = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    ref_grads, _ = _grads(ref, x, state, weights)
    with torch.no_grad():
        h_ref, _, _ = ref(x, state)

    monkeypatch.setenv("DEQKERN_BACKEND", "triton")  # the float64 reference above ran eager
    layer = make_layer(d, dtype=torch.float32, tol=1e-6, max_iter=60).to(device)
    layer.load_state_dict(ref.state_dict())
    x32, w32 = x.float().to(device), weights.float().to(device)
    state32 = tuple(s.float().to(device) for s in state)
    grads, info = _grads(layer, x32, state32, w32)
    assert deqkern.last_backend() == "triton-persistent"  # the layer's one-launch solve and adjoint ran
    assert bool(info["converged"].all()) and bool(info["b_converged"].all())
    h32, _, _ = layer(x32, state32)
    assert _rel(h32.double().cpu(), h_ref) <= 1e-5
    for name, g in ref_grads.items():
        assert _rel(grads[name].double().cpu(), g) <= 1e-4, (name, _rel(grads[name].double().cpu(), g))


def test_spectral_schedule_bounds_the_weight():
    layer = make_layer(contexts=False, dtype=torch.float32, spectral_target=0.7)
    assert float(torch.linalg.matrix_norm(layer.weight, ord=2)) == pytest.approx(0.7, rel=1e-5)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    schedule = layer.spectral_schedule(every=2, n_power_iter=30)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    schedule.attach(opt)
    opt.step()
    assert float(torch.linalg.matrix_norm(layer.weight, ord=2)) > 2.0  # not yet (every=2)
    opt.step()
    assert float(torch.linalg.matrix_norm(layer.weight, ord=2)) <= 0.7 * (1 + 1e-3)


def test_training_steps_reduce_loss_and_stay_contractive():
    """A few Adam steps with the schedule attached: loss falls, every solve converges,
    the measured contraction stays below 1 (an RMSNorm cell's Lipschitz constant also
    depends on the gain and on |frozen| relative to |W h|, not on ||W||_2 alone)."""
    gen = torch.Generator().manual_seed(case_seed("deq-train"))
    layer = make_layer(16, dtype=torch.float32, tol=1e-4, max_iter=60)
    x = torch.randn(4, 3, 16, generator=gen)
    target = torch.randn(4, 3, 16, generator=gen)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    layer.spectral_schedule(every=1).attach(opt)
    losses, contraction = [], []
    for _ in range(20):
        state = layer.init_state(4, 3)
        h, _, info = layer(x, state)
        loss = (h - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        contraction.append(float(info["contraction"]))
        assert bool(info["converged"].all()) and bool(info["b_converged"].all())
    assert losses[-1] < 0.8 * losses[0]
    assert max(contraction) < 1.0
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2)) <= 0.85 * (1 + 1e-2)


class _BadProvider(ContextProvider):
    def init_state(self, batch, n_slots, device, dtype):
        return torch.zeros(batch, D, device=device, dtype=dtype)

    def prelude(self, state):
        return state.new_ones(state.shape[0], D + 1)

    def update(self, h_star, state):
        return state


class _BadUpdate(_BadProvider):
    def prelude(self, state):
        return state

    def update(self, h_star, state):
        return h_star


def test_bad_input():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, D))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1.0])
    with pytest.raises(ValueError, match="state must be a tuple of 2"):
        layer(x, (torch.zeros(2, D),))
    state = layer.init_state(2, 3)
    with pytest.raises(ValueError, match="MambaMemory state"):
        layer(x, (torch.zeros(2, D + 2), state[1]))
    with pytest.raises(ValueError, match="SlotAttentionContext state"):
        layer(x, (state[0], torch.zeros(2, D)))
    with pytest.raises(ValueError, match="h0 must have shape"):
        layer(x, state, h0=torch.zeros(2, 4, D))
    with pytest.raises(ValueError, match="prelude returned shape"):
        FrozenContextDEQ(D, contexts=[_BadProvider()])(x)
    with pytest.raises(ValueError, match="update returned"):
        FrozenContextDEQ(D, contexts=[_BadUpdate()])(x)
    with pytest.raises(ValueError, match="d_model=8"):
        FrozenContextDEQ(D, contexts=[MambaMemory(8)])
    with pytest.raises(TypeError, match="contexts\\[0\\]"):
        FrozenContextDEQ(D, contexts=[torch.nn.Linear(D, D)])
    with pytest.raises(ValueError, match="d_model must be"):
        FrozenContextDEQ(0)
    with pytest.raises(ValueError, match="damping"):
        FrozenContextDEQ(D, damping=1.5)
    with pytest.raises(ValueError, match="tol"):
        FrozenContextDEQ(D, tol=-1.0)(x)


def test_nonconvergence_is_reported():
    layer = make_layer(dtype=torch.float32, max_iter=2, tol=1e-9, on_nonconvergence="raise")
    with pytest.raises(deqkern.ConvergenceError):
        layer(torch.randn(2, 3, D))
    layer = make_layer(dtype=torch.float32, max_iter=2, tol=1e-9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, info = layer(torch.randn(2, 3, D))
    assert any(issubclass(w.category, deqkern.ConvergenceWarning) for w in caught)
    assert not bool(info["converged"].all())


class _Cell:
    """A frozen-context cell with stable tensors (graph=True caches per bound step)."""

    def __init__(self, n, d, device, gen):
        w = torch.randn(d, d, generator=gen)
        self.w = (0.5 * w / torch.linalg.matrix_norm(w, ord=2)).to(device).requires_grad_()
        self.gain = (1 + 0.1 * torch.randn(d, generator=gen)).to(device).requires_grad_()
        self.frozen = torch.randn(n, d, generator=gen).to(device).requires_grad_()

    def step(self, h):
        return deqkern.frozen_rmsnorm_update(torch.nn.functional.linear(h, self.w), self.frozen, h, self.gain,
                                             damping=0.8, stop_mode="rel")

    def adjoint(self):
        return cell_adjoint(self.w, self.gain, self.frozen, damping=0.8, eps=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_captured_fused_adjoint_matches_uncaptured():
    """graph=True replays the forward and the fused adjoint solve from CUDA graphs: same
    gradients as without graphs, also after the weights change in place (replays read
    the new values), and no recapture warning on repeated calls."""
    gen = torch.Generator().manual_seed(case_seed("deq-graph-adjoint"))
    cell = _Cell(96, 40, torch.device("cuda"), gen)
    h0 = torch.randn(96, 40, generator=gen).cuda()
    weights = torch.randn(96, 40, generator=gen).cuda()

    def grads(graph):
        for p in (cell.w, cell.gain, cell.frozen):
            p.grad = None
        h, info = deqkern.solve_fused(cell.step, h0, max_iter=60, tol=1e-6, graph=graph, adjoint=cell.adjoint(),
                                      b_max_iter=60, on_nonconvergence="raise")
        (h * weights).sum().backward()
        assert bool(info["b_converged"].all())
        return [p.grad.clone() for p in (cell.w, cell.gain, cell.frozen)]

    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a recapture would warn
            plain, captured = grads(False), grads(True)
        for a, b in zip(captured, plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            cell.w.mul_(0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_graph_mode_matches_eager_mode():
    """FrozenContextDEQ(graph=True): same h*, state and parameter gradients (contexts
    and injection included) as graph=False, over a chain of calls whose inputs change
    and one backward at the end (as a sequence model runs it: every call's adjoint must
    use that call's frozen term, not the last one staged for the forward graph)."""
    gen = torch.Generator().manual_seed(case_seed("deq-layer-graph"))
    layers = {g: make_layer(16, dtype=torch.float32, tol=1e-6, max_iter=60, graph=g, seed=3).cuda()
              for g in (False, True)}
    layers[True].load_state_dict(layers[False].state_dict())
    xs = [torch.randn(4, 3, 16, generator=gen).cuda() for _ in range(3)]
    weights = [torch.randn(4, 3, 16, generator=gen).cuda() for _ in range(3)]
    out = {}
    for g, layer in layers.items():
        layer.zero_grad()
        state = tuple(torch.full_like(s, 0.5) for s in layer.init_state(4, 3))
        loss, hs = 0.0, []
        for x, w in zip(xs, weights):
            h, state, _ = layer(x, state)
            loss = loss + (h * w).sum()
            hs.append(h.detach())
        (loss + state[0].sum()).backward()
        out[g] = (hs, {n: p.grad.clone() for n, p in layer.named_parameters()})
    for a, b in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_diagnostics_cost_nothing_until_read_and_match_eager():
    """inj_rms, ctx_rms and lipschitz_bound are computed on first read of info: a call runs
    no device op for them (counted at the dispatcher), and the values equal the eager
    formulas; a context modified in place before the read gives NaN, not another tensor's
    RMS. Under inference_mode (no version counters) the layer still works."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reductions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = FrozenContextDEQ(16, contexts=[MambaMemory(16)])
    x = torch.randn(2, 3, 16)
    state = layer.init_state(2, 3)
    with torch.no_grad():
        layer(x, state)  # the first call computes sigma(W) and the bound's factor
        with Reductions() as seen:
            h, _, info = layer(x, state)
        ops_without_read = list(seen.names)
        ctx = layer.contexts[0].prelude(state[0])
        inj = layer.inj(x)
        expected_inj = inj.float().pow(2).mean().sqrt()
        expected_ctx = ctx.float().pow(2).mean().sqrt()
        sigma = torch.linalg.matrix_norm(layer.weight.double(), 2)
    assert float(info["inj_rms"]) == pytest.approx(float(expected_inj), rel=1e-6)
    assert float(info["ctx_rms"][0]) == pytest.approx(float(expected_ctx), rel=1e-6)
    bound = float(info["lipschitz_bound"])
    rstd_max = float(torch.rsqrt((h.double() @ layer.weight.double().T + layer.frozen_term(inj, [ctx.unsqueeze(1)]).double())
                                 .pow(2).mean(-1) + layer.eps).max())
    expected = (1 - layer.damping) + layer.damping * float(layer.gain.abs().max()) * float(sigma) * rstd_max
    assert bound == pytest.approx(expected, rel=2e-3)  # sigma: one warm-started power step per change of W
    with torch.no_grad():
        with Reductions() as seen:
            _, _, info_read = layer(x, state)
            float(info_read["lipschitz_bound"])
    extra = len(seen.names) - len(ops_without_read)
    assert extra >= 3, (ops_without_read, seen.names)  # the read pays for them, the call did not
    with torch.no_grad():  # reading a solve's key (generation reads nstep) leaves the diagnostics pending
        _, _, info_solve = layer(x, state)
        info_solve["nstep"]
        assert sorted(key for key, _ in info_solve._values) == ["ctx_rms", "inj_rms", "lipschitz_bound"]
        with Reductions() as seen:
            info_solve["converged"], info_solve.get("contraction")
        assert seen.names == []
        assert set(info_solve) >= {"lipschitz_bound", "inj_rms", "ctx_rms", "nstep"}  # iteration fills all

    class Exposed(MambaMemory):
        """A provider whose prelude hands out a tensor the test can modify afterwards."""
        def prelude(self, st):
            self.last = super().prelude(st)
            return self.last

    layer.contexts[0].__class__ = Exposed
    with torch.no_grad():
        _, _, info_mod = layer(x, state)
        layer.contexts[0].last.add_(1.0)
    assert torch.isnan(info_mod["ctx_rms"][0]) and torch.isfinite(info_mod["inj_rms"])
    with torch.inference_mode():
        _, _, info_inf = layer(x, state)
        assert torch.isfinite(info_inf["ctx_rms"][0]) and torch.isfinite(info_inf["lipschitz_bound"])
