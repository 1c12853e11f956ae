"""The raw spectral-norm ops: ``deqkern._C.lanczos_`` / ``clamp_`` and their pure-torch twins
in ``deqkern.spectral_reference`` (same checks, same messages, same numbers).

The "cpp" cases fail when the extension is not built, unless DEQKERN_NO_EXT=1 says the
build left it out on purpose.
"""

import math
import os
import re

import pytest
import torch

from deqkern.spectral_reference import clamp_reference, lanczos_reference

IMPLS = ["cpp", "torch"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Square, rectangular (a single row / column, odd widths) and conv kernels, viewed as (out, -1).
SHAPES = [(64, 64), (3, 257), (257, 3), (1, 33), (40, 1), (16, 3, 3, 3), (8, 5, 7), (1, 1)]


def _cpp():
    if os.environ.get("DEQKERN_NO_EXT") == "1":
        pytest.skip("DEQKERN_NO_EXT=1: the C++ extension was left out of the build")
    from deqkern import _C

    return _C.lanczos_, _C.clamp_


@pytest.fixture(params=IMPLS)
def impl(request):
    """(lanczos, clamp) of one backend."""
    return _cpp() if request.param == "cpp" else (lanczos_reference, clamp_reference)


def unit(n: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    vec = torch.randn(n, generator=gen, dtype=torch.float64)
    return (vec / vec.norm()).float().to(device)


def vectors(weights, gen, device="cpu"):
    us = [unit(w.shape[0], gen, device) for w in weights]
    vs = [unit(w.numel() // w.shape[0], gen, device) for w in weights]
    return us, vs


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Of the (out, -1) float64 matrix, with a 0 appended where it is not square (the
    augmented matrix [[0, W^T], [W, 0]] then has zero eigenvalues too)."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double().cpu()
    values = torch.linalg.svdvals(matrix)
    return torch.cat([values, values.new_zeros(1)]) if matrix.shape[0] != matrix.shape[1] else values


# --------------------------------------------------------------------------- estimate
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_iter", [1, 2, 3, 20])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_ritz_is_a_lower_bound_and_bound_is_near_a_singular_value(impl, n_iter, scale, device):
    """ritz = the norm of W on two subspaces <= sigma_1; some singular value lies within
    bound - ritz of ritz (the residual bound), whatever the start vector and the scale."""
    lanczos, _ = impl
    gen = torch.Generator().manual_seed(n_iter)
    weights = [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(device=device, dtype=d)
               for s, d in zip(SHAPES, DTYPES * 2)]
    us, vs = vectors(weights, gen, device)
    ritz, bound = lanczos(weights, us, vs, n_iter)
    assert ritz.dtype == bound.dtype == torch.float32 and ritz.shape == bound.shape == (len(SHAPES),)
    assert ritz.device == weights[0].device
    for shape, w, low, high, u, v in zip(SHAPES, weights, ritz.double().cpu(), bound.double().cpu(), us, vs):
        sv = singular_values(w)
        assert low <= sv[0] * (1 + 1e-5), (shape, low.item(), sv[0].item())
        assert high >= low
        nearest = (sv - low).abs().min()
        assert nearest <= (high - low) * (1 + 1e-3) + 1e-5 * sv[0], (shape, nearest.item(), (high - low).item())
        for vec in (u, v):
            assert abs(vec.norm().item() - 1) <= 1e-5, shape


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_converged_estimate_brackets_sigma_tightly(impl, scale):
    lanczos, _ = impl
    gen = torch.Generator().manual_seed(1)
    weights = [scale * torch.randn(s, generator=gen) for s in SHAPES]
    us, vs = vectors(weights, gen)
    for _ in range(3):  # warm restarts, as the schedule does
        ritz, bound = lanczos(weights, us, vs, 20)
    for shape, w, low, high in zip(SHAPES, weights, ritz.tolist(), bound.tolist()):
        sigma = singular_values(w)[0].item()
        assert low <= sigma * (1 + 1e-5) and high >= sigma * (1 - 1e-5), (shape, low, sigma, high)
        assert high - low <= 1e-4 * sigma, (shape, low, high)


def test_one_step_ritz_is_the_power_iteration_sigma(impl):
    """n_iter=1 costs what one power iteration and its Rayleigh quotient cost (3 products),
    and its Ritz value is that power iteration's sigma = u . W v."""
    lanczos, _ = impl
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    us, vs = vectors(weights, gen)
    expected = []
    for w, v in zip(weights, vs):
        matrix = w.reshape(w.shape[0], -1).double()
        u = matrix @ v.double()
        u /= u.norm()
        v_next = matrix.t() @ u
        v_next /= v_next.norm()
        expected.append(u @ matrix @ v_next)
    ritz, _ = lanczos(weights, us, vs, 1)
    torch.testing.assert_close(ritz.double(), torch.stack(expected), rtol=1e-5, atol=0)


def test_scale_equivariance(impl):
    lanczos, _ = impl
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    us0, vs0 = vectors(base, gen)
    results = {}
    for scale in (1e-3, 1.0, 1e3):
        us, vs = [u.clone() for u in us0], [v.clone() for v in vs0]
        ritz, bound = lanczos([(scale * w).float() for w in base], us, vs, 2)
        results[scale] = (ritz.double() / scale, bound.double() / scale, us, vs)
    for scale in (1e-3, 1e3):
        for got, ref in zip(results[scale][:2], results[1.0][:2]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
        for got, ref in zip(results[scale][2] + results[scale][3], results[1.0][2] + results[1.0][3]):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_degenerate_weights_keep_their_vectors(impl):
    """A zero weight has sigma 0, a NaN weight a NaN estimate; neither overwrites the
    vectors (the schedule keeps working once the weight is fixed). A start vector that is
    already a singular vector (the Krylov space breaks down at once) gives sigma exactly."""
    lanczos, _ = impl
    gen = torch.Generator().manual_seed(4)
    zero, nan, eye = torch.zeros(4, 6), torch.full((5, 5), math.nan), 2 * torch.eye(5)
    us, vs = vectors([zero, nan, eye], gen)
    vs[2] = torch.eye(5)[1].clone()
    before = [t.clone() for t in us[:2] + vs[:2]]
    ritz, bound = lanczos([zero, nan, eye], us, vs, 3)
    assert ritz[0].item() == bound[0].item() == 0.0
    assert math.isnan(ritz[1].item()) and math.isnan(bound[1].item())
    assert ritz[2].item() == pytest.approx(2.0, rel=1e-6) and bound[2].item() == pytest.approx(2.0, rel=1e-6)
    for got, ref in zip(us[:2] + vs[:2], before):
        assert torch.equal(got, ref)
    assert abs(vs[2].norm().item() - 1) <= 1e-6 and abs(us[2].norm().item() - 1) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_cpp_matches_torch(device):
    lanczos, clamp = _cpp()
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(s, generator=gen).to(device=device, dtype=d) for s, d in zip(SHAPES, DTYPES * 2)]
    weights.append(torch.randn(64, 64, generator=gen).to(device))  # a second weight of one shape
    us, vs = vectors(weights, gen, device)
    ref_w, ref_u, ref_v = ([t.clone() for t in ts] for ts in (weights, us, vs))
    targets = torch.full((len(weights),), 0.7, device=device)

    ritz, bound = lanczos(weights, us, vs, 3)
    ref_ritz, ref_bound = lanczos_reference(ref_w, ref_u, ref_v, 3)
    scales = clamp(weights, bound, targets)
    ref_scales = clamp_reference(ref_w, ref_bound, targets)
    tight = dict(rtol=2e-6, atol=1e-7)
    for got, ref in ((ritz, ref_ritz), (bound, ref_bound), (scales, ref_scales)):
        torch.testing.assert_close(got, ref, **tight)
    for name, got, ref in [("u", us, ref_u), ("v", vs, ref_v)]:
        for i, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a, b, **tight, msg=f"{name}[{i}]")
    for w, rw in zip(weights, ref_w):
        # One float32 ulp in the scale can flip a half/bfloat16 rounding: one storage ulp.
        torch.testing.assert_close(w.float(), rw.float(), rtol=2e-6 if w.dtype in (torch.float32, torch.float64)
                                   else 1e-2, atol=0)
    torch.testing.assert_close(clamp(weights, bound, [0.7] * len(weights)), scales, **tight)


# --------------------------------------------------------------------------- clamp values
BAD_VALUES = [
    ([-1.0, 2.0], [0.5, 0.5], "sigmas[0] must be a finite number >= 0, got -1"),
    ([2.0, math.nan], [0.5, 0.5], "sigmas[1] must be a finite number >= 0, got nan"),
    ([math.inf, 2.0], [0.5, 0.5], "sigmas[0] must be a finite number >= 0, got inf"),
    ([2.0, 2.0], [0.5, -0.5], "targets[1] must be a finite number > 0, got -0.5"),
    ([2.0, 2.0], [0.0, 0.5], "targets[0] must be a finite number > 0, got 0"),
    ([2.0, 2.0], [math.nan, 0.5], "targets[0] must be a finite number > 0, got nan"),
]


@pytest.mark.parametrize("as_list", [False, True], ids=["tensor-targets", "list-targets"])
@pytest.mark.parametrize("sigmas, targets, message", BAD_VALUES, ids=[m.split(",")[0] for *_, m in BAD_VALUES])
def test_clamp_rejects_bad_host_values_untouched(impl, sigmas, targets, message, as_list):
    _, clamp = impl
    gen = torch.Generator().manual_seed(6)
    weights = [torch.randn(4, 6, generator=gen), torch.randn(3, 3, generator=gen).half()]
    before = [w.clone() for w in weights]
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        clamp(weights, torch.tensor(sigmas), targets if as_list else torch.tensor(targets))
    for w, b in zip(weights, before):
        assert torch.equal(w, b), "a rejected call must not touch any weight"


def test_clamp_zero_sigma_keeps_the_weight(impl):
    """An all-zero weight's estimate is 0: scale 1, nothing changes."""
    _, clamp = impl
    weights = [torch.zeros(3, 4), torch.ones(2, 2)]
    scales = clamp(weights, torch.tensor([0.0, 4.0]), torch.tensor([0.5, 1.0]))
    assert scales.tolist() == [1.0, 0.25]
    assert torch.equal(weights[0], torch.zeros(3, 4)) and torch.equal(weights[1], torch.full((2, 2), 0.25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_clamp_on_gpu_leaves_bad_weights_untouched(impl):
    """Values on the GPU are not read back: a weight with a bad sigma or target keeps its
    values and gets a NaN scale; the others are clamped."""
    _, clamp = impl
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(5, 7, generator=gen).cuda() for _ in range(6)]
    before = [w.clone() for w in weights]
    sigmas = torch.tensor([-1.0, math.nan, math.inf, 2.0, 2.0, 2.0], device="cuda")
    targets = torch.tensor([0.5, 0.5, 0.5, -0.5, math.nan, 0.5], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scales = clamp(weights, sigmas, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isnan(s) for s in scales[:5].tolist()) and scales[5].item() == 0.25
    for w, b in zip(weights[:5], before[:5]):
        assert torch.equal(w, b)
    torch.testing.assert_close(weights[5], before[5] * 0.25)


# --------------------------------------------------------------------------- arguments
def _overlap_cases():
    buf = torch.randn(12)
    w = torch.randn(6, 6)
    cases = [
        ("us[0] and vs[0]", lambda: ([w], [buf[:6]], [buf[:6]])),
        ("us[0] and vs[0]", lambda: ([w], [buf[:6]], [buf[3:9]])),
        ("weights[0] and vs[0]", lambda: ([w], [torch.randn(6)], [w[2]])),
        ("us[0] and us[1]", lambda: ([w, w.clone()], [buf[:6], buf[5:11]], [torch.randn(6), torch.randn(6)])),
    ]
    return cases


@pytest.mark.parametrize("case", range(4))
def test_lanczos_rejects_shared_memory(impl, case):
    lanczos, _ = impl
    names, make = _overlap_cases()[case]
    weights, us, vs = make()
    before = [t.clone() for t in weights + us + vs]
    with pytest.raises(ValueError, match="^" + re.escape(names) + " overlap in memory"):
        lanczos(weights, us, vs, 2)
    assert all(torch.equal(a, b) for a, b in zip(weights + us + vs, before))


def test_disjoint_views_of_one_buffer_are_fine(impl):
    lanczos, clamp = impl
    gen = torch.Generator().manual_seed(8)
    buf = torch.randn(12, generator=gen)
    weight = torch.randn(6, 6, generator=gen)
    u, v = buf[:6], buf[6:]
    u /= u.norm()
    v /= v.norm()
    ritz, _ = lanczos([weight, weight], [u, torch.randn(6)], [v, torch.randn(6)], 2)  # weights are only read
    assert torch.isfinite(ritz).all()
    both = torch.randn(2, 3, 3, generator=gen)
    clamp([both[0], both[1]], torch.tensor([1.0, 1.0]), [0.5, 0.5])


def test_clamp_rejects_shared_weights(impl):
    _, clamp = impl
    w = torch.randn(4, 4)
    before = w.clone()
    for weights in ([w, w], [w[:2], w[1:3]]):
        with pytest.raises(ValueError, match=r"^weights\[0\] and weights\[1\] overlap in memory"):
            clamp(weights, torch.tensor([4.0, 4.0]), [1.0, 1.0])
    assert torch.equal(w, before)


def test_argument_checks_match_between_backends():
    """Every rejected call raises the same type and message from both backends."""
    cpp_lanczos, cpp_clamp = _cpp()
    w = [torch.randn(4, 6), torch.randn(3, 2, 2)]
    u = [torch.randn(4), torch.randn(3)]
    v = [torch.randn(6), torch.randn(4)]
    cases = [
        ("lanczos", lambda: (w, u[:1], v, 1), ValueError, r"us has 1 entries, expected one per weight \(2\)"),
        ("lanczos", lambda: (w, u, v + v, 1), ValueError, r"vs has 4 entries, expected one per weight \(2\)"),
        ("lanczos", lambda: (w, u, [v[0], torch.randn(5)], 1), ValueError,
         r"vs\[1\] must have shape \(4,\) to match weights\[1\], got \(5,\)"),
        ("lanczos", lambda: (w, [u[0].double(), u[1]], v, 1), TypeError, r"us\[0\] must be float32, got torch.float64"),
        ("lanczos", lambda: (w, u, [torch.zeros(1).expand(6), v[1]], 1), ValueError, r"vs\[0\] must be contiguous"),
        ("lanczos", lambda: (w, u, v, 0), ValueError, "n_iter must be >= 1, got 0"),
        ("lanczos", lambda: ([w[0].long(), w[1]], u, v, 1), TypeError,
         r"weights\[0\] must be a floating-point tensor, got torch.int64"),
        ("lanczos", lambda: ([torch.randn(4)], u[:1], v[:1], 1), ValueError,
         r"weights\[0\] must have at least 2 dimensions, got shape \(4,\)"),
        ("lanczos", lambda: ([torch.randn(0, 3)], u[:1], v[:1], 1), ValueError, r"weights\[0\] must not be empty"),
        ("clamp", lambda: (w, torch.ones(3), torch.ones(2)), ValueError,
         r"sigmas must have shape \(2,\), one per weight, got \(3,\)"),
        ("clamp", lambda: (w, torch.ones(2), [1.0]), ValueError, r"targets must have shape \(2,\)"),
        ("clamp", lambda: (w, torch.ones(2, dtype=torch.int64), [1.0, 1.0]), TypeError,
         "sigmas must be a floating-point tensor, got torch.int64"),
    ]
    for which, args, error, message in cases:
        texts = []
        for fn in ((cpp_lanczos, lanczos_reference) if which == "lanczos" else (cpp_clamp, clamp_reference)):
            with pytest.raises(error, match=message) as info:
                fn(*args())
            texts.append(str(info.value))
        assert texts[0] == texts[1], texts
