"""Shared benchmark plumbing: environment record, timing, bandwidth floor, outputs.

Timing on CUDA uses ``triton.testing.do_bench`` (CUDA events, median, warm-up). On a
CPU-only machine it uses ``time.perf_counter`` medians; the Triton interpreter is never
timed (it is a correctness tool, not a speed comparison).

A run-wide deadline (``DEQKERN_BENCH_DEADLINE``, seconds since the epoch, set by
``python -m bench --budget-s``) lets each benchmark skip its remaining sizes, reported
as skipped, instead of overrunning a fixed time slot.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> dict:
    """Device name, library versions, commit and date, recorded with every result."""
    import triton

    commit = os.environ.get("DEQKERN_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cap = platform.processor() or platform.machine(), None
    return {
        "device": name,
        "compute_capability": cap,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_threads": torch.get_num_threads(),
    }


CPU_NOTE = ("CPU run: only eager variants are timed, and only as a smoke test. Fused variants run through "
            "the Triton interpreter and are checked for correctness, not timed: interpreter timings are not "
            "a speed comparison.")


def out_of_time() -> bool:
    """True once the run-wide deadline (``DEQKERN_BENCH_DEADLINE``) has passed."""
    deadline = os.environ.get("DEQKERN_BENCH_DEADLINE")
    return deadline is not None and time.time() > float(deadline)


def add_size_args(ap, dtypes: Sequence[str]) -> None:
    """The arguments every size-sweeping bench takes: --dtype, --sizes, --device, --quick."""
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(dtypes))
    ap.add_argument("--sizes", nargs="+", default=None, help="NxD, e.g. 8192x1024")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")


def sweep(sizes: Sequence[str], dtype_names: Sequence[str], dtypes: dict,
          bench_size: Callable[[int, int, torch.dtype], list]) -> tuple[list, list]:
    """Run ``bench_size(n, d, dtype)`` over sizes x dtypes (dtype innermost, so a cut by the
    time budget spares both dtypes of a size). Returns the rows, grouped by dtype in the
    order given, and the ``"dtype NxD"`` cases skipped for lack of time."""
    rows, skipped = [], []
    for size in sizes:
        for name in dtype_names:
            if out_of_time():
                skipped.append(f"{name} {size}")
                continue
            n, d = (int(x) for x in size.lower().split("x"))
            rows.extend(bench_size(n, d, dtypes[name]))
    order = [str(dtypes[name]).replace("torch.", "") for name in dtype_names]
    rows.sort(key=lambda r: order.index(r["dtype"]))  # stable: tables grouped by dtype
    return rows, skipped


def fresh_compile(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, dynamic=False, **options)`` with Dynamo's caches cleared first.

    A new ``torch.compile`` wrapper does not get a new cache: compiled graphs hang off
    ``fn``'s code object, and past ``recompile_limit`` (8) Dynamo silently runs ``fn``
    eagerly -- a "compile" row that would really be eager. Resetting per problem size
    keeps each one at a fresh compile, and the limit is made an error, not a fallback.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False, **options)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory (MiB) that one call of ``fn`` allocates above what was already
    allocated; None on a CPU (no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: int = 200, cpu_reps: int = 5,
            graph: bool = False) -> float:
    """Median milliseconds of one call of ``fn``.

    ``graph=True`` (CUDA only) captures 20 calls in one CUDA graph and times its replays:
    the device time of the work, without the host's launch overhead. Without it, each
    call is launched from Python as a user would (``do_bench``, L2 flushed between
    calls), so host overhead shows wherever it exceeds the device time.
    """
    if device.type == "cuda" and graph:
        return graph_time_ms(fn, calls=20, reps=max(5, rep_ms // 10))
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def wall_ms(fn: Callable[[], object], device: torch.device, *, rounds: int = 5, calls: int | None = None,
            round_s: float = 0.05) -> float:
    """Wall-clock milliseconds per call, as a training loop sees it: ``calls`` calls back
    to back, host and device overlapping, synchronized only at the start and the end of
    a round; the median of ``rounds`` rounds. ``calls`` defaults to what fills about
    ``round_s`` seconds (3 to 1000). Unlike :func:`time_ms` (``do_bench`` flushes the L2
    between calls, hiding up to tens of microseconds of host time per call, or a CUDA
    graph, hiding all of it), this charges every microsecond the host spends."""
    return statistics.median(interleaved_wall_ms({0: fn}, device, rounds=rounds, calls=calls, round_s=round_s)[0])


def interleaved_wall_ms(fns: dict, device: torch.device, *, rounds: int = 5, calls: int | None = None,
                        round_s: float = 0.05) -> dict:
    """:func:`wall_ms`'s rounds for several functions, taken in turn (a, b, c, a, b, c, ...),
    so that a drift of the host's speed during the run reaches each of them alike: each
    key's list of per-round milliseconds per call. Each function is warmed up (and its
    ``calls`` calibrated) before the first round, and each round starts after one untimed
    call: on the H200 the variant timed right after the autograd backwards read 15% slower
    than the identical call elsewhere in the same rounds (bench_cell, be29250: cell-max20
    0.0855 ms, cell 0.0733), a cost of the switch, not of the function."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counts = {}
    for key, fn in fns.items():
        for _ in range(3):
            fn()
        sync()
        counts[key] = calls
        if calls is None:
            start = time.perf_counter()
            for _ in range(3):
                fn()
            sync()
            counts[key] = max(3, min(1000, int(round_s / max((time.perf_counter() - start) / 3, 1e-7))))
    samples: dict = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            fn()  # untimed: what the switch from the previous function costs is not this one's
            sync()
            start = time.perf_counter()
            for _ in range(counts[key]):
                fn()
            sync()
            samples[key].append((time.perf_counter() - start) / counts[key] * 1e3)
    return samples


def graph_time_ms(fn: Callable[[], object], calls: int, reps: int) -> float:
    """Device milliseconds per call of ``fn`` (CUDA): ``calls`` calls captured in one CUDA
    graph after a warm-up on a side stream, the median of ``reps`` timed replays over ``calls``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


class Rotating:
    """Cycle through several input sets so that repeated timing does not measure L2.

    ``make()`` builds one input set; enough sets are built to exceed ``2 * l2_bytes``.
    """

    def __init__(self, make: Callable[[], Sequence], bytes_per_set: int, device: torch.device):
        l2 = 50 << 20
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", l2)
        count = max(1, min(16, -(-2 * l2 // max(bytes_per_set, 1))))
        self.sets = [make() for _ in range(count)]
        self.index = 0

    def next(self) -> Sequence:
        self.index = (self.index + 1) % len(self.sets)
        return self.sets[self.index]


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> str:
    """'ok' or 'FAIL (...)': relative Frobenius error of ``out`` against ``ref``."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return f"FAIL ({name}: non-finite output)"
    err = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    return "ok" if err <= rel_tol else f"FAIL ({name}: rel. error {err:.2e} > {rel_tol:.0e})"


def results_dir(device: torch.device) -> Path:
    """``$DEQKERN_RESULTS/<device-slug>/`` when the variable is set; else
    ``bench/results/<device-slug>/`` on a GPU, and on a CPU (a smoke test, not results
    to commit) ``<temporary directory>/cpu/``, one per process (:func:`cpu_scratch`)."""
    root = os.environ.get("DEQKERN_RESULTS")
    if root:
        return Path(root) / device_slug(device)
    return (RESULTS if device.type == "cuda" else cpu_scratch()) / device_slug(device)


@functools.lru_cache(maxsize=None)
def cpu_scratch() -> Path:
    """The temporary results root of this process's CPU runs (created on first use)."""
    return Path(tempfile.mkdtemp(prefix="deqkern-bench-"))


def publish(device: torch.device, stem: str, payload: dict, table: str, *, quick: bool = False,
            out: "Path | None" = None) -> dict:
    """Write the results (:func:`write_results`; ``out``: an explicit JSON path instead),
    print the table and where it went; returns ``payload``."""
    where = write_results(device, stem + ("_quick" if quick else ""), payload, table, out)
    print(table)
    print(f"\nwritten to {where}")
    return payload


def write_results(device: torch.device, stem: str, payload: dict, table: str, out: "Path | None" = None) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md`` under :func:`results_dir` (or ``out`` and
    ``out`` with suffix ``.md``), the markdown headed by the environment line."""
    json_path = results_dir(device) / f"{stem}.json" if out is None else Path(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    header = (
        f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"commit {env['commit'][:10]} · {env['date']}\n\n"
    )
    if device.type != "cuda":
        header += f"> {CPU_NOTE}\n\n"
    json_path.with_suffix(".md").write_text(header + table + "\n")
    return json_path.parent if out is None else json_path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


#: Order of the sections in SUMMARY.md (a result file ``<stem>.md`` belongs to the first
#: suite its stem starts with); plots in the order ``bench/plot.py`` writes them.
SUMMARY_ORDER = ("update", "iteration", "solve", "train", "spectral", "model", "dropin", "host")
PLOTS = {
    "speedup_update.png": "Update op: fused speedup vs eager and torch.compile, by problem size",
    "speedup_iteration.png": "One iteration (GEMM + update): speedup and time / floor, by problem size",
    "speedup_solve.png": "Solve and train step: deqkern speedups, by problem size",
    "solve_time_vs_iterations.png": "Time per forward solve vs iterations run, per variant",
    "bandwidth_update.png": "Update op: achieved GB/s vs device copy bandwidth",
}


def write_summary(out_dir: Path) -> Path:
    """``SUMMARY.md`` in ``out_dir``: environment, run status, plots that exist, and every
    ``<stem>.md`` table there, in :data:`SUMMARY_ORDER`."""
    out_dir = Path(out_dir)
    tables = sorted((p for p in out_dir.glob("*.md") if p.name != "SUMMARY.md"),
                    key=lambda p: (_suite_rank(p.stem), p.stem))
    lines = [f"# Benchmark summary: {out_dir.name}", ""]
    run_file = out_dir / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else None
    env = run["environment"] if run else next(
        (json.loads(p.read_text()).get("environment") for p in out_dir.glob("*.json") if p.name != "run.json"), None)
    if env:
        lines += [f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
                  f"commit {str(env['commit'])[:10]} · {env['date']}", ""]
        if env.get("cuda") is None or env.get("triton_interpreter"):
            lines += [f"> {CPU_NOTE}", ""]
    if run:
        lines += [f"Command: `python -m bench {' '.join(run['argv'])}`", "",
                  markdown_table(["suite", "status", "seconds"],
                                 [[name, info["status"], info["seconds"]] for name, info in run["suites"].items()]),
                  ""]
    plots = [(name, title) for name, title in PLOTS.items() if (out_dir / name).exists()]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"**{title}**\n\n![{title}]({name})\n" for name, title in plots]
    for path in tables:
        body = path.read_text().split("\n", 2)
        # drop the per-file device line, already given once above
        text = body[2] if body[0].startswith("Device:") and len(body) > 2 else path.read_text()
        lines += [f"## {path.stem}", "", f"From [`{path.name}`]({path.name}) / `{path.stem}.json`.", "", text.strip(), ""]
    out = out_dir / "SUMMARY.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _suite_rank(stem: str) -> int:
    return next((i for i, suite in enumerate(SUMMARY_ORDER) if stem.startswith(suite)), len(SUMMARY_ORDER))
