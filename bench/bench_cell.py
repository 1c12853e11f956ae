"""deqkern.solve_cell (one persistent launch per solve) vs the loop path and hand-written loops.

    python bench/bench_cell.py [--out DIR] [--sizes bf16:256x512 ...] [--rounds 7] [--calls 50] [--tiny]

Wall time per call over back-to-back calls: ``calls`` calls between two synchronizations,
host included; the median of ``rounds`` such rounds, the rounds of a size's variants taken
in turn (every variant is checked first, then timed round by round), so that the host's
drift during a run reaches each variant alike. Problem: the cell
``h <- (1-b) h + b * g * RMSNorm(h W^T + frozen)``, b = 0.85, ||W||_2 = 0.5, h0 = 0, frozen and
the loss cotangent ~ N(0, 1): 5 iterations to rel. tol 2e-2 in bf16, 10 to 1e-4 in fp32.

Forward (no grad):
  eager-item     hand-written loop, eager cell, ``.item()`` check of the max rel. residual each iteration
  eager-graph    eager-item's K iterations (K = its count) in one CUDA graph; h0 copied in per call
  compile-ro     ``torch.compile(mode="reduce-overhead")`` of the fixed K-iteration loop
  loop           ``deqkern.solve_fused`` with the GEMM + fused update step (as FrozenContextDEQ)
  loop-graph     the same with ``graph=True`` (``max_iter`` iterations, on_nonconvergence="ignore")
  cell           ``deqkern.solve_cell``, the persistent kernel forced, on_nonconvergence="ignore"
                 (the cluster kernel, else the split one where the size takes it: the note says which)
  cell-split     the same with the Triton kernels only (sizes that take the cluster kernel)
  cell-block     the same with the whole-row block kernel forced (sizes that take the split one)
  cell-warn      the same with the default "warn" (one host sync per call)
  cell-auto      ``solve_cell`` as its size heuristic chooses (the backend it ran is in the note)
Adjoint (the backward of ``sum(h* . v)``: the adjoint solve and the parameter gradients):
  eager-item, eager-graph, compile-ro: ``g <- v + J^T g`` written out in torch (as the
  forward's), then ``dz = VJP(g)``, ``dW = dz^T h*``, ``dgain``; loop / loop-graph:
  ``solve_fused`` IFT with the layer's fused adjoint (``deqkern.nn.cell_adjoint``); cell,
  cell-warn, cell-auto: solve_cell's. The solve_fused and solve_cell rows time
  ``torch.autograd.grad(h*, params, v, retain_graph=True)`` after one forward.
  cell-body      solve_cell's backward body (the one-launch adjoint solve and the parameter
                 gradients) called directly: compile-ro's work without the autograd engine
                 (the note says which adjoint kernel ran)
  cell-body-split  the same with the Triton kernels only (sizes whose adjoint takes the cluster kernel)
max_iter study (first size): cell and loop-graph at max_iter 20 and 5 for the same problem.

Checks before timing (a FAIL row is not timed): h* against eager-item's (rel. Frobenius
<= 5 tol), gradients against the eager adjoint run to convergence (<= 10 tol). compile-ro
runs only where rows * d <= 2**20 (the launch-bound sizes its targets are about).
``--tiny``: small sizes on any device; on a CPU the kernels run through the Triton
interpreter and are checked, not timed, and no CUDA-graph / compile variants run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from deqkern.functional import update_with_stats  # noqa: E402
from deqkern.nn import cell_adjoint  # noqa: E402
from deqkern.ops import persistent_cluster, persistent_split  # noqa: E402
from deqkern.solver import cell as cell_mod  # noqa: E402
from deqkern.solver import solve_fused  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
DEFAULT_SIZES = ["bf16:256x512", "fp32:256x512", "bf16:1024x1024", "bf16:8192x1024", "bf16:32768x512"]
TINY_SIZES = ["bf16:32x64", "fp32:24x40"]
DAMPING, SIGMA, EPS, MAX_ITER = 0.85, 0.5, 1e-6, 20
COMPILE_MAX_ELEMENTS = 2**20
#: Variants timed on a CPU (the interpreter is a correctness tool, not a speed baseline).
CPU_TIMED = {"eager-item"}


class Problem:
    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen)
        self.w = (SIGMA * w / torch.linalg.matrix_norm(w, 2)).to(device=device, dtype=dtype).requires_grad_()
        self.frozen = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        self.gain = (1 + 0.1 * torch.randn(d, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
        self.v = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
        self.h0 = torch.zeros(n, d, device=device, dtype=dtype)
        self.params = [self.w, self.frozen, self.gain]
        self.tol, self.dtype = TOL[dtype], dtype

    def eager(self, h: torch.Tensor) -> torch.Tensor:
        """The cell as a user writes it (float32 normalization, storage dtype in and out)."""
        z = (F.linear(h, self.w) + self.frozen).float()
        y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * self.gain.float()
        return ((1 - DAMPING) * h.float() + DAMPING * y).to(h.dtype)

    def step(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_next, residual, _ = update_with_stats(F.linear(h, self.w), self.frozen, h, self.gain, eps=EPS,
                                                damping=DAMPING)
        return h_next, residual

    def solve_cell(self, **kw):
        return deqkern.solve_cell(self.w, self.frozen, self.gain, self.h0, damping=DAMPING, eps=EPS, tol=self.tol,
                                  **{"max_iter": MAX_ITER, **kw})

    def solve_fused(self, graph: bool, **kw):
        adjoint = cell_adjoint(self.w, self.gain, self.frozen, damping=DAMPING, eps=EPS)
        return solve_fused(self.step, self.h0, adjoint=adjoint, tol=self.tol, graph=graph,
                           **{"max_iter": MAX_ITER, "on_nonconvergence": "ignore" if graph else "warn", **kw})


def rel_residual(h_next: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (h_next.float() - h.float()).norm(dim=-1) / (h_next.float().norm(dim=-1) + 1e-30)


def eager_forward(p: Problem, iterations: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """``iterations=None``: to tol with an ``.item()`` check each iteration; else exactly that many."""
    h = p.h0
    for k in range(1, (iterations or MAX_ITER) + 1):
        h_next = p.eager(h)
        done = iterations is None and rel_residual(h_next, h).max().item() < p.tol
        h = h_next
        if done:
            break
    return h, k


def eager_adjoint(p: Problem, h_star: torch.Tensor, iterations: Optional[int] = None, tol: Optional[float] = None):
    """``g = v + J^T g`` by the explicit formula (float32 g, dz in the storage dtype), then
    the parameter gradients; ``iterations=None``: to ``tol`` with an ``.item()`` check."""
    w, gain = p.w.detach(), p.gain.detach().float()
    z = (F.linear(h_star, w) + p.frozen.detach()).float()
    rstd = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS)
    n = z * rstd

    def vjp(g: torch.Tensor) -> torch.Tensor:
        dyg = DAMPING * g * gain
        return rstd * (dyg - n * (dyg * n).mean(-1, keepdim=True))

    v = p.v.float()
    g = v
    for k in range(1, (iterations or MAX_ITER) + 1):
        g_next = v + (1 - DAMPING) * g + (vjp(g).to(w.dtype) @ w).float()
        done = iterations is None and rel_residual(g_next, g).max().item() < (tol or p.tol)
        g = g_next
        if done:
            break
    dz = vjp(g)
    grads = [dz.to(w.dtype).t() @ h_star, dz.to(w.dtype), (DAMPING * g * n).sum(0).to(w.dtype)]
    return grads, k


def backward_alone(p: Problem, solve: Callable[[], tuple[torch.Tensor, dict]]) -> Callable[[], list[torch.Tensor]]:
    """The backward alone: one forward by ``solve`` (at the first call), then repeated
    backwards of ``sum(h* . v)`` to ``p``'s parameters."""
    solved: list = []

    def grads() -> list[torch.Tensor]:
        if not solved:
            solved.append(solve()[0])
        return list(torch.autograd.grad(solved[0], p.params, p.v, retain_graph=True))

    return grads


def backward_body(p: Problem) -> Callable[[], list[torch.Tensor]]:
    """solve_cell's backward body called directly, without the autograd engine: the
    adjoint solve (one launch) and the parameter gradients, with the settings solve_cell
    derives for ``p`` (``b_max_iter``, ``b_tol``) and no host read: the work compile-ro's
    function does, so that the two compare like for like."""
    with torch.no_grad():
        h_star = p.solve_cell(on_nonconvergence="ignore")[0]
    w, frozen, gain = (t.detach() for t in p.params)
    s = cell_mod._plan(w, frozen, gain, p.h0, (EPS, DAMPING, MAX_ITER, p.tol, "rel", "ift", None, None, "ignore"))

    def grads() -> list[torch.Tensor]:
        out = cell_mod._run_adjoint(w, frozen, gain, h_star, p.v, s.eps, s.damping, s.b_max_iter, s.b_tol)
        return list(cell_mod._param_grads(out.dz, out, h_star, frozen, gain, (True, True, True)))

    return grads


def captured(fn: Callable[[], object]) -> Callable[[], object]:
    """A replay of ``fn`` (fixed work, static inputs) recorded in a CUDA graph at its first
    call (so that a failing capture is reported as its variant's error)."""
    recorded: list = []

    def replay():
        if not recorded:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            recorded.extend((graph, out))
        recorded[0].replay()
        return recorded[1]

    return replay


class Persistent:
    """Within the block, solve_cell takes the persistent kernel whatever the size, and
    ``kernel`` ("auto", "block", "split") picks which one (deqkern.ops.persistent_split.KERNEL;
    "split" and "block" never take the cluster kernel)."""

    def __init__(self, kernel: str = "auto"):
        self.kernel = kernel

    def __enter__(self):
        self.saved = _choice()
        _set_choice((2**62,) * len(_LIMITS) + (self.kernel,))

    def __exit__(self, *exc):
        _set_choice(self.saved)


#: solve_cell's size limits (deqkern.solver.cell), all lifted inside a Persistent block.
_LIMITS = ("PERSISTENT_MAX_ELEMENTS", "PERSISTENT_MAX_MACS", "PERSISTENT_MAX_MACS_32", "PERSISTENT_MAX_D",
           "PERSISTENT_BLOCK_MAX_D")


def _choice() -> tuple:
    """The kernel choice in force: solve_cell's size limits and the one-launch kernel."""
    return tuple(getattr(cell_mod, name) for name in _LIMITS) + (persistent_split.KERNEL,)


def _set_choice(choice: tuple) -> None:
    for name, value in zip(_LIMITS, choice):
        setattr(cell_mod, name, value)
    persistent_split.KERNEL = choice[-1]


def pinned(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` under the kernel choice in force now (a :class:`Persistent` block or none):
    variants are timed after every variant is checked, outside their blocks, so each call
    puts the choice back (the limits' and the kernel's attribute writes) and restores the one it found."""
    choice = _choice()

    def call():
        saved = _choice()
        _set_choice(choice)
        try:
            return fn()
        finally:
            _set_choice(saved)

    return call


def kernel_note(p: "Problem") -> str:
    """Which one-launch kernel the size takes, with the cluster shape or split tile."""
    n, d = p.h0.shape
    config = persistent_cluster.cluster_for(p.w, p.frozen, p.gain, p.h0)
    if config is not None:
        return f"cluster kernel, {config[0]} CTAs x {config[1]} rows"
    if not persistent_split.use_split(n, d, p.h0):
        return "block kernel"
    c = persistent_split.config_of(n, d, p.h0)
    return f"split kernel {c['BLOCK_M']}x{c['BLOCK_N']}, {c['SPLIT']} per group"


# --------------------------------------------------------------------------- one size
def bench_size(spec: str, device: torch.device, calls: int, rounds: int, max_iter_study: bool) -> list[dict]:
    name, size = spec.split(":")
    n, d = (int(x) for x in size.lower().split("x"))
    dtype = DTYPES[name]
    p = Problem(n, d, dtype, device)
    on_gpu = device.type == "cuda"
    use_compile = on_gpu and n * d <= COMPILE_MAX_ELEMENTS
    rows: list[dict] = []
    base = {"dtype": name, "n": n, "d": d}

    def guarded(phase: str, variant: str, body: Callable[[], None]) -> None:
        """One failing variant (a capture, a compile) must not cost the rest of the run."""
        try:
            body()
        except Exception as err:  # noqa: BLE001  (reported in the table)
            rows.append({**base, "phase": phase, "variant": variant, "iterations": None, "note": "",
                         "check": f"ERROR ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"})
            print(f"  {name} {n}x{d} {phase:8s} {variant:14s} {rows[-1]['check']}", flush=True)

    timed: dict = {}  # row index -> the call to time, once every variant of the size is checked

    def record(phase: str, variant: str, status: str, fn: Optional[Callable], iterations=None, note: str = ""):
        row = {**base, "phase": phase, "variant": variant, "check": status, "iterations": iterations, "note": note}
        if status == "ok" and fn is not None and (on_gpu or variant in CPU_TIMED):
            timed[len(rows)] = pinned(fn)
        elif status == "ok":
            row["note"] = (note + "; " if note else "") + "checked, not timed (CPU)"
        rows.append(row)
        print(f"  {name} {n}x{d} {phase:8s} {variant:14s} {status:6s}", flush=True)

    with torch.no_grad():
        h_ref, k_ref = eager_forward(p)
    grads_ref, _ = eager_adjoint(p, h_ref, tol=p.tol / 100)
    _, kb_ref = eager_adjoint(p, h_ref)

    # ---------------- forward
    def forward(variant: str, run: Callable[[], tuple[torch.Tensor, object]]):
        """``run() -> (h*, iterations or info)``; info is read only here, after the check
        call: solve_cell's info is computed on first use, which a timed call must not do."""
        def body():
            with torch.no_grad():
                h, iterations = run()
            if isinstance(iterations, dict):
                iterations = iterations["iterations"]
            note = f"backend {deqkern.last_backend()}" if variant == "cell-auto" else ""
            if variant in ("cell", "cell-split", "cell-block"):
                note = kernel_note(p) if variant != "cell-block" else "block kernel"

            def timed():
                with torch.no_grad():
                    run()

            record("forward", variant, common.check_close("h*", h, h_ref, 5 * p.tol), timed,
                   int(iterations) if iterations is not None else None, note)

        guarded("forward", variant, body)

    forward("eager-item", lambda: eager_forward(p))
    if on_gpu:
        static_h0 = p.h0.clone()
        replay = captured(lambda: fixed_forward(p, static_h0, k_ref))

        def graph_forward() -> tuple[torch.Tensor, int]:
            static_h0.copy_(p.h0)
            return replay(), k_ref

        forward("eager-graph", graph_forward)
        if use_compile:
            compiled = compile_ro(lambda h0: fixed_forward(p, h0, k_ref))
            forward("compile-ro", lambda: (compiled(p.h0), k_ref))
    forward("loop", lambda: p.solve_fused(False))
    if on_gpu:
        forward("loop-graph", lambda: (p.solve_fused(True)[0], MAX_ITER))
    with Persistent():
        forward("cell", lambda: p.solve_cell(on_nonconvergence="ignore"))
        forward("cell-warn", lambda: p.solve_cell())
    if persistent_cluster.cluster_for(p.w, p.frozen, p.gain, p.h0) is not None:
        with Persistent("split"):
            forward("cell-split", lambda: p.solve_cell(on_nonconvergence="ignore"))
    split = persistent_split.use_split(n, d, p.h0)
    if split:
        with Persistent("block"):
            forward("cell-block", lambda: p.solve_cell(on_nonconvergence="ignore"))
    forward("cell-auto", lambda: p.solve_cell())

    # ---------------- adjoint (backward)
    def adjoint(variant: str, grads_fn: Callable[[], list[torch.Tensor]], iterations=None):
        def body():
            status = "ok"
            for label, got, ref in zip(("dW", "dfrozen", "dgain"), grads_fn(), grads_ref):
                if status == "ok":
                    status = common.check_close(label, got, ref, max(10 * p.tol, 1e-3))
            note = f"backend {deqkern.last_backend()}" if variant.startswith("cell-body") else ""
            record("adjoint", variant, status, grads_fn, iterations, note)

        guarded("adjoint", variant, body)

    adjoint("eager-item", lambda: eager_adjoint(p, h_ref)[0], kb_ref)
    if on_gpu:
        replay_b = captured(lambda: eager_adjoint(p, h_ref, kb_ref)[0])
        adjoint("eager-graph", replay_b, kb_ref)
        if use_compile:
            compiled_b = compile_ro(lambda h: eager_adjoint(p, h, kb_ref)[0])
            adjoint("compile-ro", lambda: compiled_b(h_ref), kb_ref)

    adjoint("loop", backward_alone(p, lambda: p.solve_fused(False)))
    if on_gpu:
        adjoint("loop-graph", backward_alone(p, lambda: p.solve_fused(True)))
    with Persistent():
        adjoint("cell", backward_alone(p, lambda: p.solve_cell(on_nonconvergence="ignore")))
        adjoint("cell-warn", backward_alone(p, lambda: p.solve_cell()))
        adjoint("cell-body", backward_body(p))
    if persistent_cluster.adjoint_for(p.w, p.frozen, p.gain, h_ref) is not None:
        with Persistent("split"):
            adjoint("cell-body-split", backward_body(p))
    if split:
        with Persistent("block"):
            adjoint("cell-block", backward_alone(p, lambda: p.solve_cell(on_nonconvergence="ignore")))
    adjoint("cell-auto", backward_alone(p, lambda: p.solve_cell()))

    if max_iter_study:
        with Persistent():
            for max_iter in (20, 5):
                forward(f"cell-max{max_iter}", lambda m=max_iter: p.solve_cell(max_iter=m, on_nonconvergence="ignore"))
        if on_gpu:
            for max_iter in (20, 5):
                forward(f"loop-graph-max{max_iter}", lambda m=max_iter: (p.solve_fused(True, max_iter=m)[0], m))

    # every variant's rounds in turn: the host's drift during the size's run reaches them alike
    for index, samples in common.interleaved_wall_ms(timed, device, rounds=rounds, calls=calls).items():
        rows[index]["ms"] = statistics.median(samples)
        rows[index]["round_ms"] = samples
        row = rows[index]
        print(f"  {name} {n}x{d} {row['phase']:8s} {row['variant']:14s} {row['ms']:.4f} ms", flush=True)
    return rows


def fixed_forward(p: Problem, h0: torch.Tensor, iterations: int) -> torch.Tensor:
    h = h0
    for _ in range(iterations):
        h = p.eager(h)
    return h


def compile_ro(fn: Callable) -> Callable:
    """``torch.compile(fn, mode="reduce-overhead")`` from a fresh Dynamo cache (see common.fresh_compile)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)


# --------------------------------------------------------------------------- report
#: (phase, variant, baseline, goal) of issue 14, per size ("*": every size).
TARGETS = [
    ("bf16:256x512", "forward", "cell", "compile-ro", 2.0),
    ("bf16:256x512", "forward", "cell", "eager-item", 30.0),
    ("fp32:256x512", "forward", "cell", "compile-ro", 2.0),
    ("bf16:1024x1024", "forward", "cell", "compile-ro", 2.0),
    ("bf16:256x512", "adjoint", "cell", "compile-ro", 2.0),
    ("fp32:256x512", "adjoint", "cell", "compile-ro", 2.0),
    ("bf16:1024x1024", "adjoint", "cell", "compile-ro", 2.0),
    ("bf16:256x512", "adjoint", "cell-body", "compile-ro", 2.0),  # like for like: no autograd engine
    ("fp32:256x512", "adjoint", "cell-body", "compile-ro", 2.0),
    ("bf16:1024x1024", "adjoint", "cell-body", "compile-ro", 2.0),
    ("*", "forward", "cell-auto", "loop", 1.0),
    ("*", "forward", "cell-auto", "loop-graph", 1.0),
    ("*", "adjoint", "cell-auto", "loop", 1.0),
    ("*", "adjoint", "cell-auto", "loop-graph", 1.0),
    ("*", "forward", "cell-max20", "cell-max5", 0.9),  # early exit: max_iter 20 costs what 5 does
]


def targets(rows: list[dict]) -> list[list[object]]:
    by = {(r["dtype"], r["n"], r["d"], r["phase"], r["variant"]): r for r in rows}
    out = []
    for dtype, n, d in sorted({(r["dtype"], r["n"], r["d"]) for r in rows}):
        for size, phase, variant, baseline, goal in TARGETS:
            if size not in ("*", f"{dtype}:{n}x{d}"):
                continue
            a, b = by.get((dtype, n, d, phase, variant)), by.get((dtype, n, d, phase, baseline))
            if not a or not b:
                continue
            ratio = b["ms"] / a["ms"] if "ms" in a and "ms" in b else None
            verdict = "n/a" if ratio is None else ("PASS" if ratio >= goal else "MISS")
            out.append([dtype, f"{n}×{d}", phase, f"{variant} vs {baseline}", f">= {goal:g}×",
                        "-" if ratio is None else f"{ratio:.2f}×", verdict])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=None, help="dtype:NxD, e.g. bf16:256x512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=50, help="back-to-back calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="small sizes, few rounds: a smoke run (CPU too)")
    ap.add_argument("--out", default=None, help="directory for cell.json and cell.md "
                    "(default bench/results/<device>/)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (TINY_SIZES if args.tiny else DEFAULT_SIZES)
    calls, rounds = (3, 2) if args.tiny else (args.calls, args.rounds)
    rows = []
    for i, spec in enumerate(sizes):
        new = bench_size(spec, device, calls, rounds, max_iter_study=i == 0)
        for row in new:  # as it goes: a run cut short by its time limit keeps what it measured
            print("row", json.dumps(row, default=str), flush=True)
        rows.extend(new)
    notes = [f"damping={DAMPING}, ||W||₂={SIGMA}, h0=0, max_iter={MAX_ITER}, tol: "
             + ", ".join(f"{k} {TOL[v]:g}" for k, v in DTYPES.items())
             + f"; {calls} back-to-back calls per round, median of {rounds} rounds taken in turn"
             + " across a size's variants (host included)."
             + f" Heuristic: persistent when rows*d <= {cell_mod.PERSISTENT_MAX_ELEMENTS}, rows*d*d <= "
             + f"{cell_mod.PERSISTENT_MAX_MACS} ({cell_mod.PERSISTENT_MAX_MACS_32} for fp32) and d <= "
             + f"{cell_mod.PERSISTENT_MAX_D} (d <= {cell_mod.PERSISTENT_BLOCK_MAX_D} where the split kernel"
             + " does not take the size)."]
    if device.type != "cuda":
        notes.append("CPU run: only eager-item is timed (a smoke test); deqkern variants run through the "
                     "Triton interpreter and are checked, not timed; no CUDA-graph or compile variants.")
    payload = {"environment": common.environment(device), "notes": notes, "rows": rows, "targets": targets(rows),
               "persistent_max_elements": cell_mod.PERSISTENT_MAX_ELEMENTS,
               "persistent_max_macs": cell_mod.PERSISTENT_MAX_MACS,
               "persistent_max_macs_32": cell_mod.PERSISTENT_MAX_MACS_32,
               "persistent_block_max_d": cell_mod.PERSISTENT_BLOCK_MAX_D,
               "persistent_max_d": cell_mod.PERSISTENT_MAX_D}
    table = "\n".join(f"> {note}" for note in notes) + "\n\n" + common.markdown_table(
        ["dtype", "N×d", "phase", "variant", "check", "iters", "ms / call", "note"],
        [[r["dtype"], f"{r['n']}×{r['d']}", r["phase"], r["variant"], r["check"],
          r["iterations"] if r["iterations"] is not None else "-", r.get("ms", "-"), r["note"]] for r in rows])
    table += "\n\nTargets (issue 14)\n\n" + common.markdown_table(
        ["dtype", "N×d", "phase", "comparison", "goal", "measured", "verdict"], payload["targets"])
    out = Path(args.out) / "cell.json" if args.out else None
    return common.publish(device, "cell", payload, table, quick=args.tiny and out is None, out=out)


if __name__ == "__main__":
    main()
