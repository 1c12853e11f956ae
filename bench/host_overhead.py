"""Host (CPU) cost per call of the pieces of one Picard iteration, on CUDA.

    python bench/host_overhead.py [--rows 256] [--d 512] [--dtype bf16]

Each piece is called many times in a row without synchronizing; the host time per call
is what the Python side costs when the GPU keeps up (small, launch-bound problems).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deqkern.ops.commit import RowState  # noqa: E402
from deqkern.solver import loop as _loop, solve_fused  # noqa: E402
from deqkern.functional import _update_op, update_with_stats  # noqa: E402
from deqkern.ops import update as _update  # noqa: E402


@triton.jit
def _empty_kernel(X, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def host_us(fn, n=2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda")
    n, d = args.rows, args.d
    h = torch.randn(n, d, device=dev, dtype=dtype)
    w = torch.randn(d, d, device=dev, dtype=dtype) / d**0.5
    frozen = torch.randn(n, d, device=dev, dtype=dtype)
    gain = torch.ones(d, device=dev, dtype=dtype)
    x = torch.randn(1024, device=dev)
    state = RowState.start(n, dev)
    rows = {}
    with torch.no_grad():
        rows["empty torch op (x.add_(0))"] = host_us(lambda: x.add_(0))
        rows["empty triton launch"] = host_us(lambda: _empty_kernel[(1,)](x, 1024, BLOCK=1024))
        rows["F.linear"] = host_us(lambda: F.linear(h, w))
        rows["update_forward_triton (direct)"] = host_us(
            lambda: _update.update_forward_triton(h, frozen, h, gain, 1e-6, 0.8, "rel"))
        rows["_update_op (custom op)"] = host_us(lambda: _update_op(h, frozen, h, gain, 1e-6, 0.8, "rel"))
        rows["update_with_stats (public)"] = host_us(lambda: update_with_stats(h, frozen, h, gain, damping=0.8))
        h_next = h.clone()
        for in_place, label in ((True, "in place"), (False, "new tensor")):
            rows[f"_commit (triton, {label})"] = host_us(
                lambda: _loop.commit(h, h_next, None, state, 1e-30, "rel", in_place))

        def step(t):
            out = update_with_stats(F.linear(t, w), frozen, t, gain, damping=0.8)
            return out[0], out[1]

        rows["solve_fused per iteration (20 it, no early exit)"] = host_us(
            lambda: solve_fused(step, h, max_iter=20, tol=1e-30, on_nonconvergence="ignore"), 100) / 20
    print(f"host time per call, {torch.cuda.get_device_name()}, {n}x{d} {dtype}")
    for name, us in rows.items():
        print(f"  {name:52s} {us:8.1f} us")


if __name__ == "__main__":
    main()
