"""Tile sweep of the fused update's forward kernel at the sizes where it is device-bound.

    python bench/probe_update.py [--sizes bf16:32768x1024 ...] [--out FILE]

For each size: the forward kernel (``_update_fwd_kernel``, ``stop_mode="rel"``, frozen
full) with ``BLOCK_M`` rows per program and ``num_warps`` warps, for every pair whose
tile holds at most 16K elements; device microseconds per call (20 calls captured in one
CUDA graph, median replay / 20, as the ``update`` suite's device columns), GB/s of the
bytes it must move (signal, frozen, h_prev read, h_next written, the two float32 row
outputs), and which pair the forward takes (``launch_config`` at ``GPU_STREAM_TILE``; the
recording at commit 45c8739 flags the 4096-element tiles it took before). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from deqkern.ops.launch import GPU_STREAM_TILE, STOP_MODES, cdiv, launch_config, next_power_of_2  # noqa: E402
from deqkern.ops.residual import REL_EPS  # noqa: E402
from deqkern.ops.update import _update_fwd_kernel  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIZES = ["bf16:32768x1024", "fp32:32768x1024", "bf16:8192x1024", "bf16:65536x256", "bf16:16384x2048",
         "fp32:8192x512"]


def sweep(spec: str) -> list[dict]:
    dtype_name, size = spec.split(":")
    n, d = (int(v) for v in size.split("x"))
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, f, p = (torch.randn(n, d, device="cuda", generator=gen).to(dtype) for _ in range(3))
    g = torch.rand(d, device="cuda", generator=gen).to(dtype)
    h = torch.empty_like(s)
    res, rstd = (torch.empty(n, device="cuda") for _ in range(2))
    nbytes = 4 * n * d * dtype.itemsize + 2 * 4 * n
    block_d = next_power_of_2(d)
    default = launch_config(n, d, False, GPU_STREAM_TILE)
    rows = []
    for block_m in (1, 2, 4, 8, 16):
        if block_m * block_d > 16384:
            continue
        for warps in (2, 4, 8, 16):
            if warps * 32 > block_m * block_d:
                continue

            def launch(block_m=block_m, warps=warps):
                _update_fwd_kernel[(cdiv(n, block_m),)](
                    s, f, p, g, h, res, rstd, n, d, d, d, d, d, 1e-6, 0.85, REL_EPS, STOP_MODES["rel"], block_m, block_d,
                    num_warps=warps)

            us = 1e3 * common.graph_time_ms(launch, calls=20, reps=30)
            rows.append({"size": spec, "block_m": block_m, "num_warps": warps, "device_us": us,
                         "gb_s": nbytes / us / 1e3, "default": (block_d, block_m, warps) == default})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_update.py needs CUDA")
    rows = [row for spec in args.sizes for row in sweep(spec)]
    best = {}
    for row in rows:
        if row["size"] not in best or row["device_us"] < best[row["size"]]["device_us"]:
            best[row["size"]] = row
    for spec, row in best.items():
        chosen = next(r for r in rows if r["size"] == spec and r["default"])
        print(f"{spec}: default BLOCK_M {chosen['block_m']} x {chosen['num_warps']} warps {chosen['device_us']:.1f} us "
              f"({chosen['gb_s']:.0f} GB/s); best {row['block_m']} x {row['num_warps']} {row['device_us']:.1f} us "
              f"({row['gb_s']:.0f} GB/s)")
    payload = {"environment": common.environment(torch.device("cuda")), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
