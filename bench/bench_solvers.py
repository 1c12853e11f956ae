"""Anderson / Broyden on a slowly contracting cell: deqkern vs torchdeq, and vs Picard.

    python bench/bench_solvers.py [--dtype fp32 bf16] [--sizes 8192x1024 256x512] [--tiny] [--out PATH]

Cell: the frozen-context cell ``h <- (1 - b) h + b * g * RMSNorm(h W^T + frozen)`` with a
small step ``b = 0.08`` and ``||W||_2 = 0.5``: contraction about 0.95 (measured and
reported), so Picard needs ~150-200 iterations to a rel. residual of 1e-4.

Variants (one forward solve each, rel. stop mode, ``tol`` 1e-4 fp32 / 1e-2 bf16):
  deqkern-anderson        ``solve_fused(cell.step, method="anderson")`` (fused step, m=5)
  deqkern-anderson-f      ``solve(cell.eager, method="anderson")``: a user's eager f
  deqkern-anderson-graph  the first with ``graph=True`` (CUDA; max_iter steps, no sync)
  deqkern-broyden         ``solve_fused(..., method="broyden")`` (every step kept)
  deqkern-picard          ``solve_fused(...)`` Picard
  torchdeq-anderson       ``torchdeq.solver.anderson_solver`` on the eager cell (m=6, its defaults)
  torchdeq-broyden        ``torchdeq.solver.broyden_solver`` on the eager cell
Columns: wall time per solve (back-to-back calls, host included, synchronized at the
end), iterations to tol (the largest row's), the solve's speed-up over torchdeq's
anderson (fp32) or broyden (bf16: torchdeq's anderson has no bf16 LU) and the
iteration ratio Picard / method.

Every variant is checked before it is timed: the returned ``z`` must be a fixed point to
``3 tol`` (its rel. residual under the float32 cell) and within ``3 tol / (1 -
contraction)`` of a float32 reference (Picard to 1e-6). deqkern's FAIL rows are not
timed; torchdeq's are (a baseline that fails, e.g. its broyden turning NaN in bf16, is
still what its users pay), and keep their FAIL status.

Commit section: device time per call of the solver's bookkeeping kernel in place (the
fused step's private output) vs into a new tensor (what ``solve(f)`` does so as never to
write into f's output), all rows active: the per-iteration cost of not writing into f's
outputs. CUDA only (on a CPU the bookkeeping is eager and out of place either way).

``--tiny``: CPU-sized problems (64x32, 128x64), a smoke run of the same code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from deqkern.ops.commit import RowState  # noqa: E402
from deqkern.solver import loop  # noqa: E402

try:
    from torchdeq.solver import anderson_solver, broyden_solver
except ImportError:  # reported in the output, not an error
    anderson_solver = broyden_solver = None

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
MAX_ITER = 300
DAMPING, SIGMA, EPS, STOP = 0.08, 0.5, 1e-6, "rel"
DEFAULT_SIZES, TINY_SIZES = ["8192x1024", "256x512"], ["64x32", "128x64"]
BASELINE = {torch.float32: "torchdeq-anderson", torch.bfloat16: "torchdeq-broyden"}


class SlowCell:
    """Weights and frozen context of one problem (float32 master copies for the checks)."""

    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen)
        self.w32 = (SIGMA * w / torch.linalg.matrix_norm(w, 2)).to(device)
        self.frozen32 = torch.randn(n, d, generator=gen).to(device)
        self.gain32 = (1 + 0.1 * torch.randn(d, generator=gen)).to(device)
        self.h0 = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
        self.w, self.frozen, self.gain = (t.to(dtype) for t in (self.w32, self.frozen32, self.gain32))
        self.tol = TOL[dtype]

    def eager(self, h: torch.Tensor) -> torch.Tensor:
        z = (F.linear(h, self.w) + self.frozen).float()
        y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * self.gain.float()
        return ((1 - DAMPING) * h.float() + DAMPING * y).to(h.dtype)

    def step(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return deqkern.frozen_rmsnorm_update(F.linear(h, self.w), self.frozen, h, self.gain, eps=EPS,
                                             damping=DAMPING, stop_mode=STOP)

    def residual32(self, z: torch.Tensor) -> float:
        """Largest rel. residual of ``z`` under the float32 cell."""
        z = z.float()
        u = (F.linear(z, self.w32) + self.frozen32)
        f = (1 - DAMPING) * z + DAMPING * u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + EPS) * self.gain32
        return ((f - z).norm(dim=-1) / f.norm(dim=-1)).max().item()


def wall_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 1.0) -> float:
    """Wall time per call of back-to-back calls, host included (synchronized at the end)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    reps = max(2, min(50, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def variants(cell: SlowCell, on_gpu: bool) -> dict[str, Callable[[], tuple[torch.Tensor, int]]]:
    """name -> run() returning ``(z, iterations)``."""
    kw = dict(max_iter=MAX_ITER, tol=cell.tol, stop_mode=STOP, on_nonconvergence="ignore")

    def ours(method: str, fused: bool = True, graph: bool = False):
        def run():
            if fused:
                z, info = deqkern.solve_fused(cell.step, cell.h0, method=method, graph=graph, **kw)
            else:
                z, info = deqkern.solve(cell.eager, cell.h0, method=method, **kw)
            return z, info["nstep"].max()
        return run

    def theirs(solver: Callable):
        def run():
            z, _, info = solver(cell.eager, cell.h0, max_iter=MAX_ITER, tol=cell.tol, stop_mode=STOP)
            return z, info["nstep"].max()
        return run

    out = {"deqkern-anderson": ours("anderson"), "deqkern-anderson-f": ours("anderson", fused=False)}
    if on_gpu:
        out["deqkern-anderson-graph"] = ours("anderson", graph=True)
    out.update({"deqkern-broyden": ours("broyden"), "deqkern-picard": ours("picard")})
    if anderson_solver is not None:
        out.update({"torchdeq-anderson": theirs(anderson_solver), "torchdeq-broyden": theirs(broyden_solver)})
    return out


def bench_size(n: int, d: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    cell = SlowCell(n, d, dtype, device)
    ref32 = SlowCell(n, d, torch.float32, device)
    with torch.no_grad():
        z_ref, info_ref = deqkern.solve_fused(ref32.step, ref32.h0, max_iter=5000, tol=1e-6, stop_mode=STOP,
                                              on_nonconvergence="ignore")
    contraction = info_ref["contraction"].item()
    bound = 3 * cell.tol / max(1 - contraction, 1e-3)
    rows = []
    for name, run in variants(cell, device.type == "cuda").items():
        row = {"dtype": str(dtype).replace("torch.", ""), "size": f"{n}x{d}", "variant": name,
               "contraction": contraction}
        try:
            with torch.no_grad():
                z, iterations = run()
            residual, dist = cell.residual32(z), ((z.float() - z_ref).norm() / z_ref.norm()).item()
            status = "ok" if residual <= 3 * cell.tol and dist <= bound else (
                f"FAIL (residual {residual:.2e}, distance {dist:.2e} > {bound:.1e})")
            row.update(iterations=int(iterations), residual=residual, status=status)
            if status == "ok" or name.startswith("torchdeq"):  # a failing baseline is still what users pay
                with torch.no_grad():
                    row["ms"] = wall_ms(run, device)
        except (RuntimeError, NotImplementedError) as err:  # e.g. torchdeq's anderson in bf16
            row["status"] = f"error: {str(err).splitlines()[0][:80]}"
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    base, picard = by_name.get(BASELINE[dtype], {}), by_name.get("deqkern-picard", {})
    for r in rows:
        if "ms" in r and "ms" in base:
            r["speedup_vs_torchdeq"] = base["ms"] / r["ms"]
        if r.get("iterations") and picard.get("iterations"):
            r["picard_iter_ratio"] = picard["iterations"] / r["iterations"]
    return rows


def commit_rows(n: int, d: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Bookkeeping kernel, in place vs into a new tensor (CUDA device time per call)."""
    x = torch.randn(n, d, device=device, dtype=dtype)
    h_next = torch.randn(n, d, device=device, dtype=dtype)
    state = RowState.start(n, device)
    out = {}
    for in_place in (True, False):
        out[in_place] = common.time_ms(lambda: loop.commit(x, h_next, None, state, 1e-30, STOP, in_place), device,
                                       graph=True)
    return [{"dtype": str(dtype).replace("torch.", ""), "size": f"{n}x{d}", "in_place_us": out[True] * 1e3,
             "new_tensor_us": out[False] * 1e3, "extra_us": (out[False] - out[True]) * 1e3}]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(ap, DTYPES)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized problems (a smoke run)")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (TINY_SIZES if args.tiny or args.quick else DEFAULT_SIZES)
    dtype_names = [name for name in ("fp32", "bf16") if name in args.dtype]
    rows, skipped = common.sweep(sizes, dtype_names, DTYPES, lambda n, d, dt: bench_size(n, d, dt, device))
    commits = []
    if device.type == "cuda":
        commits, _ = common.sweep(sizes, dtype_names, DTYPES, lambda n, d, dt: commit_rows(n, d, dt, device))
    table = common.markdown_table(
        ["dtype", "N×d", "variant", "status", "ms / solve", "iterations", "× torchdeq", "Picard iters / iters",
         "rel. residual", "contraction"],
        [[r["dtype"], r["size"], r["variant"], r["status"], r.get("ms", "-"), r.get("iterations", "-"),
          r.get("speedup_vs_torchdeq", "-"), r.get("picard_iter_ratio", "-"), r.get("residual", "-"),
          r["contraction"]] for r in rows])
    table += ("\n\n× torchdeq: against torchdeq's anderson (fp32) or broyden (bf16). Wall time per solve of "
              "back-to-back calls, host included.")
    if commits:
        table += "\n\n" + common.markdown_table(
            ["dtype", "N×d", "commit in place (µs)", "commit into new tensor (µs)", "extra per iteration (µs)"],
            [[r["dtype"], r["size"], r["in_place_us"], r["new_tensor_us"], r["extra_us"]] for r in commits])
    if skipped:
        table += f"\n\nSkipped for lack of time: {', '.join(skipped)}"
    payload = {"environment": common.environment(device), "rows": rows, "commit": commits, "skipped": skipped,
               "torchdeq": anderson_solver is not None, "max_iter": MAX_ITER, "damping": DAMPING, "sigma": SIGMA}
    return common.publish(device, "solvers", payload, table, quick=args.tiny or args.quick,
                          out=None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
