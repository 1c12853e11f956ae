"""pytest-benchmark cases for the update op: ``pytest bench --benchmark-only``.

Small sizes that run in seconds on a CPU. Eager is timed everywhere; the fused op only
on a CUDA GPU (under the Triton interpreter it is a correctness tool, not a speed
baseline). Each case first checks its output against eager on random inputs.
"""

import pytest
import torch

import common
from bench_update import eager_update, fused_update

SHAPES = [(1024, 256), (4096, 512)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(n, d, dtype, device, requires_grad=False):
    gen = torch.Generator().manual_seed(n + d)
    s, f, p = (torch.randn(n, d, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    g = (1 + 0.1 * torch.randn(d, generator=gen)).to(device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (s, f, p, g)]


def _variant(name, device):
    if name == "fused" and device.type != "cuda":
        pytest.skip("the fused op is timed on CUDA only (the interpreter is not a speed baseline)")
    return {"eager": eager_update, "fused": fused_update}[name]


def _synced(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("variant", ["eager", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_update_forward(benchmark, device, variant, dtype, n, d):
    fn = _variant(variant, device)
    ins = _inputs(n, d, dtype, device)
    with torch.no_grad():
        h_ref, _ = eager_update(*ins)
        h, res = fn(*ins)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert common.check_close("h_next", h, h_ref, tol) == "ok"
    assert res.shape == (n,) and torch.isfinite(res).all()

    def forward():
        with torch.no_grad():
            return fn(*ins)

    benchmark.extra_info.update(n=n, d=d, dtype=str(dtype), variant=variant)
    benchmark(_synced(forward, device))


@pytest.mark.parametrize("variant", ["eager", "fused"])
@pytest.mark.parametrize("n,d", SHAPES[:1])
def test_update_forward_backward(benchmark, device, variant, n, d):
    fn = _variant(variant, device)
    ins = _inputs(n, d, torch.float32, device, requires_grad=True)
    grad = torch.randn(n, d, device=device)
    ref = torch.autograd.grad(eager_update(*ins)[0], ins, grad)
    got = torch.autograd.grad(fn(*ins)[0], ins, grad)
    for label, g, r in zip(("signal", "frozen", "h_prev", "gain"), got, ref):
        assert common.check_close(label, g, r, 1e-4) == "ok"

    def forward_backward():
        return torch.autograd.grad(fn(*ins)[0], ins, grad)

    benchmark.extra_info.update(n=n, d=d, variant=variant)
    benchmark(_synced(forward_backward, device))
