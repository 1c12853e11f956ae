"""Picard solve of the frozen-context cell: deqkern vs hand-written eager loops vs torchdeq.

    python bench/bench_solve.py [--dtype bf16 fp32] [--sizes 8192x1024 ...] [--phase forward train]
                                [--quick] [--out PATH]

Cell: ``h <- (1 - b) h + b * g * RMSNorm(h W^T + frozen)``, b = 0.8, ``||W||_2 = 0.5``
(contraction ~0.5; ~12 iterations to rel. residual 1e-4 in fp32, ~7 to 5e-3 in bf16),
started from a random ``h0``.

Forward solve (no grad):
  eager-item      hand-written loop, eager cell + residual, ``.item()`` check every iteration
  eager-nosync    the same loop, ``max_iter`` iterations, no check
  eager-graph     those ``max_iter`` eager iterations captured in one CUDA graph
  compile-item    eager-item's loop with its step (cell + residual) ``torch.compile``-d
  compile-graph   eager-nosync's fixed loop under ``torch.compile(mode="reduce-overhead")``
                  (Inductor's kernels replayed from CUDA graphs)
  deqkern         ``solve_fused`` with the fused op (default ``check_every``)
  deqkern-graph   ``solve_fused(..., graph=True)`` (``max_iter`` iterations, no sync)
  torchdeq        ``torchdeq.solver.fixed_point_iter`` on the eager cell
  torchdeq-fusedf the same with the fused op as f (isolates solver overhead)
Train step (solve + ``backward()`` of an MSE loss; grads of W, g, frozen):
  eager-unrolled  the eager-item loop with autograd through every iteration
  compile-unrolled the same with the cell ``torch.compile``-d
  deqkern-ift     ``solve_fused`` + the cell's fused adjoint (``deqkern.nn.cell_adjoint``: one
                  GEMM + one kernel per adjoint iteration), as FrozenContextDEQ trains
  deqkern-ift-graph  the same with ``graph=True`` for the forward solve
  deqkern-ift-autograd  the generic IFT backward (autograd vector-Jacobian products)
  deqkern-onestep
  torchdeq-ift    ``get_deq(ift=True)`` (fixed_point_iter forward and backward), eager cell
  torchdeq-1step  ``get_deq()`` default 1-step gradient, eager cell

Every variant's output is checked before it is timed (FAIL rows are not timed): forward
h* against eager-item's (rel. Frobenius error <= 5 tol); IFT-type gradients against the
eager unrolled ones, 1-step-type gradients against one eager cell application at
eager-item's h* (rel. error <= 2e-2 fp32, 1e-1 bf16). Two clocks: wall time per solve /
train step (``common.wall_ms``: back-to-back calls, host included, synchronized only at
the ends; shown first, and what the targets use) and ``triton.testing.do_bench``
medians (L2 flushed between calls). Peak memory from ``torch.cuda.max_memory_allocated``
above the inputs. CPU
(``--quick`` smoke runs): perf_counter medians of the eager and torchdeq-on-eager
variants only; no CUDA-graph or compile variants; the deqkern variants are checked
(through the Triton interpreter when ``TRITON_INTERPRET=1``) but not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from deqkern.nn import cell_adjoint  # noqa: E402
from deqkern.solver import ConvergenceWarning, solve_fused  # noqa: E402

try:
    import torchdeq
    from torchdeq.solver.fp_iter import fixed_point_iter
except ImportError:  # reported in the output, not an error
    torchdeq = None

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-3}
MAX_ITER = {torch.float32: 16, torch.bfloat16: 10}
GRAD_TOL = {torch.float32: 2e-2, torch.bfloat16: 1e-1}
PHASES = ("forward", "train")
#: Variants timed on a CPU: those that never call the fused op (the Triton interpreter
#: is a correctness tool, not a speed baseline).
CPU_TIMED = {"eager-item", "eager-nosync", "torchdeq", "eager-unrolled", "torchdeq-ift", "torchdeq-1step"}
DEFAULT_SIZES = ["8192x1024", "32768x512", "256x512"]
QUICK_SIZES = ["256x64", "1024x128"]
DAMPING, SIGMA, EPS, STOP = 0.8, 0.5, 1e-6, "rel"
LAUNCH_BOUND = (256, 512)


class Cell:
    """Weights, frozen context and loss target of one benchmark problem."""

    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen)
        w = SIGMA * w / torch.linalg.matrix_norm(w, 2)
        self.w = w.to(device=device, dtype=dtype).requires_grad_()
        self.frozen = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        self.gain = (1 + 0.1 * torch.randn(d, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
        self.target = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
        self.h0 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
        self.params = [self.w, self.gain, self.frozen]
        self.tol, self.max_iter = TOL[dtype], MAX_ITER[dtype]

    def eager(self, h: torch.Tensor) -> torch.Tensor:
        """The cell as a user writes it: float32 normalization, storage dtype in and out."""
        z = (F.linear(h, self.w) + self.frozen).float()
        y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * self.gain.float()
        return ((1 - DAMPING) * h.float() + DAMPING * y).to(h.dtype)

    def adjoint(self):
        """The cell's fused implicit backward (what ``deqkern.nn.FrozenContextDEQ`` uses)."""
        return cell_adjoint(self.w, self.gain, self.frozen, damping=DAMPING, eps=EPS)

    def step(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell through the fused op (also returns the per-row residual)."""
        return deqkern.frozen_rmsnorm_update(F.linear(h, self.w), self.frozen, h, self.gain, eps=EPS,
                                             damping=DAMPING, stop_mode=STOP)

    def fused(self, h: torch.Tensor) -> torch.Tensor:
        return self.step(h)[0]

    def loss(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() - self.target.float()).pow(2).mean()

    def grads(self, h: torch.Tensor) -> list[torch.Tensor]:
        for p in self.params:
            p.grad = None
        self.loss(h).backward()
        out = [p.grad.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return out


def rel_residual(h_next: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    diff = (h_next.float() - h.float()).norm(dim=-1)
    return diff / (h_next.float().norm(dim=-1) + 1e-9)


# --------------------------------------------------------------------------- forward variants
def eager_item(cell: Cell) -> tuple[torch.Tensor, int]:
    h = cell.h0
    for k in range(1, cell.max_iter + 1):
        h_next = cell.eager(h)
        done = rel_residual(h_next, h).max().item() < cell.tol
        h = h_next
        if done:
            break
    return h, k


def compiled_item(cell: Cell) -> Callable[[], tuple[torch.Tensor, int]]:
    """eager-item's loop around a ``torch.compile``-d step (cell + max residual)."""

    def step(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_next = cell.eager(h)
        return h_next, rel_residual(h_next, h).max()

    compiled = common.fresh_compile(step)

    def run() -> tuple[torch.Tensor, int]:
        h = cell.h0
        for k in range(1, cell.max_iter + 1):
            h, residual = compiled(h)
            if residual.item() < cell.tol:
                break
        return h, k

    return run


def eager_nosync(cell: Cell, h0: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = cell.h0 if h0 is None else h0
    residual = None
    for _ in range(cell.max_iter):
        h_next = cell.eager(h)
        residual = rel_residual(h_next, h)
        h = h_next
    return h, residual


def compiled_graph(cell: Cell) -> Callable[[], torch.Tensor]:
    """eager-nosync's fixed loop under ``torch.compile(mode="reduce-overhead")``."""
    compiled = common.fresh_compile(lambda h: eager_nosync(cell, h)[0], mode="reduce-overhead")
    return lambda: compiled(cell.h0)


def eager_graph(cell: Cell) -> Callable[[], torch.Tensor]:
    """Capture eager-nosync's iterations once; the returned callable replays them."""
    static_in = cell.h0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        eager_nosync(cell, static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out, _ = eager_nosync(cell, static_in)

    def replay() -> torch.Tensor:
        static_in.copy_(cell.h0)
        graph.replay()
        return static_out

    return replay


def deqkern_solve(cell: Cell, graph: bool, **kw):
    return solve_fused(cell.step, cell.h0, max_iter=cell.max_iter, tol=cell.tol, stop_mode=STOP, graph=graph,
                       on_nonconvergence="ignore" if graph else "warn", **kw)


def torchdeq_fwd(cell: Cell, f: Callable) -> tuple[torch.Tensor, int]:
    h, _, info = fixed_point_iter(f, cell.h0, max_iter=cell.max_iter, tol=cell.tol, stop_mode=STOP)
    return h, int(info["nstep"].max())


def torchdeq_layer(cell: Cell, ift: bool):
    kw = dict(f_solver="fixed_point_iter", b_solver="fixed_point_iter", f_max_iter=cell.max_iter,
              b_max_iter=cell.max_iter, f_tol=cell.tol, b_tol=cell.tol, f_stop_mode=STOP, b_stop_mode=STOP)
    return torchdeq.get_deq(ift=ift, **kw)


# --------------------------------------------------------------------------- one size
def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float, Optional[float]]:
    """(wall ms, do_bench median ms, peak MiB above what was allocated before, None on a
    CPU) of ``fn``."""
    return common.wall_ms(fn, device), common.time_ms(fn, device), common.peak_mib(fn, device)


def bench_size(n: int, d: int, dtype: torch.dtype, device: torch.device,
               phases: tuple[str, ...] = PHASES) -> list[dict]:
    cell = Cell(n, d, dtype, device)
    on_gpu = device.type == "cuda"
    rows: list[dict] = []

    def record(phase: str, variant: str, status: str, fn: Optional[Callable], iterations=None, note=""):
        row = {"n": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "phase": phase, "variant": variant,
               "check": status, "iterations": iterations, "note": note}
        if status == "ok" and fn is not None and (on_gpu or variant in CPU_TIMED):
            row["wall_ms"], row["ms"], row["peak_mib"] = measure(fn, device)
            if iterations:
                row["ms_per_iter"] = row["ms"] / iterations
                row["wall_ms_per_iter"] = row["wall_ms"] / iterations
        elif status == "ok":
            row["note"] = (note + "; " if note else "") + "checked, not timed (CPU)"
        rows.append(row)

    with torch.no_grad():
        h_ref, k_ref = eager_item(cell)
    if "forward" in phases:
        forward_variants(cell, h_ref, record, on_gpu)
    if "train" in phases:
        train_variants(cell, h_ref, k_ref, dtype, record, on_gpu)
    return rows


def forward_variants(cell: Cell, h_ref: torch.Tensor, record: Callable, on_gpu: bool) -> None:
    fwd_tol = 5 * cell.tol

    def fwd_variant(name: str, run: Callable[[], tuple[torch.Tensor, object]], note: str = ""):
        with torch.no_grad():
            h, iters = run()
        status = common.check_close("h*", h, h_ref, fwd_tol)

        def timed():
            with torch.no_grad():
                run()

        record("forward", name, status, timed, iters, note)

    fwd_variant("eager-item", lambda: eager_item(cell))
    fwd_variant("eager-nosync", lambda: (eager_nosync(cell)[0], cell.max_iter))
    if on_gpu:
        replay = eager_graph(cell)
        fwd_variant("eager-graph", lambda: (replay(), cell.max_iter))
        fwd_variant("compile-item", compiled_item(cell))
        replay_compiled = compiled_graph(cell)
        fwd_variant("compile-graph", lambda: (replay_compiled().clone(), cell.max_iter))

    def deqkern_fwd() -> tuple[torch.Tensor, int]:
        h, info = deqkern_solve(cell, False)
        return h, info["iterations"]

    fwd_variant("deqkern", deqkern_fwd)
    if on_gpu:
        fwd_variant("deqkern-graph", lambda: (deqkern_solve(cell, True)[0], cell.max_iter))
    if torchdeq is not None:
        fwd_variant("torchdeq", lambda: torchdeq_fwd(cell, cell.eager))
        fwd_variant("torchdeq-fusedf", lambda: torchdeq_fwd(cell, cell.fused))



def train_variants(cell: Cell, h_ref: torch.Tensor, k_ref: int, dtype: torch.dtype, record: Callable,
                   on_gpu: bool) -> None:
    grad_tol = GRAD_TOL[dtype]

    def unrolled() -> torch.Tensor:
        h = cell.h0
        for _ in range(k_ref):
            h = cell.eager(h)
        return h

    grads_ift_ref = cell.grads(unrolled())
    grads_onestep_ref = cell.grads(cell.eager(h_ref.detach()))

    infos: list[dict] = []

    def solved(graph: bool, **kw) -> Callable[[], torch.Tensor]:
        """A deqkern train forward that keeps its info (the adjoint's step counts are
        filled in by the backward)."""
        def forward() -> torch.Tensor:
            h, info = deqkern_solve(cell, graph, **kw)
            infos[:] = [info]
            return h
        return forward

    def train_variant(name: str, forward: Callable[[], torch.Tensor], reference: list[torch.Tensor], note: str = ""):
        status = "ok"
        infos.clear()
        for label, got, ref in zip(("dW", "dg", "dfrozen"), cell.grads(forward()), reference):
            if status == "ok":
                status = common.check_close(label, got, ref, grad_tol)
        if infos and "b_mean_nstep" in infos[0]:  # the IFT rows: how many adjoint steps the check run took
            info = infos[0]
            steps = f"adjoint steps: mean {float(info['b_mean_nstep']):.2f}, max {int(info['b_nstep'].max())}"
            note = f"{note}; {steps}" if note else steps

        def timed():
            for p in cell.params:
                p.grad = None
            cell.loss(forward()).backward()

        record("train", name, status, timed, None, note)

    train_variant("eager-unrolled", unrolled, grads_ift_ref, f"{k_ref} iterations")
    if on_gpu:
        compiled_cell = common.fresh_compile(cell.eager)

        def compiled_unrolled() -> torch.Tensor:
            h = cell.h0
            for _ in range(k_ref):
                h = compiled_cell(h)
            return h

        train_variant("compile-unrolled", compiled_unrolled, grads_ift_ref, f"{k_ref} iterations")
    train_variant("deqkern-ift", solved(False, adjoint=cell.adjoint()), grads_ift_ref)
    if on_gpu:
        train_variant("deqkern-ift-graph", solved(True, adjoint=cell.adjoint()), grads_ift_ref)
    train_variant("deqkern-ift-autograd", solved(False), grads_ift_ref)
    train_variant("deqkern-onestep", solved(False, backward="onestep"), grads_onestep_ref)
    if torchdeq is not None:
        ift_layer, onestep_layer = torchdeq_layer(cell, True), torchdeq_layer(cell, False)
        train_variant("torchdeq-ift", lambda: ift_layer(cell.eager, cell.h0)[0][-1], grads_ift_ref)
        train_variant("torchdeq-1step", lambda: onestep_layer(cell.eager, cell.h0)[0][-1], grads_onestep_ref)


# --------------------------------------------------------------------------- report
#: Baselines of the speedup columns, per phase: (column, variant).
BASES = {
    "forward": [("eager", "eager-item"), ("eager-graph", "eager-graph"), ("compile", "compile-item"),
                ("compile-graph", "compile-graph"), ("torchdeq", "torchdeq"), ("torchdeq-1step", None)],
    "train": [("eager", "eager-unrolled"), ("eager-graph", None), ("compile", "compile-unrolled"),
              ("compile-graph", None), ("torchdeq", "torchdeq-ift"), ("torchdeq-1step", "torchdeq-1step")],
}


def ratios(rows: list[dict]) -> None:
    """Add speedups against each phase's baselines (:data:`BASES`): ``xw_<baseline>`` in
    wall time, ``x_<baseline>`` in do_bench time."""
    by = {(r["dtype"], r["n"], r["d"], r["phase"], r["variant"]): r for r in rows}
    for r in rows:
        key = (r["dtype"], r["n"], r["d"], r["phase"])
        for _, base in BASES[r["phase"]]:
            if base is None:
                continue
            b = by.get((*key, base))
            if b and "ms" in b and "ms" in r:
                r[f"x_{base}"] = b["ms"] / r["ms"]
                r[f"xw_{base}"] = b["wall_ms"] / r["wall_ms"]


def targets(rows: list[dict]) -> list[list[object]]:
    """The issues' goals, each with the measured wall-time ratio and PASS/MISS."""
    by = {(r["dtype"], r["n"], r["d"], r["phase"], r["variant"]): r for r in rows}
    out = []
    for dtype, n, d in sorted({(r["dtype"], r["n"], r["d"]) for r in rows}):
        goals = [("forward", "deqkern", "eager-item", 4.0), ("forward", "deqkern-graph", "eager-item", 4.0),
                 ("train", "deqkern-ift", "torchdeq-ift", 5.0), ("train", "deqkern-ift-graph", "torchdeq-ift", 5.0),
                 ("train", "deqkern-ift", "torchdeq-1step", 1.0), ("train", "deqkern-ift-graph", "torchdeq-1step", 1.0)]
        goals += [("forward", "deqkern-graph", "compile-graph", 1.0)]
        if (n, d) == LAUNCH_BOUND:
            goals += [("forward", "deqkern-graph", "eager-item", 20.0), ("forward", "deqkern-graph", "eager-graph", 2.0),
                      ("forward", "deqkern", "eager-item", 1.5)]
        if (dtype, n, d) == ("bfloat16", 32768, 512):
            goals += [("forward", "deqkern", "eager-item", 3.0)]
        for phase, variant, base, goal in goals:
            if phase not in {r["phase"] for r in rows}:
                continue
            r = by.get((dtype, n, d, phase, variant))
            ratio = r.get(f"xw_{base}") if r else None
            verdict = "n/a" if ratio is None else ("PASS" if ratio >= goal else "MISS")
            out.append([dtype, f"{n}×{d}", phase, f"{variant} vs {base}", f">= {goal:g}×",
                        "-" if ratio is None else f"{ratio:.2f}×", verdict])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(ap, DTYPES)
    ap.add_argument("--phase", nargs="+", default=list(PHASES), choices=PHASES,
                    help="forward solve (no grad) and/or train step (solve + backward)")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it); "
                    "default bench/results/<device>/solve[_quick].json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    phases = tuple(p for p in PHASES if p in args.phase)
    notes = [f"torchdeq settings (like for like with deqkern's): f_solver = b_solver = fixed_point_iter, "
             f"f_max_iter = b_max_iter = the cell's max_iter, f_tol = b_tol = the cell's tol, stop_mode {STOP!r} "
             f"(torchdeq's relative test per sample); deqkern's adjoint stops on the relative residual per row "
             f"with b_tol = tol. The IFT rows' notes give the adjoint steps their check run took."]
    if device.type != "cuda":
        notes.append("CPU run: no CUDA-graph or torch.compile variants; only " + ", ".join(sorted(CPU_TIMED))
                     + " are timed (perf_counter medians, a smoke test); deqkern variants are checked, not timed.")
    if torchdeq is None:
        notes.append("torchdeq is not importable: its variants were skipped (pip install torchdeq==0.1.0).")
    with warnings.catch_warnings():
        warnings.simplefilter("once", ConvergenceWarning)
        rows, skipped = common.sweep(sizes, args.dtype, DTYPES,
                                     lambda n, d, dtype: bench_size(n, d, dtype, device, phases))
    if skipped:
        notes.append("Skipped (run time budget reached): " + ", ".join(skipped))
    ratios(rows)
    payload = {"environment": common.environment(device), "damping": DAMPING, "sigma": SIGMA, "stop_mode": STOP,
               "tol": {str(k): v for k, v in TOL.items()}, "max_iter": {str(k): v for k, v in MAX_ITER.items()},
               "check_every": deqkern.solver.DEFAULT_CHECK_EVERY, "phases": list(phases), "notes": notes,
               "rows": rows, "targets": targets(rows), "skipped_time_budget": skipped}

    headers = ["dtype", "N×d", "phase", "variant", "check", "iters", "wall ms", "wall ms / iter",
               *[f"wall × {column}" for column, _ in BASES["forward"]], "ms", "ms / iter", "peak MiB", "note"]
    table_rows = []
    for r in rows:
        speedups = [r.get(f"xw_{base}", "-") if base else "-" for _, base in BASES[r["phase"]]]
        peak = r.get("peak_mib")
        table_rows.append([r["dtype"], f"{r['n']}×{r['d']}", r["phase"], r["variant"],
                           r["check"] + (" (not timed)" if "not timed" in r["note"] else ""),
                           r["iterations"] if r["iterations"] is not None else "-", r.get("wall_ms", "-"),
                           r.get("wall_ms_per_iter", "-"), *speedups, r.get("ms", "-"), r.get("ms_per_iter", "-"),
                           "n/a" if "ms" in r and peak is None else peak or "-",
                           r["note"].replace("; checked, not timed (CPU)", "").replace("checked, not timed (CPU)", "")
                           or "-"])
    table = "\n".join(f"> {note}" for note in notes) + ("\n\n" if notes else "")
    table += (f"damping={DAMPING}, ||W||₂={SIGMA}, stop_mode={STOP}, tol/max_iter: fp32 {TOL[torch.float32]:g}/"
              f"{MAX_ITER[torch.float32]}, bf16 {TOL[torch.bfloat16]:g}/{MAX_ITER[torch.bfloat16]}; "
              f"check_every={deqkern.solver.DEFAULT_CHECK_EVERY}. wall: back-to-back calls, host included, "
              f"synchronized only at the ends, median of 5 rounds; ms: do_bench median (L2 flushed between calls). "
              f"Speedup columns (wall): forward vs eager-item, eager-graph, compile-item, compile-graph, torchdeq; "
              f"train vs eager-unrolled, compile-unrolled, torchdeq-ift, torchdeq-1step. Peak MiB: "
              f"torch.cuda.max_memory_allocated above the inputs (n/a on CPU).\n\n")
    table += common.markdown_table(headers, table_rows)
    table += "\n\nTargets\n\n" + common.markdown_table(
        ["dtype", "N×d", "phase", "comparison", "goal", "measured", "verdict"], payload["targets"])

    stem = "solve" if phases == PHASES else f"solve_{phases[0]}"
    return common.publish(device, stem, payload, table, quick=args.quick, out=args.out)


if __name__ == "__main__":
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    main()
