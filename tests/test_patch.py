"""deqkern.patch / deqkern.unpatch: swapping nn.RMSNorm for FusedRMSNorm in place."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import deqkern
from deqkern.nn import FusedRMSNorm
from numerics import case_seed


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.RMSNorm(d)

    def forward(self, x):
        return self.norm(x + torch.tanh(self.proj(x)))


class Model(nn.Module):
    def __init__(self, d: int = 24):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.shared = nn.RMSNorm(d, elementwise_affine=False)
        self.tied = self.shared  # one module under two names
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.tied(self.shared(x)))


def _model(seed_name: str) -> Model:
    gen = torch.Generator().manual_seed(case_seed(seed_name))
    model = Model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


def test_round_trip(fused, device):
    model = _model("round-trip").to(device)
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(case_seed("x"))).to(device)
    before = model(x)
    originals = {name: m for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.RMSNorm}
    weights = {name: m.weight for name, m in originals.items()}
    keys = {k: v.clone() for k, v in model.state_dict().items()}

    replaced = deqkern.patch(model)
    assert set(replaced) == {"blocks.0.norm", "blocks.1.norm", "shared", "tied"}
    assert all(replaced[name] is originals[name] for name in replaced)
    for name, module in model.named_modules(remove_duplicate=False):
        if name in replaced:
            assert type(module) is FusedRMSNorm
            assert module.weight is weights[name]  # the same Parameter object
    assert model.shared is model.tied
    assert list(model.state_dict()) == list(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    patched = model(x)
    assert deqkern.last_backend() == fused
    torch.testing.assert_close(patched, before, atol=1e-5, rtol=1e-5)
    assert deqkern.patch(model) == {}  # nothing left to patch

    removed = deqkern.unpatch(model)
    assert set(removed) == set(replaced)
    for name, module in model.named_modules(remove_duplicate=False):
        if name in originals:
            assert module is originals[name]
    assert model.shared is model.tied
    torch.testing.assert_close(model(x), before)


def test_optimizer_keeps_training_the_shared_weight():
    model = _model("optimizer")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the patch
    original_norm = model.blocks[0].norm
    start = original_norm.weight.detach().clone()
    deqkern.patch(model)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(case_seed("opt-x")))
    model(x).square().mean().backward()
    assert original_norm.weight.grad is not None and original_norm.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(original_norm.weight, start)
    assert model.blocks[0].norm.weight is original_norm.weight
    deqkern.unpatch(model)
    assert model.blocks[0].norm is original_norm and not torch.equal(original_norm.weight, start)


def test_gradients_match_unpatched():
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(case_seed("grad-x")))
    reference, model = _model("grads"), _model("grads")
    deqkern.patch(model)
    reference(x).sum().backward()
    model(x).sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        deqkern.patch(object())
    with pytest.raises(ValueError, match="itself an nn.RMSNorm"):
        deqkern.patch(nn.RMSNorm(4))
    assert deqkern.unpatch(nn.Sequential(FusedRMSNorm(4))) == {}  # not created by patch: left alone


def test_small_inputs_run_torchs_rms_norm_under_auto(device, monkeypatch):
    """Below TORCH_RMS_NORM_BELOW elements a patched model is exactly the unpatched one
    (torch's own rms_norm), forward and backward; at or above it the fused op runs, except
    for 16-bit inputs."""
    from deqkern import functional

    monkeypatch.setenv("DEQKERN_BACKEND", "auto")
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(case_seed("small-x"))).to(device)
    reference, model = _model("small").to(device), _model("small").to(device)
    deqkern.patch(model)
    out, out_ref = model(x), reference(x)
    assert deqkern.last_backend() == "eager"
    assert torch.equal(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    wider = torch.randn(6, 7, 24, generator=torch.Generator().manual_seed(case_seed("small-x6"))).to(device)
    monkeypatch.setattr(functional, "TORCH_RMS_NORM_BELOW", wider.numel())  # read when a signature is first seen
    torch.testing.assert_close(model(wider), reference(wider), atol=1e-5, rtol=1e-5)
    if functional._backend.select(wider.device, wider.dtype, 24) != "eager":
        assert deqkern.last_backend() != "eager"
    # 16-bit inputs: torch's op at every size (the fused kernel won at no measured bf16
    # size), also where the kernels could run (on a CPU: as if the interpreter were chosen)
    if device.type == "cpu":
        monkeypatch.setattr(functional._backend, "select", lambda *args: "triton-interpreter")
    x16 = wider.to(torch.bfloat16)
    weight = torch.rand(24, generator=torch.Generator().manual_seed(case_seed("w16"))).to(device, torch.bfloat16)
    assert torch.equal(functional.rms_norm(x16, weight), F.rms_norm(x16, (24,), weight, torch.finfo(torch.float32).eps))
    assert deqkern.last_backend() == "eager"
