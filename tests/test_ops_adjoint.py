"""The fused adjoint step (RMSNorm VJP + adjoint update + residual) against float64."""

import pytest
import torch

from deqkern.ops.adjoint import adjoint_step_reference, adjoint_step_triton
from numerics import assert_parity, case_seed

EPS = 1e-6


def make(n, d, dtype, device, gen):
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    z = rand(n, d)
    rstd = torch.rsqrt(z.float().pow(2).mean(-1) + EPS)
    gain = (1 + 0.3 * torch.randn(d, generator=gen)).to(device)
    return rand(n, d), rand(n, d), rand(n, d), z, rstd, gain


def autograd_vjp64(g_next, z, gain, damping):
    """dz = d/dz <g_next, damping * gain * RMSNorm(z)>, by torch autograd in float64."""
    z64 = z.double().requires_grad_()
    y = damping * gain.double() * z64 * torch.rsqrt(z64.pow(2).mean(-1, keepdim=True) + EPS)
    (dz,) = torch.autograd.grad(y, z64, g_next.double())
    return dz


@pytest.mark.parametrize("stop_mode", ["abs", "rel", "max"])
@pytest.mark.parametrize("has_u", [True, False])
@pytest.mark.parametrize("n,d", [(0, 8), (1, 1), (5, 3), (7, 257), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_adjoint_step_parity(dtype, n, d, has_u, stop_mode, device):
    gen = torch.Generator().manual_seed(case_seed(dtype, n, d, has_u, stop_mode))
    u, g_prev, grad_out, z, rstd, gain = make(n, d, dtype, device, gen)
    u = u if has_u else None
    damping = 0.8
    g_next, dz, res = adjoint_step_triton(u, g_prev, grad_out, z, rstd, gain, damping, stop_mode)
    g_e, dz_e, res_e = adjoint_step_reference(u, g_prev, grad_out, z, rstd, gain, damping, stop_mode)
    f64 = [t.double() if t is not None else None for t in (u, g_prev, grad_out, z, rstd, gain)]
    g_ref, dz_ref, res_ref = adjoint_step_reference(*f64, damping, stop_mode)

    expected_g = (1 - damping) * g_prev.double() + grad_out.double() + (u.double() if has_u else 0)
    torch.testing.assert_close(g_ref, expected_g.reshape(-1, d))
    # rstd is the saved float32 statistic, hence float32-level agreement with autograd.
    torch.testing.assert_close(dz_ref, autograd_vjp64(g_ref, z, gain, damping).reshape(-1, d), rtol=1e-5, atol=1e-5)

    assert_parity(g_next, g_e, g_ref, dtype, "g_next")
    assert_parity(dz, dz_e, dz_ref, dtype, "dz")
    assert_parity(res, res_e, res_ref, torch.float32, "residual")
