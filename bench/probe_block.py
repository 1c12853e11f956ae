"""The block kernel's launch parameters at the large sizes where ``solve_cell`` takes it.

    python bench/probe_block.py [--sizes bf16:8192x1024 bf16:32768x512] [--out FILE]

For each size, every configuration of the sweep (``BLOCK_M``, warps, rows per phase-B
step ``SUB_M``, phase-B pipeline stages ``STAGES_B``) runs the forward solve
(``persistent.solve_triton``) and the adjoint solve (``persistent_adjoint.adjoint_triton``)
captured in a CUDA graph at ``max_iter`` 5 and 10 with ``tol=1e-30`` (every iteration runs):
device microseconds per launch and their slope per iteration, as ``probe_split`` does. Each
configuration's h* and g are compared with the chooser's (max abs difference). Then the
GEMM + update loop's device time per iteration (one ``F.linear`` and one
``update_with_stats``, graph-captured) as the floor the block kernel is held against.
CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_split import (DAMPING, EPS, TOL, adjoint_problem, cell_problem, device_us, loop_step,  # noqa: E402
                         per_iteration, written)

from deqkern.ops import persistent, persistent_adjoint  # noqa: E402

SIZES = ["bf16:8192x1024", "bf16:32768x512"]


def sweep(n: int, d: int, h: torch.Tensor) -> list[dict]:
    """The chooser's configuration first, then the grid around it."""
    base = persistent.config_for(n, d, h)
    out = [base]
    for block_m, warps, per_thread, stages in itertools.product((64, 128), (4, 8), (8, 16, 32), (1, 3)):
        sub_m = max(1, min(block_m, per_thread * 32 * warps // base["BLOCK_D"]))
        if block_m * base["BLOCK_N"] >= 128 * 128 and warps == 4:
            continue  # a 128x128 float32 accumulator at 4 warps: 128 registers a thread
        cfg = {**base, "BLOCK_M": block_m, "num_warps": warps, "SUB_M": sub_m, "STAGES_B": stages}
        if cfg not in out:
            out.append(cfg)
    return out


def with_config(cfg: dict):
    """Run the launchers with ``cfg`` (both modules read ``config_for`` at call time)."""
    def pick(*_):
        return cfg

    persistent.config_for = persistent_adjoint.config_for = pick


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    chooser = persistent.config_for
    for spec in args.sizes:
        name, w, frozen, gain, h0 = cell_problem(spec)
        n, d = h0.shape
        h_star, v = adjoint_problem(w, frozen, gain, h0, persistent.solve_triton)  # the split kernel: too few SMs
        base = {"dtype": name, "n": n, "d": d}

        def forward(m):
            return persistent.solve_triton(w, frozen, gain, h0, EPS, DAMPING, m, TOL, "rel", False)

        def adjoint(m):
            return persistent_adjoint.adjoint_triton(w, frozen, gain, h_star, v, EPS, DAMPING, m, TOL)

        ref = None
        for i, cfg in enumerate(sweep(n, d, h0)):
            with_config(cfg)
            shown = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SUB_M", "STAGES_B", "num_warps")}
            row = {**base, "config": shown, "chooser": i == 0}
            try:
                outs = forward(5).h.float(), adjoint(5).g.float()
                torch.cuda.synchronize()
                if ref is None:
                    ref = outs
                row["max_diff_h"], row["max_diff_g"] = ((o - r).abs().max().item() for o, r in zip(outs, ref))
                for what, run in (("forward", forward), ("adjoint", adjoint)):
                    times = per_iteration(run, replays=20)
                    row[f"{what}_us_5"] = times["device_us_5"]
                    row[f"{what}_us_per_iteration"] = times["us_per_iteration"]
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
        persistent.config_for = persistent_adjoint.config_for = chooser

        row = {**base, "kernel": "loop step (F.linear + update_with_stats)",
               "device_us_per_iteration": device_us(loop_step(w, frozen, gain, h_star.clone()), replays=50)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return written(rows, args.out)


if __name__ == "__main__":
    main()
