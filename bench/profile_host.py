"""What bounds the host path: wall time per call of each entry point, attributed from one profile.

    python bench/profile_host.py [--out DIR] [--size 256x512] [--calls 50] [--quick]

Entry points (bf16 N×d; the solve rows also fp32): the update op forward (no grad) and forward
+ ``autograd.grad`` of its four inputs, and its eager reference; ``solve_fused`` (the cell
``h <- (1-b)h + b*g*RMSNorm(hW^T + frozen)`` of bench_cell.Problem, exactly 5 iterations: tol
1e-30, max_iter 5, on_nonconvergence="ignore") without and with ``graph=True``; the eager
``.item()`` loop (bench_cell.eager_forward); ``solve_cell`` forward ("ignore", "warn") and its
backward alone (``autograd.grad(h*, params, v, retain_graph=True)`` after one forward);
``FusedRMSNorm`` (fused kernel forced, and auto) vs ``nn.RMSNorm`` forward+backward; and the
floors: ``autograd.grad`` of a one-op graph (``x * 2``), an empty torch op, empty Triton
launches (host_overhead.py's). Fused rows run with DEQKERN_BACKEND=triton.

Columns, per call. "wall" is ``common.wall_ms`` without the profiler (back-to-back calls,
synchronized at the ends, median of rounds). Every other column comes from one
``torch.profiler.profile(activities=[CPU, CUDA])`` over ``--calls`` back-to-back calls after
warm-up, divided by the number of calls; times in µs:
  prof wall   wall time of those profiled calls (the profiler's own cost per event included)
  device      sum of the durations of device activities (kernels, memcpy, memset; one stream,
              so no overlap); "kernels": how many device activities are kernels. Empty on a CPU.
  launches    launch API calls (cudaLaunch*, cuLaunch*, cudaGraphLaunch, cuGraphLaunch; the
              outermost only) and "launch": their CPU time
  aten ops    aten:: events with no aten:: ancestor (the ops that Python, an autograd node or
              deqkern called) and "aten": their CPU time, children included
  aten self   CPU time of all aten:: events (nested ones included), each less its children's
              (the CUDA API calls and aten ops it made)
  sync        CPU time of cudaStreamSynchronize / cudaEventSynchronize / cudaDeviceSynchronize /
              cuStreamSynchronize / cuCtxSynchronize / cudaMemcpy / cudaMemcpyAsync (a D2H copy
              waits for the stream in one of these; the final synchronize of the N calls counts)
  cuda api    CPU time of every other CUDA runtime / driver call (cudaGetDevice, cudaEventRecord...)
  autograd    self CPU time of the autograd engine's events (``autograd::engine*``,
              ``torch::autograd::*`` such as AccumulateGrad) and of torch's C++ backward nodes
              (names ending in ``Backward<digit>``, e.g. ``MulBackward0``)
  python      prof wall - launch - sync - cuda api - aten self - autograd: time in no recorded
              event (the Python interpreter, Triton's Python launch path, deqkern's code) plus the
              self time of the remaining recorded ranges, whose own time is Python code: an
              ``autograd.Function``'s forward range (named after the Function) and its backward
              node (``<Function>Backward``, no digit), record_function ranges
Launch, sync, cuda api, aten self, autograd and python partition the profiled wall time (a
CUDA API call's own children, e.g. driver calls, are not counted again); recorded times are
summed over threads (the autograd engine's device thread works while the caller waits). A
per-iteration table divides the solve loops' rows by their iterations; the top 8 CPU events
by self time per call show what dominates each entry.

On a CPU (``TRITON_INTERPRET=1``) it is a smoke test: Launch-based kernel launches are stubbed
as in host_overhead.py (the Python side alone); solve_cell's kernels run in the interpreter;
CUDA-only rows (graph=True, empty Triton launches) are listed as not run.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as host_overhead.py)
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cell  # noqa: E402
import common  # noqa: E402
import host_overhead  # noqa: E402
from host_overhead import _empty_kernel, launches_stubbed  # noqa: E402

import deqkern  # noqa: E402
from deqkern.__main__ import forced_backend  # noqa: E402
from deqkern.nn import FusedRMSNorm  # noqa: E402
from deqkern.ops.launch import Launch  # noqa: E402
from deqkern.ops.update import update_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SOLVE_ITERATIONS = 5
LAUNCH_PREFIXES = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")
SYNC_NAMES = {"cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cuStreamSynchronize",
              "cuCtxSynchronize", "cudaMemcpy", "cudaMemcpyAsync"}
COLUMNS = ["prof_wall_us", "device_us", "kernels", "launches", "launch_us", "sync_us", "cuda_api_us", "aten_ops",
           "aten_us", "aten_self_us", "autograd_us", "python_us"]
CUDA_API = re.compile(r"cu(da)?[A-Z]")
CPP_BACKWARD_NODE = re.compile(r"Backward\d+$")


# --------------------------------------------------------------------------- entry points
def cases(n: int, d: int, dtype: torch.dtype, device: torch.device) -> list[tuple]:
    """``(entry, fn, fused, cuda_only, iterations)`` per entry point at this size and dtype;
    fp32 gets the solve rows only."""
    (s, f, hp, g), leaves, grad, x1k, xr = host_overhead.update_inputs(n, d, dtype, device)
    fwd_bwd = functools.partial(host_overhead.fwd_bwd, grad=grad)
    fused_norm = FusedRMSNorm(d, device=device, dtype=dtype)
    torch_norm = torch.nn.RMSNorm(d, device=device, dtype=dtype)
    p = bench_cell.Problem(n, d, dtype, device)
    fixed = dict(max_iter=SOLVE_ITERATIONS, tol=1e-30, on_nonconvergence="ignore")
    with torch.no_grad():
        eager_iterations = bench_cell.eager_forward(p)[1]

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def backward_alone(**kw):
        return bench_cell.backward_alone(p, lambda: p.solve_cell(**kw))

    update = lambda *t: deqkern.frozen_rmsnorm_update(*t, damping=0.8)  # noqa: E731
    eager = lambda *t: update_reference(*t, 1e-6, 0.8, "rel")[:2]  # noqa: E731
    solve_rows = [
        (f"solve_fused, no graph, {SOLVE_ITERATIONS} iterations",
         no_grad(lambda: deqkern.solve_fused(p.step, p.h0, **fixed)), True, False, SOLVE_ITERATIONS),
        (f"solve_fused(graph=True), {SOLVE_ITERATIONS} iterations",
         no_grad(lambda: deqkern.solve_fused(p.step, p.h0, graph=True, **fixed)), True, True, SOLVE_ITERATIONS),
        ("  eager loop, .item() check each iteration (bench_cell)", no_grad(lambda: bench_cell.eager_forward(p)),
         False, False, eager_iterations),
        ('solve_cell forward, on_nonconvergence="ignore"',
         no_grad(lambda: p.solve_cell(on_nonconvergence="ignore")), True, False, None),
        ('solve_cell forward, "warn" (default)', no_grad(lambda: p.solve_cell()), True, False, None),
        ('solve_cell backward alone, "ignore"', backward_alone(on_nonconvergence="ignore"), True, False, None),
        ('solve_cell backward alone, "warn"', backward_alone(), True, False, None),
    ]
    if dtype != torch.bfloat16:
        return solve_rows
    return [
        ("frozen_rmsnorm_update forward, no grad", no_grad(lambda: update(s, f, hp, g)), True, False, None),
        ("frozen_rmsnorm_update forward + autograd.grad (4 inputs)", fwd_bwd(update, leaves), True, False, None),
        ("  eager reference (update_reference), forward + grad", fwd_bwd(eager, leaves), False, False, None),
        *solve_rows,
        ("FusedRMSNorm forward + backward, fused kernel forced", fwd_bwd(fused_norm, [xr]), True, False, None),
        ("FusedRMSNorm forward + backward, auto", fwd_bwd(fused_norm, [xr]), "auto", False, None),
        ("nn.RMSNorm forward + backward", fwd_bwd(torch_norm, [xr]), False, False, None),
        ("floor: x * 2 + autograd.grad (one-op graph)", fwd_bwd(lambda t: t * 2, [xr]), False, False, None),
        ("floor: empty torch op (x.add_(0))", lambda: x1k.add_(0), False, False, None),
        ("floor: empty Triton launch, JITFunction.run", lambda: _empty_kernel[(1,)](x1k, 1024, BLOCK=1024),
         False, True, None),
        ("floor: empty Triton launch, cached handle (Launch)",
         functools.partial(Launch(_empty_kernel, (1,), (1024, 1024), 4, device), x1k), False, True, None),
    ]


# --------------------------------------------------------------------------- attribution
def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _is_launch(name: str) -> bool:
    return name.startswith(LAUNCH_PREFIXES)


def _is_autograd(name: str) -> bool:
    return name.startswith(("autograd::", "torch::autograd::")) or CPP_BACKWARD_NODE.search(name) is not None


def attribute(events, calls: int, wall_us: float) -> dict:
    """The per-call columns of the module docstring from a profile's events (``prof.events()``)."""
    totals = dict.fromkeys(COLUMNS, 0.0)
    totals["prof_wall_us"] = wall_us
    has_device = False
    for e in events:
        name = e.name
        if e.device_type != DeviceType.CPU:
            if getattr(e, "is_user_annotation", False):
                continue  # a range's copy on the device timeline, not device work
            has_device = True
            totals["device_us"] += e.time_range.elapsed_us()
            totals["kernels"] += not name.startswith(("Memcpy", "Memset"))
            continue
        above = [a.name for a in _ancestors(e)]
        if any(CUDA_API.match(a) for a in above):
            continue  # inside a CUDA API call (a runtime call's driver calls): counted with it
        if _is_launch(name):
            totals["launches"] += 1
            totals["launch_us"] += e.cpu_time_total
        elif name in SYNC_NAMES:
            totals["sync_us"] += e.cpu_time_total
        elif name.startswith("aten::"):
            totals["aten_self_us"] += e.self_cpu_time_total
            if not any(a.startswith("aten::") for a in above):
                totals["aten_ops"] += 1
                totals["aten_us"] += e.cpu_time_total
        elif CUDA_API.match(name):
            totals["cuda_api_us"] += e.cpu_time_total
        elif _is_autograd(name):
            totals["autograd_us"] += e.self_cpu_time_total
    recorded = sum(totals[k] for k in ("launch_us", "sync_us", "cuda_api_us", "aten_self_us", "autograd_us"))
    totals["python_us"] = wall_us - recorded
    row = {k: v / calls for k, v in totals.items()}
    if not has_device:
        row["device_us"] = row["kernels"] = None
    return row


def top_events(prof, calls: int, k: int = 8) -> list[list]:
    """The ``k`` CPU events with the most self CPU time: ``[name, µs per call, count per call]``."""
    averages = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
    averages.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    return [[a.key, a.self_cpu_time_total / calls, a.count / calls] for a in averages[:k]]


def profiled(fn, device: torch.device, calls: int) -> tuple[dict, list]:
    """One profile of ``calls`` back-to-back calls of ``fn`` (warmed up): columns and top events."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    return attribute(prof.events(), calls, wall_us), top_events(prof, calls)


# --------------------------------------------------------------------------- run and report
def run_case(entry, fn, fused, cuda_only, iterations, dtype_name, n, d, device, args) -> dict:
    row = {"entry": entry, "dtype": dtype_name, "n": n, "d": d, "iterations": iterations, "wall_us": None,
           **dict.fromkeys(COLUMNS), "top": [], "note": ""}
    on_gpu = device.type == "cuda"
    if cuda_only and not on_gpu:
        row["note"] = "needs CUDA: not run"
        return row
    stubbed = not on_gpu and fused is True
    try:
        with forced_backend("triton" if fused is True else "auto"), launches_stubbed(stubbed):
            fn()
            backend = deqkern.last_backend() if fused else None
            row["wall_us"] = 1e3 * common.wall_ms(fn, device, rounds=args.rounds, calls=args.wall_calls)
            columns, row["top"] = profiled(fn, device, args.calls)
    except Exception as err:  # noqa: BLE001  (one failing entry must not cost the rest of the run)
        row["note"] = f"ERROR ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
        print(f"  {dtype_name} {entry}: {row['note']}", flush=True)
        return row
    row.update(columns)
    notes = [f"backend {backend}" if backend else "",
             "Launch-based launches stubbed (Python side only)" if stubbed else ""]
    row["note"] = "; ".join(x for x in notes if x)
    print(f"  {dtype_name} {n}x{d} {entry}: wall {row['wall_us']:.1f} us, python {row['python_us']:.1f} us",
          flush=True)
    return row


def _or_dash(v):
    return "-" if v is None else v


def report(rows: list[dict], calls: int, rounds: int) -> str:
    head = ["entry", "dtype N×d", "wall µs", "prof wall µs", "device µs", "kernels", "launches", "launch µs",
            "sync µs", "cuda api µs", "aten ops", "aten µs", "aten self µs", "autograd µs", "python µs", "note"]
    keys = ["wall_us", *COLUMNS]
    main = common.markdown_table(head, [[r["entry"], f"{r['dtype']} {r['n']}×{r['d']}",
                                         *[_or_dash(r[k]) for k in keys], r["note"] or "-"] for r in rows])
    loops = [r for r in rows if r["iterations"] and r["wall_us"] is not None]
    per_iter = common.markdown_table(
        ["entry", "dtype", "iterations", "wall µs / iter", "device µs / iter", "kernels / iter", "launches / iter",
         "aten ops / iter", "python µs / iter"],
        [[r["entry"].strip(), r["dtype"], r["iterations"], *[_or_dash(None if r[k] is None else r[k] / r["iterations"])
          for k in ("wall_us", "device_us", "kernels", "launches", "aten_ops", "python_us")]] for r in loops])
    top = "\n".join(f"- **{r['entry'].strip()}** ({r['dtype']}): "
                    + ", ".join(f"`{name}` {us:.3g} µs ×{count:.3g}" for name, us, count in r["top"])
                    for r in rows if r["top"])
    return (f"> Per call. wall: back-to-back calls, median of {rounds} rounds, no profiler. Other columns: one "
            f"torch.profiler run over {calls} calls (CPU+CUDA activities), divided by {calls}; how each is "
            "computed: bench/profile_host.py's docstring. python = prof wall − launch − sync − cuda api − "
            "aten self − autograd (time in no recorded event, or in an autograd.Function's own ranges).\n\n"
            + main + "\n\n**Per iteration** (the solve loops' rows over their iterations)\n\n" + per_iter
            + "\n\n**Top 8 CPU events by self time** (µs per call, × count per call)\n\n" + top)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default=None, help="NxD (default 256x512; --quick 16x32)")
    ap.add_argument("--calls", type=int, default=50, help="profiled calls per entry point")
    ap.add_argument("--rounds", type=int, default=5, help="wall-time rounds")
    ap.add_argument("--quick", action="store_true", help="tiny size, few calls: a smoke run (CPU too)")
    ap.add_argument("--out", default=None, help="directory for profile.json and profile.md "
                    "(default bench/results/<device>/)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    n, d = (int(v) for v in (args.size or ("16x32" if args.quick else "256x512")).lower().split("x"))
    args.wall_calls = None
    if args.quick:
        args.calls, args.rounds, args.wall_calls = min(args.calls, 3), min(args.rounds, 2), 3
    rows = []
    for name, dtype in DTYPES.items():
        for case in cases(n, d, dtype, device):
            rows.append(run_case(*case, name, n, d, device, args))
    payload = {"environment": common.environment(device), "size": [n, d], "profiled_calls": args.calls,
               "wall_rounds": args.rounds, "columns_us_per_call": COLUMNS, "rows": rows}
    out = Path(args.out) / "profile.json" if args.out else None
    return common.publish(device, "profile", payload, report(rows, args.calls, args.rounds),
                          quick=args.quick and out is None, out=out)


if __name__ == "__main__":
    main()
