"""Where the one-launch solve's time goes: device time per iteration and per launch of the
cluster, split and block kernels, and the host's share of a call.

    python bench/probe_split.py [--sizes bf16:256x512 ...] [--out FILE]

For each size and kernel configuration: the forward solve captured in a CUDA graph at
``max_iter`` 5 and 10 with ``tol=1e-30`` (every iteration runs), replayed back to back
between two CUDA events: device microseconds per launch, and their slope per iteration.
Then wall microseconds per call (back-to-back calls, host included) of the bare launcher
(``solve_cluster`` / ``solve_split`` / ``solve_triton``) and of
``deqkern.solve_cell(on_nonconvergence="ignore")`` at ``max_iter`` 5 as each kernel choice
takes it: what the host adds on top of the device. ``--kernels`` limits the configurations
(cluster, auto, block, split, adjoint, floor, phases). ``adjoint``: the adjoint solve at the
forward's h* the same way (cluster shapes, the split chooser's and the block kernel; device
time at ``b_max_iter`` 5 and 10), then the whole backward body (adjoint + parameter
gradients, as solve_cell's backward) by device time and wall time per call. ``floor``:
cuBLAS's device time for each product of an iteration and the loop path's whole iteration
(what a one-launch iteration competes with). ``--fp32-dot``: tl.dot's precision for float32
storage. ``phases``: where a cluster launch's time goes (forward and adjoint, 10
iterations): the extension built again with
``DEQKERN_PHASE_TIMER`` (a JIT build, about a minute), whose kernels add the clock64 cycles
of each phase as the first CTA's thread 0 sees them; reported as each phase's share of the
launch's device time, per launch and per iteration. CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from bench_cell import captured  # noqa: E402
from deqkern.functional import update_with_stats  # noqa: E402
from deqkern.ops import persistent, persistent_adjoint, persistent_cluster, persistent_split  # noqa: E402
from deqkern.solver import cell as cell_mod  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIZES = ["bf16:256x512", "fp32:256x512", "bf16:1024x1024"]
EPS, DAMPING = 1e-6, 0.85
TOL = 1e-30  # below any residual: every iteration runs


def device_us(fn, replays: int = 200) -> float:
    """Device microseconds per call of ``fn`` replayed from a CUDA graph."""
    replay = captured(fn)
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(replays):
            replay()
        end.record()
        end.synchronize()
        best = min(best, 1e3 * start.elapsed_time(end) / replays)
    return best


def per_iteration(run, replays: int = 200) -> dict:
    """Device microseconds of ``run(max_iter)`` at 5 and 10 iterations (graph replays, a tol
    every row misses) and their slope per iteration."""
    dev = {m: device_us(lambda m=m: run(m), replays) for m in (5, 10)}  # (1 would compile apart: == 1)
    return {"device_us_5": dev[5], "device_us_10": dev[10], "us_per_iteration": (dev[10] - dev[5]) / 5}


def host_profile(fn, calls: int = 2000) -> None:
    """cProfile of ``calls`` calls (host functions by own time), printed."""
    import cProfile
    import pstats

    with torch.no_grad():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


#: The split tiles the probe tries: (BLOCK_M, BLOCK_N), rows * d at most the first number.
TILES = ((2**17, ((16, 64), (32, 64), (16, 128))), (2**62, ((64, 128), (128, 128), (64, 256))))
#: (exchange, num_warps) pairs tried: the one-barrier kernel spills at 4 warps (ptxas, sm_90).
KINDS = (("h", 4), ("h", 8), ("z", 8))


def candidates(n: int, d: int, h: torch.Tensor, kernels: tuple) -> list[tuple[str, object]]:
    """Every cluster shape ``(C, BM)`` the GPU holds (``"cluster"``), the block kernel, the
    split chooser's configuration (``"auto"``), then (``"split"``) every tile of TILES that fits
    on the GPU at once, with each of KINDS (exchange "h": two barriers an iteration, "z":
    one; warps), the product as one ``tl.dot`` (where W's slice is at most 128 KiB) or
    as a loop over K tiles."""
    out: list[tuple[str, object]] = []
    if "cluster" in kernels:
        chosen = persistent_cluster.cluster_config(n, d, h.dtype, 0)
        for shape in persistent_cluster.shapes(d):
            if persistent_cluster.cluster_config(n, d, h.dtype, 0, shape) is not None:
                out.append((f"cluster C={shape[0]} BM={shape[1]}{' (chosen)' if shape == chosen else ''}", shape))
    auto = persistent_split.config_of(n, d, h)
    if "block" in kernels:
        out.append(("block", None))
    if auto is not None and "auto" in kernels:
        out.append((f"auto {label(auto)}", auto))
    if "split" not in kernels:
        return out
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    for bm, bn in next(tiles for most, tiles in TILES if n * d <= most):
        split = -(-d // bn)
        if -(-n // bm) * split > n_sm or split == 1 or bn > d:
            continue
        for (exchange, warps), one_dot in itertools.product(KINDS, (False, True)):
            if one_dot and (bm + bn) * d * h.element_size() > 128 * 1024:
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, SPLIT_P2=1 << (split - 1).bit_length(),
                       BLOCK_K=64 if h.element_size() <= 2 else 32, num_warps=warps, num_stages=2, ONE_DOT=one_dot,
                       EXCHANGE=exchange)
            if cfg != auto:
                out.append((label(cfg), cfg))
    return out


def label(cfg: dict) -> str:
    return (f"split {cfg['BLOCK_M']}x{cfg['BLOCK_N']}/{cfg['SPLIT']} {cfg.get('EXCHANGE', 'h')}-exchange "
            f"{cfg['num_warps']}w {'one-dot' if cfg['ONE_DOT'] else 'kloop'}")


def adjoint_problem(w, frozen, gain, h0, solve=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h*, v)``: the forward's fixed point (by ``solve``, a one-launch launcher; default the
    split kernel where it has a tile for the size, else the block kernel) and a random
    cotangent (seeded) for the adjoint."""
    if solve is None:
        n, d = h0.shape
        solve = persistent_split.solve_split if persistent_split.config_of(n, d, h0) else persistent.solve_triton
    h_star = solve(w, frozen, gain, h0, EPS, DAMPING, 40, 1e-3, "rel", False).h
    v = torch.randn(*h0.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(h0.dtype)
    return h_star, v


def probe_adjoint(name: str, w, frozen, gain, h0) -> list[dict]:
    """The adjoint solve's device time per launch and per iteration (cluster shapes, the
    split chooser's), then the backward body's (the adjoint as solve_cell picks it, and the
    parameter gradients) device and wall time, at the forward's h* for a random cotangent."""
    n, d = h0.shape
    h_star, v = adjoint_problem(w, frozen, gain, h0)
    base = {"dtype": name, "n": n, "d": d}
    runs = [(f"adjoint cluster C={c} BM={bm}", lambda m, cfg=(c, bm): persistent_cluster.adjoint_cluster(
                w, frozen, gain, h_star, v, EPS, DAMPING, m, TOL, cfg))
            for c, bm in persistent_cluster.adjoint_shapes(d)
            if persistent_cluster.adjoint_config(n, d, h0.dtype, 0, (c, bm)) is not None]
    if persistent_split.config_of(n, d, h0) is not None:
        runs.append(("adjoint split (chooser)",
                     lambda m: persistent_split.adjoint_split(w, frozen, gain, h_star, v, EPS, DAMPING, m, TOL)))
    runs.append(("adjoint block", lambda m: persistent_adjoint.adjoint_triton(w, frozen, gain, h_star, v, EPS, DAMPING,
                                                                              m, TOL)))
    rows = []
    for label_, run in runs:
        try:
            row = {**base, "kernel": label_, **per_iteration(run)}
        except Exception as err:  # noqa: BLE001
            row = {**base, "kernel": label_, "error": f"{type(err).__name__}: {err}"[:200]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    saved = persistent_split.KERNEL
    for kernel in ("auto", "split"):
        def body(kernel=kernel):  # sets the choice itself: device_us and wall_ms call it later
            persistent_split.KERNEL = kernel
            out = cell_mod._run_adjoint(w, frozen, gain, h_star, v, EPS, DAMPING, 5, TOL)
            return cell_mod._param_grads(out.dz, out, h_star, frozen, gain, (True, True, True))

        row = {**base, "kernel": f"backward body ({kernel}), 5 adjoint iterations",
               "device_us_5": device_us(body),
               "wall_us_5": 1e3 * common.wall_ms(body, torch.device("cuda"), calls=50, rounds=5)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    persistent_split.KERNEL = saved
    # the body's host share, piece by piece: wall us per call of each part alone
    config = persistent_cluster.adjoint_for(w, frozen, gain, h_star)
    if config is not None:
        out = persistent_cluster.adjoint_cluster(w, frozen, gain, h_star, v, EPS, DAMPING, 5, TOL, config)
        pieces = {
            "adjoint_cluster": lambda: persistent_cluster.adjoint_cluster(w, frozen, gain, h_star, v, EPS, DAMPING, 5,
                                                                          TOL, config),
            "_run_adjoint": lambda: cell_mod._run_adjoint(w, frozen, gain, h_star, v, EPS, DAMPING, 5, TOL),
            "_param_grads": lambda: cell_mod._param_grads(out.dz, out, h_star, frozen, gain, (True,) * 3),
            "adjoint_for": lambda: persistent_cluster.adjoint_for(w, frozen, gain, h_star),
            "dz.t().mm(h)": lambda: out.dz.t().mm(h_star),
        }
        for piece, fn in pieces.items():
            row = {**base, "kernel": f"host piece: {piece}",
                   "wall_us": 1e3 * common.wall_ms(fn, torch.device("cuda"), calls=200, rounds=5)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        persistent_split.KERNEL = "auto"
        host_profile(lambda: cell_mod._param_grads(*(lambda o: (o.dz, o))(
            cell_mod._run_adjoint(w, frozen, gain, h_star, v, EPS, DAMPING, 5, TOL)), h_star, frozen, gain, (True,) * 3))
        persistent_split.KERNEL = saved
    return rows


def loop_step(w, frozen, gain, h) -> Callable[[], object]:
    """One iteration of the loop path at ``h``: ``F.linear`` and the fused update
    (``update_with_stats``), as ``solve_fused`` runs it."""
    return lambda: update_with_stats(F.linear(h, w), frozen, h, gain, eps=EPS, damping=DAMPING, stop_mode="rel")


def probe_floor(name: str, w, frozen, gain, h0) -> list[dict]:
    """cuBLAS's device time for each product of an iteration at this size (graph replays): the
    forward's ``h @ W.T``, the adjoint's ``dz @ W`` and the parameter gradient ``dz.T @ h``;
    and the loop path's whole iteration (:func:`loop_step`). What a one-launch iteration
    competes with."""
    n, d = h0.shape
    h = torch.randn(n, d, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(h0.dtype)
    pieces = {"cublas h @ W.T": lambda: F.linear(h, w), "cublas dz @ W": lambda: h.mm(w),
              "cublas dz.T @ h": lambda: h.t().mm(h), "loop step (F.linear + update_with_stats)":
              loop_step(w, frozen, gain, h)}
    rows = []
    for piece, fn in pieces.items():
        row = {"dtype": name, "n": n, "d": d, "kernel": f"floor: {piece}", "device_us": device_us(fn)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


#: The kernels' phases (csrc/cuda/cell_cluster_device.h, enum Phase), in order; slot 15
#: counts iterations.
PHASES = ("prologue", "product", "exchange", "barrier", "rows", "stop", "epilogue", "z-product", "z-partials",
          "z-tile", "row-start")
LOOP_PHASES = ("product", "exchange", "barrier", "rows", "stop")


def timed_extension():
    """deqkern._cluster's sources built with DEQKERN_PHASE_TIMER, in a temporary directory."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
    flags = ["-O3", "-std=c++17", "-DDEQKERN_PHASE_TIMER"]
    return load(name="deqkern_cluster_timed", sources=[str(p) for p in sorted(root.glob("*.c[pu]*"))],
                extra_cflags=flags, extra_cuda_cflags=[*flags, "-gencode=arch=compute_90,code=sm_90"],
                build_directory=tempfile.mkdtemp())


def probe_phases(name: str, w, frozen, gain, h0, ext, launches: int = 50) -> list[dict]:
    """Each phase's share of a cluster launch's device time (10 iterations, every one run)."""
    n, d = h0.shape
    h_star, v = adjoint_problem(w, frozen, gain, h0)
    forward, adjoint = persistent_cluster.cluster_for(w, frozen, gain, h0), persistent_cluster.adjoint_for(
        w, frozen, gain, h_star)
    runs = {}
    if forward is not None:
        runs["forward"] = lambda: persistent_cluster.solve_cluster(w, frozen, gain, h0, EPS, DAMPING, 10, TOL, "rel",
                                                                   False, forward)
    if adjoint is not None:
        runs["adjoint"] = lambda: persistent_cluster.adjoint_cluster(w, frozen, gain, h_star, v, EPS, DAMPING, 10, TOL,
                                                                     adjoint)
    saved, timer = persistent_cluster._ext, torch.zeros(16, dtype=torch.int64, device="cuda")
    persistent_cluster._ext = ext
    ext.set_phase_timer(timer)
    rows = []
    try:
        for kind, fn in runs.items():
            for _ in range(5):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            timer.zero_()
            start.record()
            for _ in range(launches):
                fn()
            end.record()
            end.synchronize()
            us = 1e3 * start.elapsed_time(end) / launches
            cycles = [c / launches for c in timer.tolist()]
            total, iterations = sum(cycles[:len(PHASES)]), cycles[15]
            share = {phase: us * cycles[i] / total for i, phase in enumerate(PHASES) if cycles[i] > 0}
            row = {"dtype": name, "n": n, "d": d, "kernel": f"phases {kind} {forward if kind == 'forward' else adjoint}",
                   "device_us_per_launch": us, "cycles_per_launch": total, "iterations": iterations,
                   "us_per_launch": share,
                   "us_per_iteration": {phase: share.get(phase, 0.0) / iterations for phase in LOOP_PHASES}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        ext.set_phase_timer(None)
        persistent_cluster._ext = saved
    return rows


def cell_problem(spec: str, seed: int = 0) -> tuple:
    """``(dtype name, W, frozen, gain, h0)`` on the GPU for a size like ``"bf16:256x512"``:
    ``||W||_2 = 0.5``, frozen ~ N(0, 1), gain 1, h0 = 0 (seeded)."""
    name, size = spec.split(":")
    n, d = (int(x) for x in size.split("x"))
    dtype = DTYPES[name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(d, d, device="cuda", generator=gen)
    w = (0.5 * w / torch.linalg.matrix_norm(w, 2)).to(dtype)
    frozen = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    gain = torch.ones(d, device="cuda", dtype=dtype)
    return name, w, frozen, gain, torch.zeros(n, d, device="cuda", dtype=dtype)


def written(rows: list[dict], out) -> dict:
    """The probe's payload (environment and rows), written to ``out`` as JSON where given."""
    payload = {"environment": common.environment(torch.device("cuda")), "fp32_dot": persistent.FP32_DOT, "rows": rows}
    if out:
        Path(out).write_text(json.dumps(payload, indent=1, default=str))
    return payload


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", nargs="+", default=["cluster", "block", "auto", "split"])
    ap.add_argument("--fp32-dot", default=None, choices=["tf32x3", "ieee", "tf32"],
                    help="tl.dot's precision for float32 storage (persistent.FP32_DOT; default its value)")
    args = ap.parse_args(argv)
    if args.fp32_dot is not None:
        persistent.FP32_DOT = args.fp32_dot
        persistent._dot_tuple.cache_clear()
    rows = []
    ext = timed_extension() if "phases" in args.kernels else None
    for spec in args.sizes:
        name, w, frozen, gain, h0 = cell_problem(spec)
        n, d = h0.shape
        if ext is not None:
            rows.extend(probe_phases(name, w, frozen, gain, h0, ext))
        if "floor" in args.kernels:
            rows.extend(probe_floor(name, w, frozen, gain, h0))
        if "adjoint" in args.kernels:
            rows.extend(probe_adjoint(name, w, frozen, gain, h0))
        for kernel, cfg in candidates(n, d, h0, tuple(args.kernels)):
            def solve(m, cfg=cfg):
                if isinstance(cfg, tuple):
                    return persistent_cluster.solve_cluster(w, frozen, gain, h0, EPS, DAMPING, m, TOL, "rel", False,
                                                            config=cfg)
                if cfg is None:
                    return persistent.solve_triton(w, frozen, gain, h0, EPS, DAMPING, m, TOL, "rel", False)
                return persistent_split.solve_split(w, frozen, gain, h0, EPS, DAMPING, m, TOL, "rel", False, config=cfg)

            try:
                times = per_iteration(solve)
                wall5 = 1e3 * common.wall_ms(lambda: solve(5), torch.device("cuda"), calls=50, rounds=5)
                row = {"dtype": name, "n": n, "d": d, "kernel": kernel, "config": cfg, **times,
                       "launch_wall_us_5": wall5}
            except Exception as err:  # noqa: BLE001
                row = {"dtype": name, "n": n, "d": d, "kernel": kernel, "error": f"{type(err).__name__}: {err}"[:200]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        saved = persistent_split.KERNEL
        for kernel in ("auto", "split", "block"):
            persistent_split.KERNEL = kernel
            with torch.no_grad():
                us = 1e3 * common.wall_ms(lambda: deqkern.solve_cell(w, frozen, gain, h0, damping=DAMPING, eps=EPS,
                                                                      max_iter=5, tol=TOL, on_nonconvergence="ignore"),
                                          torch.device("cuda"), calls=50, rounds=5)
            row = {"dtype": name, "n": n, "d": d, "kernel": f"solve_cell ({kernel})", "solve_cell_wall_us_5": us}
            print(json.dumps(row), flush=True)
            rows.append(row)
        persistent_split.KERNEL = saved
        if spec == args.sizes[0]:
            host_profile(lambda: deqkern.solve_cell(w, frozen, gain, h0, damping=DAMPING, eps=EPS, max_iter=5, tol=TOL,
                                                    on_nonconvergence="ignore"))
    return written(rows, args.out)


if __name__ == "__main__":
    main()
