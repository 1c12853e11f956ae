"""Tolerances shared by the parity tests.

Rule: a fused result ``out`` passes against the float64 reference ``ref`` when, element
by element,

    |out - ref| <= 2 * |eager - ref| + atol + rtol * |ref|

where ``eager`` is the eager path run in the same storage dtype. The eager error is what
rounding to the storage dtype costs at best; twice it allows a different but equally
valid float32 summation order. ``rtol`` is one unit in the last place of the storage
dtype: the Triton interpreter truncates float32 -> bfloat16 stores instead of rounding
to nearest, which costs up to one ulp where the GPU costs half. ``atol`` covers values
near zero, where relative terms vanish.
"""

import zlib

import torch

RTOL = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 1e-12}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def assert_parity(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str,
                  ulps: float = 1.0, summed: int = 1, magnitude: "torch.Tensor | None" = None) -> None:
    """``summed``: how many terms each output element sums (a gradient reduced over rows):
    a float32 sum's rounding error grows like sqrt(terms) and its order differs between
    the kernel's per-program partials and eager's, so ``atol`` scales with sqrt(summed)/8
    (at least 1x). ``magnitude``: for such a sum, ``sum |term|`` (float64, ``ref``'s
    shape): the rounding of each term scales with the term, not with the (possibly
    cancelling) sum, so the relative allowance applies to it instead of ``|ref|``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the result"
    out64, eager64, ref64 = out.detach().double().cpu(), eager.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref64.abs() if magnitude is None else torch.maximum(ref64.abs(), magnitude.detach().double().cpu())
    bound = 2 * (eager64 - ref64).abs() + ATOL[dtype] * max(1.0, summed**0.5 / 8) + ulps * RTOL[dtype] * scale
    err = (out64 - ref64).abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (
        f"{what} ({dtype}): error {err.flatten()[worst].item():.3e} above bound "
        f"{bound.flatten()[worst].item():.3e} at flat index {worst.item()}"
    )


def case_seed(*parts) -> int:
    """A reproducible per-test-case seed (Python's hash() of str is salted per process)."""
    return zlib.crc32(repr(parts).encode())
