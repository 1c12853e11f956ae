"""Spectral-norm cost per optimizer step: SpectralNormSchedule vs parametrizations.spectral_norm.

Timed, per weight set:

- ``schedule cpp``: ``SpectralNormSchedule.apply_now()`` with the C++ backend (one
  ``power_iteration_`` call with ``n_power_iter=1`` and one ``clamp_`` call over all weights);
  it runs every ``--every`` optimizer steps.
- ``schedule torch``: the same through the pure-torch backend (a Python loop of per-weight ops).
- ``spectral_norm xN``: ``torch.nn.utils.parametrizations.spectral_norm`` over the same
  weights, in train mode under ``no_grad``, reading every weight ``N = --deq-iters`` times:
  a DEQ forward solve accesses each weight once per solver iteration, and each access runs
  one power iteration and divides W by sigma. It is paid on every optimizer step.
- ``spectral_norm x1``: one access per weight, the floor reached by wrapping the forward in
  ``torch.nn.utils.parametrize.cached()``.

Usage::

    python bench/bench_spectral.py --device cuda            # -> bench/results/<gpu>/spectral.{json,md}
    python bench/bench_spectral.py --device cpu --quick --out /tmp/spectral_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrizations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_close, environment, markdown_table, publish, time_ms, wall_ms  # noqa: E402

from deqkern.spectral import SpectralNormSchedule  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weight_sets(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    """Named lists of 48 weight shapes; ``quick`` divides every dimension by 8."""
    square = [(1024, 1024)] * 48
    mix = [(1024, 1024)] * 16 + [(2048, 512)] * 8 + [(512, 2048)] * 8 + [(256, 128, 3, 3)] * 8 + [(1024, 256)] * 8
    if quick:
        square = [(s[0] // 8, s[1] // 8) for s in square]
        mix = [tuple(max(1, d // 8) if i < 2 else d for i, d in enumerate(s)) for s in mix]
    return {f"48 x {square[0][0]}x{square[0][1]}": square, "48 mixed (linear + conv)": mix}


class _Holder(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def bench_set(shapes, device, dtype, every, deq_iters, cpu_reps) -> tuple[list[list], dict]:
    gen = torch.Generator().manual_seed(0)
    weights = [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]
    n_params = sum(w.numel() for w in weights)

    schedules = {backend: SpectralNormSchedule(weights, every=every, backend=backend) for backend in ("cpp", "torch")}
    agree = check_close("sigma cpp vs torch", schedules["cpp"].sigma_tensor(), schedules["torch"].sigma_tensor(), 1e-5)

    holders = [parametrizations.spectral_norm(_Holder(w.detach().clone())) for w in weights]
    for holder in holders:
        holder.train()

    def spectral_norm_accesses(n: int):
        def run():
            with torch.no_grad():
                for _ in range(n):
                    for holder in holders:
                        holder.weight  # noqa: B018  (the access runs the power iteration)
        return run

    calls = {"schedule cpp": (schedules["cpp"].apply_now, 1 / every),
             "schedule torch": (schedules["torch"].apply_now, 1 / every),
             f"spectral_norm x{deq_iters}": (spectral_norm_accesses(deq_iters), 1.0),
             "spectral_norm x1": (spectral_norm_accesses(1), 1.0)}
    timings = {method: (wall_ms(fn, device, rounds=3 if cpu_reps < 10 else 5),
                        time_ms(fn, device, cpu_reps=cpu_reps), per_step)
               for method, (fn, per_step) in calls.items()}
    base = timings["schedule cpp"][0] * timings["schedule cpp"][2]
    rows = [
        [method, round(wall, 4), per_step, round(wall * per_step, 4), round(wall * per_step / base, 2), round(ms, 4)]
        for method, (wall, ms, per_step) in timings.items()
    ]
    return rows, {"n_weights": len(shapes), "n_params": n_params, "check": agree}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--every", type=int, default=4, help="schedule period in optimizer steps")
    parser.add_argument("--deq-iters", type=int, default=20, help="weight accesses per forward solve")
    parser.add_argument("--quick", action="store_true", help="shapes / 8 and few repeats (a CPU smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (a .md table is written next to it); "
                        "default bench/results/<device>/spectral.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available")
    dtype = DTYPES[args.dtype]
    cpu_reps = 3 if args.quick else 20

    headers = ["weights", "method", "wall ms / call", "calls / opt. step", "wall ms / opt. step",
               "x schedule cpp (wall)", "ms / call (do_bench)"]
    table_rows, results = [], []
    for set_name, shapes in weight_sets(args.quick).items():
        rows, info = bench_set(shapes, device, dtype, args.every, args.deq_iters, cpu_reps)
        results.append({"weights": set_name, **info, "rows": [dict(zip(headers[1:], row)) for row in rows]})
        table_rows += [[f"{set_name} ({info['n_params'] / 1e6:.1f} M params, {info['check']})"] + row for row in rows]

    table = markdown_table(headers, table_rows)
    payload = {
        "environment": environment(device),
        "config": {"dtype": args.dtype, "every": args.every, "deq_iters": args.deq_iters, "quick": args.quick,
                   "n_power_iter": 1, "timing": "wall: back-to-back calls, synchronized at the ends, median of "
                   "rounds; ms: " + ("do_bench median" if device.type == "cuda" else f"perf_counter median of {cpu_reps}")},
        "results": results,
    }
    return publish(device, "spectral", payload, table, quick=args.quick, out=args.out)


if __name__ == "__main__":
    main()
