"""pytest-benchmark cases for the Picard solve: ``pytest bench --benchmark-only``.

The eager loop (``.item()`` check every iteration) everywhere; deqkern's solve_fused on
a CUDA GPU only. Each case first checks that it converges to eager's fixed point.
"""

import pytest
import torch

import common
from bench_solve import Cell, deqkern_solve, eager_item


@pytest.mark.parametrize("variant", ["eager-item", "deqkern"])
@pytest.mark.parametrize("n,d", [(256, 64), (1024, 128)])
def test_solve_forward(benchmark, device, variant, n, d):
    if variant == "deqkern" and device.type != "cuda":
        pytest.skip("deqkern is timed on CUDA only (the interpreter is not a speed baseline)")
    cell = Cell(n, d, torch.float32, device)
    run = {"eager-item": lambda: eager_item(cell)[0], "deqkern": lambda: deqkern_solve(cell, False)[0]}[variant]
    with torch.no_grad():
        h_ref, iterations = eager_item(cell)
        h = run()
    assert iterations < cell.max_iter, "the benchmark problem must converge"
    assert common.check_close("h*", h, h_ref, 5 * cell.tol) == "ok"

    def solve():
        with torch.no_grad():
            out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(n=n, d=d, variant=variant, iterations=iterations)
    benchmark(solve)
