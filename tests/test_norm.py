"""FusedRMSNorm (deqkern.nn.norm) against torch.nn.RMSNorm: outputs, gradients,
checkpoints, configuration and argument errors."""

import pytest
import torch
from torch import nn

import deqkern
from deqkern.functional import rms_norm
from deqkern.nn import FusedRMSNorm
from numerics import assert_parity, case_seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [1, 3, 257]


def _random_weight(norm: nn.RMSNorm, gen: torch.Generator) -> None:
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)


def _forward_backward(norm: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y = norm(x)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), x.grad.detach(), norm.weight.grad.detach()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", WIDTHS)
def test_matches_torch_rmsnorm(dtype, d, backend, fused_backend_name, device):
    gen = torch.Generator().manual_seed(case_seed("norm", dtype, d))
    x = torch.randn(2, 5, d, generator=gen) * 3
    grad_out = torch.randn(2, 5, d, generator=gen)
    reference = nn.RMSNorm(d, dtype=torch.float64)
    _random_weight(reference, gen)
    torch_norm = nn.RMSNorm(d, dtype=dtype).to(device)
    fused = FusedRMSNorm(d, dtype=dtype).to(device)
    torch_norm.load_state_dict(reference.state_dict())
    fused.load_state_dict(reference.state_dict())

    ref = _forward_backward(reference, x.double(), grad_out.double())
    eager = _forward_backward(torch_norm, x.to(device, dtype), grad_out.to(device))
    out = _forward_backward(fused, x.to(device, dtype), grad_out.to(device))
    assert deqkern.last_backend() == (fused_backend_name if backend == "triton" else "eager")
    assert out[0].dtype == dtype and out[2].dtype == dtype
    for name, o, e, r in zip(("output", "x.grad", "weight.grad"), out, eager, ref):
        assert_parity(o, e, r, dtype, f"FusedRMSNorm {name}")


def test_mixed_precision_input_keeps_input_dtype(device):
    """bf16 activations with an fp32 weight (the usual mixed-precision layout): output
    bf16 as nn.RMSNorm, weight gradient fp32."""
    gen = torch.Generator().manual_seed(case_seed("mixed"))
    torch_norm, fused = nn.RMSNorm(64).to(device), FusedRMSNorm(64).to(device)
    _random_weight(torch_norm, gen)
    fused.load_state_dict(torch_norm.state_dict())
    x = torch.randn(4, 64, generator=gen).to(device, torch.bfloat16)
    grad_out = torch.randn(4, 64, generator=gen).to(device)
    with pytest.warns(UserWarning, match="Mismatch dtype"):
        y_torch, _, gw_torch = _forward_backward(torch_norm, x, grad_out)
    y, _, gw = _forward_backward(fused, x, grad_out)
    assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_torch.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw, gw_torch, atol=1e-3, rtol=1e-3)


def test_loads_torch_checkpoint_and_keeps_its_interface():
    gen = torch.Generator().manual_seed(case_seed("ckpt"))
    torch_norm = nn.RMSNorm(7, eps=1e-5)
    _random_weight(torch_norm, gen)
    fused = FusedRMSNorm(7, eps=1e-5)
    assert fused.load_state_dict(torch_norm.state_dict()) is not None
    assert list(fused.state_dict()) == list(torch_norm.state_dict()) == ["weight"]
    assert torch.equal(fused.weight, torch_norm.weight)
    assert fused.extra_repr() == torch_norm.extra_repr()
    assert isinstance(fused, nn.RMSNorm)
    x = torch.randn(3, 7, generator=gen)
    torch.testing.assert_close(fused(x), torch_norm(x))
    fused.reset_parameters()
    assert torch.equal(fused.weight, torch.ones(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_default_eps_is_torchs(dtype):
    """eps=None: torch uses the float32 epsilon for 16-bit inputs (not the input
    dtype's), float64's for float64. Tiny inputs make eps dominate the mean square."""
    gen = torch.Generator().manual_seed(case_seed("eps", dtype))
    x = (torch.randn(4, 16, generator=gen) * 1e-4).to(dtype)
    torch_norm, fused = nn.RMSNorm(16, dtype=dtype), FusedRMSNorm(16, dtype=dtype)
    assert fused.eps is None
    expected = torch_norm(x).double()
    wrong_eps = nn.functional.rms_norm(x, (16,), eps=torch.finfo(dtype).eps * 4).double()
    got = fused(x).double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert (got - wrong_eps).abs().max() > 10 * tol


def test_without_affine_weight():
    gen = torch.Generator().manual_seed(case_seed("no-affine"))
    torch_norm, fused = nn.RMSNorm(33, elementwise_affine=False), FusedRMSNorm(33, elementwise_affine=False)
    assert fused.weight is None and dict(fused.state_dict()) == {}
    x = (torch.randn(6, 33, generator=gen) * 2).requires_grad_()
    y = fused(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x_t = x.detach().clone().requires_grad_()
    (gx_t,) = torch.autograd.grad(torch_norm(x_t), x_t, torch.ones_like(y))
    torch.testing.assert_close(y, torch_norm(x))
    torch.testing.assert_close(gx, gx_t, atol=1e-5, rtol=1e-5)


def test_several_trailing_dimensions():
    gen = torch.Generator().manual_seed(case_seed("2d"))
    torch_norm, fused = nn.RMSNorm([3, 5]), FusedRMSNorm([3, 5])
    _random_weight(torch_norm, gen)
    fused.load_state_dict(torch_norm.state_dict())
    x = torch.randn(2, 4, 3, 5, generator=gen)
    torch.testing.assert_close(fused(x), torch_norm(x))
    y = fused(x.requires_grad_())
    y.sum().backward()
    assert fused.weight.grad.shape == (3, 5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(normalized_shape=0), ValueError, "normalized_shape"),
    (dict(normalized_shape=()), ValueError, "normalized_shape"),
    (dict(normalized_shape=(4, -1)), ValueError, "normalized_shape"),
    (dict(normalized_shape=4, eps=0.0), ValueError, "eps"),
    (dict(normalized_shape=4, eps=float("nan")), ValueError, "eps"),
    (dict(normalized_shape=4, elementwise_affine="yes"), TypeError, "elementwise_affine"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedRMSNorm(**kwargs)


def test_bad_inputs():
    norm = FusedRMSNorm(8)
    with pytest.raises(ValueError, match=r"normalized_shape \(8,\).*\(3, 7\)"):
        norm(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must be"):
        norm(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(2, 8), None, -1.0)
