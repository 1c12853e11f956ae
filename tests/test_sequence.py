"""FrozenContextDEQ.forward_sequence: the providers' sequence forms, the time-parallel
sweeps and their implicit backward against the token loop, policies and bad input."""

import warnings

import pytest
import torch

import deqkern
from deqkern.nn import ContextProvider, FrozenContextDEQ, MambaMemory, SlotAttentionContext
from deqkern.nn.context import decay_scan
from numerics import case_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one intra-op thread

D = 12
PROVIDERS = {
    "none": lambda d: [],
    "memory": lambda d: [MambaMemory(d)],
    "slots": lambda d: [SlotAttentionContext(d, n_heads=2)],
    "both": lambda d: [MambaMemory(d), SlotAttentionContext(d, n_heads=2)],
}


def make_layer(contexts="both", *, dtype=torch.float64, seed=0, d=D, **kw):
    torch.manual_seed(seed)
    return FrozenContextDEQ(d, contexts=PROVIDERS[contexts](d), **kw).to(dtype)


def inputs(layer, batch, length, slots, gen, dtype, scale=3.0):
    """x of RMS ``scale`` (an injection that dominates h W^T keeps the cell contractive,
    as in the reference model) and a random initial state."""
    x = scale * torch.randn(batch, length, slots, layer.d_input, generator=gen, dtype=torch.float64)
    state = tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64).to(dtype)
                  for s in layer.init_state(batch, slots, dtype=dtype))
    return x.to(dtype), state


def run(layer, x, state, weights, loss_scale=1.0, **kw):
    """h*, final state and every gradient (parameters, x, initial state) of a loss that
    reads h* and the final states."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state)
    h, new_state, info = layer.forward_sequence(x, state, **kw)
    loss = (h * weights).sum() + sum((s * s.detach().sin()).sum() for s in new_state)
    (loss_scale * loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["x"] = x.grad
    grads.update({f"state{i}": s.grad for i, s in enumerate(state)})
    return h.detach(), tuple(s.detach() for s in new_state), grads, info


def rel(a, b):
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- scan
@pytest.mark.parametrize("length", [1, 2, 17, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decay_scan_matches_recurrence(length, dtype):
    gen = torch.Generator().manual_seed(case_seed("scan", length, dtype))
    d = 7
    inputs_ = torch.randn(3, length, d, generator=gen, dtype=torch.float64)
    log_decay = torch.nn.functional.logsigmoid(4 * torch.randn(d, generator=gen, dtype=torch.float64))
    start = torch.randn(3, d, generator=gen, dtype=torch.float64)
    out = decay_scan(inputs_.to(dtype), log_decay.to(dtype), start.to(dtype))
    memory, ref = start, []
    for t in range(length):
        memory = log_decay.exp() * memory + inputs_[:, t]
        ref.append(memory)
    ref = torch.stack(ref, 1)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-5)


def test_decay_scan_long_sequence_stays_finite_float32():
    """T = 4096 with decays from 0.5 to 1 - 1e-6: a cumulative-product scan (dividing by
    a^t) overflows float32 here; the chunked scan stays exact."""
    gen = torch.Generator().manual_seed(case_seed("scan-long"))
    length, d = 4096, 4
    decay = torch.tensor([0.5, 0.9, 0.999, 1 - 1e-6], dtype=torch.float64)
    inputs_ = torch.randn(1, length, d, generator=gen, dtype=torch.float64)
    start = torch.randn(1, d, generator=gen, dtype=torch.float64)
    out = decay_scan(inputs_.float(), decay.log().float(), start.float())
    memory, ref = start, []
    for t in range(length):
        memory = decay * memory + inputs_[:, t]
        ref.append(memory)
    ref = torch.stack(ref, 1)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("length, tokens", [(length, tokens) for length in (1, 2, 9) for tokens in (
    slice(None), slice(0, None, 2), slice(1, None, 3), slice(2, None, 4)) if range(length)[tokens]])
@pytest.mark.parametrize("provider", ["memory", "slots"])
def test_sequence_forms_equal_the_per_token_loop(provider, length, tokens):
    """prelude_sequence (all tokens, or one color of them) and update_sequence (scan,
    batched attention) against the base class's loop over prelude / update: values and
    gradients in h, state and parameters."""
    gen = torch.Generator().manual_seed(case_seed("forms", provider, length))
    torch.manual_seed(1)
    module = PROVIDERS[provider](6)[0].double()
    h = torch.randn(2, length, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    state = torch.randn(module.init_state(2, 3, "cpu", torch.float64).shape, generator=gen,
                        dtype=torch.float64, requires_grad=True)
    params = [h, state, *module.parameters()]
    results = []
    for impl in (type(module), ContextProvider):
        ctx = impl.prelude_sequence(module, h, state, tokens)
        final = impl.update_sequence(module, h, state)
        weights = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grads = torch.autograd.grad((ctx * weights).sum() + final.pow(2).sum(), params, allow_unused=True,
                                    materialize_grads=True)
        results.append((ctx, final, grads))
    (ctx, final, grads), (ctx_ref, final_ref, grads_ref) = results
    assert ctx.shape == ctx_ref.shape and ctx.shape[:2] == (2, len(range(length)[tokens]))
    torch.testing.assert_close(ctx, ctx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_memory_scan_factors_follow_parameter_updates():
    """The sweeps reuse the scan's decay factors between calls without autograd; an
    optimizer step (in place) or a new tensor must invalidate them."""
    gen = torch.Generator().manual_seed(case_seed("scan-cache"))
    torch.manual_seed(2)
    memory = MambaMemory(6).double()
    h = torch.randn(2, 9, 3, 6, generator=gen, dtype=torch.float64)
    state = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    optimizer = torch.optim.SGD(memory.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            ctx = memory.prelude_sequence(h, state)
        torch.testing.assert_close(ctx, ContextProvider.prelude_sequence(memory, h, state), rtol=1e-12, atol=1e-12)
        memory.prelude_sequence(h, state).sum().backward()
        optimizer.step()
    memory.decay_logit = torch.nn.Parameter(memory.decay_logit.detach() - 1.0)
    with torch.no_grad():
        ctx = memory.prelude_sequence(h, state)
    torch.testing.assert_close(ctx, ContextProvider.prelude_sequence(memory, h, state), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- equivalence
def _equivalence(dtype, length, contexts, tol, h_atol, grad_rtol, warm_starts=(True, False), colors=None,
                 device=torch.device("cpu")):
    gen = torch.Generator().manual_seed(case_seed("seq-eq", dtype, length, contexts))
    layer = make_layer(contexts, dtype=dtype, tol=tol, max_iter=400, on_nonconvergence="raise").to(device)
    x, state = inputs(layer, 2, length, 3, gen, dtype)
    x, state = x.to(device), tuple(s.to(device) for s in state)
    weights = torch.randn(2, length, 3, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
    h, new_state, grads, info = run(layer, x, state, weights, max_sweeps=400, colors=colors)
    assert info["sweeps"] >= 1 and bool(info["converged"].all()) and bool(info["b_converged"].all())
    assert info["residual"].shape == (2, length, 3) and info["inj_rms"].shape == (length,)
    assert 0 < float(info["contraction"]) < 1  # the cell's local rate, measured inside the sweeps
    for warm_start in warm_starts:
        h_ref, state_ref, grads_ref, info_ref = run(layer, x, state, weights, time_parallel=False,
                                                    warm_start=warm_start)
        assert info_ref["sweeps"] == 0 and info_ref["nstep"].shape == (2, length, 3)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=h_atol)
        for s, s_ref in zip(new_state, state_ref):
            torch.testing.assert_close(s, s_ref, rtol=0, atol=h_atol)
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert rel(grads[name], g) <= grad_rtol, (name, warm_start, rel(grads[name], g))


@pytest.mark.parametrize("contexts", sorted(PROVIDERS))
@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_time_parallel_equals_token_loop_float64(length, contexts):
    _equivalence(torch.float64, length, contexts, tol=1e-12, h_atol=1e-6, grad_rtol=1e-6)


@pytest.mark.parametrize("colors", [1, 3, 5])
@pytest.mark.parametrize("length", [4, 23])
def test_every_coloring_equals_the_token_loop(length, colors):
    """Jacobi sweeps (1 color) and Gauss-Seidel over 3 or 5 colors (T not a multiple of
    them): the same fixed point and gradients."""
    _equivalence(torch.float64, length, "both", tol=1e-12, h_atol=1e-6, grad_rtol=1e-6, warm_starts=(True,),
                 colors=colors)


@pytest.mark.parametrize("contexts", sorted(PROVIDERS))
@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_time_parallel_equals_token_loop_float32(length, contexts, monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    _equivalence(torch.float32, length, contexts, tol=1e-6, h_atol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("length, contexts", [(1, "none"), (2, "slots"), (17, "both")])
def test_time_parallel_equals_token_loop_fused_float32(length, contexts, monkeypatch, device, fused_backend_name):
    """The Triton kernels (in Triton's interpreter on a CPU, hence a representative subset)."""
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    _equivalence(torch.float32, length, contexts, tol=1e-6, h_atol=1e-4, grad_rtol=1e-4, warm_starts=(True,),
                 device=device)
    assert deqkern.last_backend() in (fused_backend_name, "triton-persistent")  # the kernels ran (loop: solve_cell)


class _Retrieved(ContextProvider):
    """A user provider with only the per-token protocol (README example, per slot)."""

    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def init_state(self, batch, n_slots, device, dtype):
        return torch.zeros(batch, n_slots, self.proj.in_features, device=device, dtype=dtype)

    def prelude(self, state):
        return 0.3 * torch.tanh(self.proj(state))

    def update(self, h_star, state):
        return 0.5 * state + 0.5 * h_star


def test_provider_without_sequence_form_runs_time_parallel():
    gen = torch.Generator().manual_seed(case_seed("seq-user"))
    torch.manual_seed(0)
    layer = FrozenContextDEQ(D, contexts=[_Retrieved(D), MambaMemory(D)], tol=1e-12, max_iter=400).double()
    x, state = inputs(layer, 2, 9, 3, gen, torch.float64)
    weights = torch.randn(2, 9, 3, D, generator=gen, dtype=torch.float64)
    h, new_state, grads, _ = run(layer, x, state, weights)
    h_ref, state_ref, grads_ref, _ = run(layer, x, state, weights, time_parallel=False)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-9)
    for s, s_ref in zip(new_state, state_ref):
        torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-9)
    for name, g in grads_ref.items():
        assert rel(grads[name], g) <= 1e-6, name


# --------------------------------------------------------------------------- adjoint
@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
def test_adjoint_sweeps_do_not_depend_on_the_loss_scale(stop_mode):
    """A loss scaled by 1e-3 or 1e3: the same adjoint sweeps and the gradient scaled
    exactly (the adjoint's test is relative to the gradient's size)."""
    gen = torch.Generator().manual_seed(case_seed("seq-scale", stop_mode))
    layer = make_layer(tol=1e-7, stop_mode=stop_mode, max_iter=60)
    x, state = inputs(layer, 2, 16, 3, gen, torch.float64)
    weights = torch.randn(2, 16, 3, D, generator=gen, dtype=torch.float64)
    results = {}
    for scale in (1e-3, 1.0, 1e3):
        _, _, grads, info = run(layer, x, state, weights, loss_scale=scale)
        results[scale] = (grads, info["b_sweeps"], info["b_iterations"])
    grads, sweeps, iterations = results[1.0]
    assert sweeps > 2
    for scale, (scaled, scaled_sweeps, scaled_iterations) in results.items():
        assert (scaled_sweeps, scaled_iterations) == (sweeps, iterations), scale
        for name, g in grads.items():
            assert rel(scaled[name] / scale, g) <= 1e-12, (scale, name)


def test_onestep_backward_is_the_gradient_of_one_joint_step():
    gen = torch.Generator().manual_seed(case_seed("seq-onestep"))
    layer = make_layer(tol=1e-12, max_iter=400, backward="onestep")
    x, state = inputs(layer, 2, 5, 3, gen, torch.float64)
    weights = torch.randn(2, 5, 3, D, generator=gen, dtype=torch.float64)
    h, _, _ = layer.forward_sequence(x, state)
    (h * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    h = h.detach()
    contexts = [p.prelude_sequence(h, s) for p, s in zip(layer.contexts, state)]
    frozen = layer.frozen_term(layer.inj(x), contexts).expand(h.shape).contiguous()
    (layer._cell(h, frozen)[0] * weights).sum().backward()
    for name, p in layer.named_parameters():
        assert rel(grads[name], p.grad) <= 1e-10, name


def test_inner_iterations_do_not_change_the_answer():
    gen = torch.Generator().manual_seed(case_seed("seq-inner"))
    layer = make_layer(tol=1e-12, max_iter=400)
    x, state = inputs(layer, 2, 12, 3, gen, torch.float64)
    weights = torch.randn(2, 12, 3, D, generator=gen, dtype=torch.float64)
    results = [run(layer, x, state, weights, inner_iter=k, colors=1, max_sweeps=400) for k in (1, 3, 8)]
    for h, _, grads, info in results[1:]:
        torch.testing.assert_close(h, results[0][0], rtol=0, atol=1e-10)
        for name, g in results[0][2].items():
            assert rel(grads[name], g) <= 1e-8, name
    sweeps = [info["sweeps"] for *_, info in results]
    assert sweeps[0] > sweeps[1] > sweeps[2], sweeps
    for k, (*_, info) in zip((1, 3, 8), results):
        assert info["iterations"] == (info["sweeps"] - 1) * k + 1


# --------------------------------------------------------------------------- policies
def test_nonconvergence_policies():
    gen = torch.Generator().manual_seed(case_seed("seq-policy"))
    x, state = inputs(make_layer(), 2, 8, 3, gen, torch.float64)
    with pytest.raises(deqkern.ConvergenceError, match="2 sweeps"):
        make_layer(tol=1e-12, on_nonconvergence="raise").forward_sequence(x, state, max_sweeps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, info = make_layer(tol=1e-12).forward_sequence(x, state, max_sweeps=2)
    assert any(issubclass(w.category, deqkern.ConvergenceWarning) for w in caught)
    assert info["sweeps"] == 2 and not bool(info["converged"].all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, info = make_layer(tol=1e-12, on_nonconvergence="ignore").forward_sequence(x, state, max_sweeps=2)
    assert float(info["converged_fraction"]) < 1


def test_nonfinite_raises_naming_the_sweep():
    gen = torch.Generator().manual_seed(case_seed("seq-nan"))
    layer = make_layer()
    x, state = inputs(layer, 2, 8, 3, gen, torch.float64)
    x[1, 5, 2, 3] = float("nan")
    with pytest.raises(deqkern.NonFiniteError, match="sweep 1"):
        layer.forward_sequence(x, state)


def test_bad_input():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 4, 3, D)
    with pytest.raises(ValueError, match="x must have shape"):
        layer.forward_sequence(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="T >= 1"):
        layer.forward_sequence(torch.randn(2, 0, 3, D))
    with pytest.raises(TypeError, match="time_parallel must be a bool"):
        layer.forward_sequence(x, time_parallel=1)
    with pytest.raises(ValueError, match="state must be a tuple of 2"):
        layer.forward_sequence(x, (torch.zeros(2, D),))
    for name, value in (("max_sweeps", 0), ("inner_iter", 0), ("colors", 0), ("tol", -1.0), ("tol", float("nan")),
                        ("b_tol", 0.0)):
        with pytest.raises(ValueError, match=name):
            layer.forward_sequence(x, **{name: value})
    with pytest.raises(ValueError, match="MambaMemory state"):
        layer.forward_sequence(x, (torch.zeros(2, D + 1), torch.zeros(2, 3, D)))
    with pytest.raises(ValueError, match="unrolled"):
        make_layer(dtype=torch.float32, backward="unrolled").forward_sequence(x)
    with pytest.raises(ValueError, match="graph=True"):
        make_layer(dtype=torch.float32, graph=True).forward_sequence(x)


class _BadSequence(_Retrieved):
    def prelude_sequence(self, h, state, tokens=slice(None)):
        return h[:, tokens, :1, :-1]


def test_bad_provider_sequence_output_raises():
    layer = FrozenContextDEQ(D, contexts=[_BadSequence(D)])
    with pytest.raises(ValueError, match="prelude_sequence returned shape"):
        layer.forward_sequence(torch.randn(2, 4, 3, D))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_parallel_on_gpu(dtype):
    """The fused kernels on the GPU: float32 equals the token loop; bfloat16 converges and
    stays within bf16 solve accuracy of the float32 answer."""
    gen = torch.Generator().manual_seed(case_seed("seq-gpu", dtype))
    layer = make_layer(dtype=torch.float32, d=64, tol=1e-6, max_iter=200).cuda()
    x, state = inputs(layer, 4, 96, 4, gen, torch.float32)
    x, state = x.cuda(), tuple(s.cuda() for s in state)
    weights = torch.randn(4, 96, 4, 64, generator=gen).cuda()
    h, _, grads, info = run(layer, x, state, weights)
    if dtype == torch.float32:
        h_ref, _, grads_ref, _ = run(layer, x, state, weights, time_parallel=False)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-4)
        for name, g in grads_ref.items():
            assert rel(grads[name], g) <= 1e-4, name
        return
    low = make_layer(dtype=dtype, d=64, tol=2e-2, max_iter=200).cuda()
    low.load_state_dict(layer.state_dict())
    h_low, _, grads_low, info_low = run(low, x.to(dtype), tuple(s.to(dtype) for s in state), weights.to(dtype))
    assert bool(info_low["converged"].all()) and bool(info_low["b_converged"].all())
    assert rel(h_low, h) < 3e-2
    assert rel(grads_low["weight"], grads["weight"]) < 0.1
