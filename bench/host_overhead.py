"""Host cost per call of each public entry point: ``python -m bench --suite host``.

    python bench/host_overhead.py [--device cuda|cpu] [--dtype bf16 fp32] [--size 256x512] [--quick]

Per-call wall time (``common.wall_ms``: back-to-back calls, synchronized only at the ends)
at a size where the kernels take a few microseconds, so the time per call *is* the
host's: an empty torch op, empty Triton launches (``JITFunction.run`` vs a cached
``deqkern.ops.launch.Launch``), ``F.rms_norm``, the update op forward (public function,
custom-op dispatcher, eager reference), forward + ``autograd.grad`` of its four inputs,
``FusedRMSNorm`` vs ``nn.RMSNorm`` forward+backward, one ``solve`` / ``solve_fused``
iteration, and ``solve_fused(graph=True)`` per call against the bare replay of its own
graph, the eager iterations in one CUDA graph and ``torch.compile(mode="reduce-overhead")``
of the same fixed loop (5 and 20 iterations). Each row also counts the Python function
calls one call makes, and the fused ones the Python frames from the public function to
the kernel launch. A sweep of ``FusedRMSNorm`` (fused kernel forced) against
``nn.RMSNorm`` gives the crossover for ``deqkern.functional.TORCH_RMS_NORM_BELOW``.

On a CPU (``TRITON_INTERPRET=1``) the fused rows run with every kernel launch replaced
by a no-op: their numbers are the Python side alone, labelled so; eager and torch rows
run for real; rows that need CUDA are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: deqkern's kernels plan for the CPU
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from deqkern.__main__ import forced_backend  # noqa: E402
from deqkern.functional import rms_norm  # noqa: E402
from deqkern.nn import FusedRMSNorm  # noqa: E402
from deqkern.ops import commit as commit_module  # noqa: E402
from deqkern.ops import stats as stats_module  # noqa: E402
from deqkern.ops.commit import RowState  # noqa: E402
from deqkern.ops.launch import Launch  # noqa: E402
from deqkern.ops.update import update_reference  # noqa: E402
from deqkern.solver import capture as capture_module  # noqa: E402
from deqkern.solver import loop as _loop  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NORM_SIZES = ["256x512", "2048x256", "8192x512", "32768x1024", "131072x1024"]
QUICK_NORM_SIZES = ["64x64", "256x128"]


@triton.jit
def _empty_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@contextlib.contextmanager
def launches_stubbed(active: bool):
    """Every deqkern kernel launch a no-op (CPU: the Python side alone, no interpreter),
    except that the solver's state starts as RowState.start says and its host check reads
    "one row unconverged, nothing non-finite" (one CPU fill or copy each): a solve then
    runs all its iterations instead of stopping on uninitialized memory."""
    if not active:
        yield
        return
    saved = Launch._jit_run
    unconverged = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)

    def stub(self, tensors):
        if self.kernel is commit_module._start_kernel:
            for t, value in zip(tensors, (commit_module.FLT_MAX, commit_module.FLT_MAX, math.inf, 0, 0)):
                t.fill_(value)
        elif self.kernel is stats_module._check_kernel:
            tensors[-1].copy_(unconverged)

    Launch._jit_run = stub
    try:
        yield
    finally:
        Launch._jit_run = saved


def python_calls(fn) -> tuple[int, int | None]:
    """(Python function calls in one call of ``fn``, Python frames from ``fn``'s callee
    to the first ``Launch`` -- the public function and Launch.__call__ included)."""
    calls, depth = [0], [None]
    target = Launch.__call__.__code__
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "func", None), "__code__", None)

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1
            if frame.f_code is target and depth[0] is None:
                n, f = 0, frame
                while f is not None and f.f_code is not code:
                    f, n = f.f_back, n + 1
                depth[0] = n
    fn()  # a first call plans (validates, compiles): count a later one
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0], depth[0]


def update_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """Seeded inputs of the timed entry points: the update op's ``(signal, frozen, h_prev,
    gain)``, the same four as leaves requiring grad, an output gradient ``(n, d)``, a
    1024-vector for the empty op and launches, and an ``(n, d)`` norm input requiring grad."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    s, f, p = rand(n, d), rand(n, d), rand(n, d)
    g = (1 + 0.1 * rand(d, dt=torch.float32)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (s, f, p, g)]
    grad = rand(n, d)
    return (s, f, p, g), leaves, grad, torch.randn(1024, device=device), rand(n, d).requires_grad_()


def fwd_bwd(fn, inputs, grad):
    """A call of ``fn(*inputs)`` then ``autograd.grad`` of its (first) output to ``inputs``."""
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out[0] if isinstance(out, tuple) else out, inputs, grad)
    return run


def entry_rows(n: int, d: int, dtype: torch.dtype, device: torch.device, stubbed: bool) -> list[dict]:
    on_gpu = device.type == "cuda"
    (s, f, p, g), leaves, grad, x, xr = update_inputs(n, d, dtype, device)
    norm, torch_norm = FusedRMSNorm(d, device=device, dtype=dtype), torch.nn.RMSNorm(d, device=device, dtype=dtype)
    state = RowState.start(n, device)

    update = lambda *t: deqkern.frozen_rmsnorm_update(*t, damping=0.8)  # noqa: E731
    eager = lambda *t: update_reference(*t, 1e-6, 0.8, "rel")[:2]  # noqa: E731
    cases = [  # (name, fn, fused: runs deqkern kernels, needs CUDA, backend mode)
        ("empty torch op (x.add_(0))", lambda: x.add_(0), False, False, "auto"),
        ("empty Triton launch, JITFunction.run", lambda: _empty_kernel[(1,)](x, 1024, BLOCK=1024), False, True, "auto"),
        ("empty Triton launch, cached handle (Launch)",
         functools.partial(Launch(_empty_kernel, (1,), (1024, 1024), 4, device), x), False, True, "auto"),
        ("F.rms_norm forward", lambda: F.rms_norm(s, (d,), g, 1e-6), False, False, "auto"),
        ("frozen_rmsnorm_update forward, no grad", lambda: update(s, f, p, g), True, False, "triton"),
        ("  the same through the custom-op dispatcher",
         lambda: torch.ops.deqkern.frozen_rmsnorm_update(s, f, p, g, 1e-6, 0.8, "rel"), True, False, "triton"),
        ("  eager reference (update_reference)", lambda: eager(s, f, p, g), False, False, "eager"),
        ("frozen_rmsnorm_update forward + autograd.grad (4 inputs)", fwd_bwd(update, leaves, grad), True, False, "triton"),
        ("  eager reference", fwd_bwd(eager, leaves, grad), False, False, "eager"),
        ("rms_norm forward, fused kernel forced", lambda: rms_norm(s, g, 1e-6), True, False, "triton"),
        ("FusedRMSNorm forward + backward, fused kernel forced", fwd_bwd(norm, [xr], grad), True, False, "triton"),
        ("FusedRMSNorm forward + backward, auto", fwd_bwd(norm, [xr], grad), True, False, "auto"),
        ("nn.RMSNorm forward + backward", fwd_bwd(torch_norm, [xr], grad), False, False, "auto"),
        ("solver bookkeeping (commit), in place", lambda: _loop.commit(p, s.clone(), None, state, 1e-30, "rel", True),
         True, False, "triton"),
        ("solver bookkeeping (commit), into a new tensor",
         lambda: _loop.commit(p, s, None, state, 1e-30, "rel", False), True, False, "triton"),
    ]
    rows = []
    for name, fn, fused, cuda_only, mode in cases:
        if cuda_only and not on_gpu:
            continue
        with forced_backend(mode), launches_stubbed(stubbed and fused):
            calls, frames = python_calls(fn)
            us = 1e3 * common.wall_ms(fn, device)
        rows.append({"entry": name, "us_per_call": us, "python_calls": calls, "frames_to_launch": frames,
                     "note": "launches stubbed (Python side only)" if stubbed and fused else ""})
    rows += solve_rows(n, d, dtype, device, stubbed)
    return rows


def loop_rows(n: int, d: int, dtype: torch.dtype, device: torch.device, stubbed: bool,
              kw: dict) -> list[dict]:
    """The solver's own host cost, without a step's: ``solve_fused`` of a step that returns
    the same two tensors every time. Per iteration (its share of the host checks
    included): the time of 20 iterations less that of 4, over 16; per solve: the rest
    (validation, RowState.start, the last check, ``info``)."""
    h_next = torch.randn(n, d, device=device).to(dtype)
    residual = torch.ones(n, device=device)
    h0 = torch.randn(n, d, device=device).to(dtype)
    times, calls = {}, {}
    with torch.no_grad(), forced_backend("triton"), launches_stubbed(stubbed):
        for max_iter in (4, 20):
            def run(max_iter=max_iter):
                return deqkern.solve_fused(lambda h: (h_next, residual), h0, max_iter=max_iter, **kw)

            calls[max_iter], _ = python_calls(run)
            times[max_iter] = 1e3 * common.wall_ms(run, device)
    per_iteration = (times[20] - times[4]) / 16
    calls_per_iteration = (calls[20] - calls[4]) / 16
    note = "launches stubbed (Python side only)" if stubbed else ""
    return [{"entry": "solve_fused loop alone, per iteration (a step that returns fixed tensors)",
             "us_per_call": per_iteration, "python_calls": calls_per_iteration, "frames_to_launch": None,
             "note": note},
            {"entry": "  per solve (validation, state, last check, info)", "us_per_call": times[4] - 4 * per_iteration,
             "python_calls": calls[4] - 4 * calls_per_iteration, "frames_to_launch": None, "note": note}]


def solve_rows(n: int, d: int, dtype: torch.dtype, device: torch.device, stubbed: bool) -> list[dict]:
    import bench_solve

    cell = bench_solve.Cell(n, d, dtype, device)
    kw = dict(tol=1e-30, on_nonconvergence="ignore")  # no early exit: exactly max_iter iterations
    rows = loop_rows(n, d, dtype, device, stubbed, kw)
    for name, run in (("solve_fused, per iteration (20 iterations, no graph)",
                       lambda: deqkern.solve_fused(cell.step, cell.h0, max_iter=20, **kw)),
                      ("solve, per iteration (20 iterations, no graph)",
                       lambda: deqkern.solve(cell.fused, cell.h0, max_iter=20, **kw))):
        with torch.no_grad(), forced_backend("triton"), launches_stubbed(stubbed):
            calls, _ = python_calls(run)
            us = 1e3 * common.wall_ms(run, device) / 20
        rows.append({"entry": name, "us_per_call": us, "python_calls": calls / 20, "frames_to_launch": None,
                     "note": "launches stubbed (Python side only)" if stubbed else ""})
    if device.type != "cuda":
        return rows
    for max_iter in (5, 20):
        cell.max_iter = max_iter
        capture_module.clear_graph_cache()
        with torch.no_grad():
            def graph_call():
                return deqkern.solve_fused(cell.step, cell.h0, max_iter=max_iter, graph=True, **kw)

            graph_call()
            entry = next(reversed(capture_module._GRAPHS[cell].values()))
            eager_replay = bench_solve.eager_graph(cell)
            compiled = bench_solve.compiled_graph(cell)
            for name, fn in ((f"solve_fused(graph=True), per call, max_iter {max_iter}", graph_call),
                             ("  bare replay of its graph", entry.graph.replay),
                             ("  the eager iterations in one CUDA graph", eager_replay),
                             ('  torch.compile(mode="reduce-overhead") of the fixed loop', compiled)):
                calls, _ = python_calls(fn)
                rows.append({"entry": name, "us_per_call": 1e3 * common.wall_ms(fn, device), "python_calls": calls,
                             "frames_to_launch": None, "note": ""})
    capture_module.clear_graph_cache()
    return rows


def norm_sweep(sizes: list[str], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """FusedRMSNorm forward+backward (fused forced, and auto) against nn.RMSNorm."""
    rows = []
    for size in sizes:
        n, d = (int(v) for v in size.split("x"))
        x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, d, device=device, dtype=dtype)
        fused, reference = FusedRMSNorm(d, device=device, dtype=dtype), torch.nn.RMSNorm(d, device=device, dtype=dtype)

        def run(module):
            return lambda: torch.autograd.grad(module(x), (x, module.weight), grad)

        row = {"n": n, "d": d, "elements": n * d, "torch_ms": common.wall_ms(run(reference), device)}
        modes = ("triton", "auto") if device.type == "cuda" else ("auto",)
        for mode in modes:
            with forced_backend(mode):
                row[f"{mode}_ms"] = common.wall_ms(run(fused), device)
                row[f"{mode}_x_torch"] = row["torch_ms"] / row[f"{mode}_ms"]
        rows.append(row)
    return rows


def crossover(rows: list[dict]) -> int | None:
    """The smallest size (elements) from which the forced fused kernel is at least as fast
    as nn.RMSNorm at every larger size of the sweep (None: never, or not measured)."""
    best = None
    for row in sorted(rows, key=lambda r: r["elements"], reverse=True):
        if row.get("triton_x_torch", 0.0) < 1.0:
            break
        best = row["elements"]
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--size", default=None, help="NxD of the per-entry rows (default 256x512; --quick 64x128)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    stubbed = device.type != "cuda"
    n, d = (int(v) for v in (args.size or ("64x128" if args.quick else "256x512")).split("x"))
    sizes = QUICK_NORM_SIZES if args.quick else NORM_SIZES
    results, tables = {}, []
    for name in args.dtype:
        dtype = DTYPES[name]
        rows = entry_rows(n, d, dtype, device, stubbed)
        sweep = norm_sweep(sizes, dtype, device)
        results[name] = {"entries": rows, "norm_sweep": sweep, "crossover_elements": crossover(sweep)}
        tables.append(f"**{name}, {n}×{d}** (µs per call, wall)\n\n" + common.markdown_table(
            ["entry", "µs / call", "Python calls / call", "frames to launch", "note"],
            [[r["entry"], r["us_per_call"], r["python_calls"], r["frames_to_launch"] or "-", r["note"] or "-"]
             for r in rows]))
        modes = ("triton", "auto") if device.type == "cuda" else ("auto",)
        tables.append(f"**{name}: FusedRMSNorm vs nn.RMSNorm, forward + backward** (wall ms; fused kernel "
                      f"forced = DEQKERN_BACKEND=triton; auto = what FusedRMSNorm does; crossover: "
                      f"{results[name]['crossover_elements'] or 'none measured'} elements)\n\n" + common.markdown_table(
                          ["N×d", "nn.RMSNorm ms", *[f"{m} ms" for m in modes], *[f"{m} × nn.RMSNorm" for m in modes]],
                          [[f"{r['n']}×{r['d']}", r["torch_ms"], *[r[f"{m}_ms"] for m in modes],
                            *[r[f"{m}_x_torch"] for m in modes]] for r in sweep]))
    payload = {"environment": common.environment(device), "size": [n, d], "launches_stubbed": stubbed,
               "results": results}
    note = ("Wall time per call: back-to-back calls, synchronized only at the ends, median of 5 rounds. "
            + ("CPU: fused rows with kernel launches stubbed (the Python side alone)." if stubbed else ""))
    return common.publish(device, "host", payload, note + "\n\n" + "\n\n".join(tables), quick=args.quick)


if __name__ == "__main__":
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    main()
