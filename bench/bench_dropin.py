"""Drop-in speedup for an existing torchdeq model: training steps/s, unchanged vs deqkern.

    python bench/bench_dropin.py [--quick] [--device cuda] [--dtype fp32|bf16] [--steps 20] [--rounds 3]

The model is written as torchdeq's docs show -- ``get_deq``, ``apply_norm`` /
``reset_norm``, a ``DEQFunc`` module ``z = RMSNorm(W z + U x)`` with ``nn.RMSNorm`` --
and trained (Adam, cross-entropy on a fixed random task) from the same initial weights
four ways. Gradient: IFT in fp32 (so ``b_solver`` runs too); torchdeq's 1-step gradient
in bf16, because torchdeq's own IFT backward re-runs ``f`` outside autocast on the bf16
state and ``nn.Linear`` then fails on the dtype mismatch, with any solver.

  unchanged       torchdeq as is (``fixed_point_iter`` forward and backward)
  solver          ``deqkern.compat.torchdeq.register()`` + ``f_solver="deqkern",
                  b_solver="deqkern"`` (the only change: two strings)
  patch           ``deqkern.patch(model)`` (nn.RMSNorm -> FusedRMSNorm in place)
  solver+patch    both

Check: every variant's per-step losses equal the unchanged run's to a relative
``1e-3`` (fp32) / ``3e-2`` (bf16: ``torch.autocast``), step by step. Timing: wall time of
each training step (forward, backward, optimizer step; CUDA synchronized), median over
the steps after the first; the variants are trained ``--rounds`` times in turn (u, s, p,
s+p, u, s, ...) and each one's time is the median of its rounds, so a drift of the
machine's speed during the run moves every variant alike (the GPU host's per-op cost
moved by up to 1.6x between back-to-back runs). Losses come from the first round. On a CPU with ``TRITON_INTERPRET=1`` the deqkern variants
run through the Triton interpreter and are checked but not timed (see
``common.CPU_NOTE``); without it they run deqkern's eager path and are timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402

try:
    import torchdeq
    from torchdeq.norm import apply_norm, reset_norm
except ImportError:  # reported in the output, not an error
    torchdeq = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSS_RTOL = {"fp32": 1e-3, "bf16": 3e-2}
VARIANTS = ("unchanged", "solver", "patch", "solver+patch")
# (batch, sequence, input width, model width, classes)
DEFAULT_SHAPE = (64, 32, 128, 256, 10)
QUICK_SHAPE = (8, 8, 16, 32, 4)
DEQ_ARGS = dict(f_max_iter=30, f_tol=1e-5, f_stop_mode="rel", b_max_iter=30, b_tol=1e-6)


class DEQFunc(nn.Module):
    """``z = RMSNorm(W z + U x)``."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.W = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(d_in, d)
        self.norm = nn.RMSNorm(d)
        with torch.no_grad():
            self.W.weight.mul_(0.25)  # start contractive

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.W(z) + self.U(x))


class DEQModel(nn.Module):
    def __init__(self, d_in: int, d: int, n_classes: int, f_solver: str, ift: bool):
        super().__init__()
        self.d = d
        self.func = DEQFunc(d_in, d)
        apply_norm(self.func, "weight_norm")
        self.deq = torchdeq.get_deq(f_solver=f_solver, b_solver=f_solver, ift=ift, **DEQ_ARGS)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reset_norm(self.func)
        z0 = torch.zeros(*x.shape[:-1], self.d, device=x.device)
        z_out, _ = self.deq(lambda z: self.func(z, x), z0)
        return self.head(z_out[-1].mean(1))


def train(variant: str, shape: tuple, device: torch.device, dtype_name: str, steps: int) -> dict:
    batch, seq, d_in, d, n_classes = shape
    torch.manual_seed(0)
    solver = "deqkern" if "solver" in variant else "fixed_point_iter"
    model = DEQModel(d_in, d, n_classes, solver, ift=dtype_name == "fp32").to(device)
    if "patch" in variant:
        deqkern.patch(model)
    gen = torch.Generator().manual_seed(1)
    # Inputs at scale 4: the injection then dominates W z, so the cell stays contractive
    # through training and both solvers converge (at unit scale the fp32 model stopped
    # converging within f_max_iter after ~10 steps, and unconverged iterates are where
    # torchdeq (lowest-residual iterate) and deqkern (last iterate) legitimately differ).
    x = (4.0 * torch.randn(batch, seq, d_in, generator=gen)).to(device)
    y = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, times = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=DTYPES[dtype_name], enabled=dtype_name != "fp32"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step_ms = 1e3 * statistics.median(times[1:] if len(times) > 1 else times)
    uses_deqkern = variant != "unchanged"
    return {"variant": variant, "losses": losses, "step_ms": step_ms,
            "backend": deqkern.last_backend() if "patch" in variant else None, "uses_deqkern": uses_deqkern}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 20, quick 5)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of all variants (default 3, quick 1)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run (< 1 min on a CPU)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        ap.error(f"--rounds must be >= 1; got {rounds}")
    if torchdeq is None:
        raise SystemExit("bench_dropin needs torchdeq: pip install torchdeq")
    from deqkern.compat import torchdeq as compat

    compat.register()
    device = torch.device(args.device)
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    steps = args.steps or (5 if args.quick else 20)
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted:
        print(common.CPU_NOTE)

    runs = [[train(variant, shape, device, args.dtype, steps) for variant in VARIANTS] for _ in range(rounds)]
    rows = runs[0]
    for i, row in enumerate(rows):
        row["round_step_ms"] = [run[i]["step_ms"] for run in runs]
        row["step_ms"] = statistics.median(row["round_step_ms"])
    reference = rows[0]
    for row in rows:
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], reference["losses"]))
        row["max_rel_loss_diff"] = worst
        row["check"] = "ok" if worst <= LOSS_RTOL[args.dtype] else f"FAIL (rel. loss diff {worst:.1e})"
        timed = not (interpreted and row["uses_deqkern"]) and row["check"] == "ok"
        if timed:
            row["steps_per_s"] = 1e3 / row["step_ms"]
            row["speedup_vs_unchanged"] = reference["step_ms"] / row["step_ms"]
        else:
            row["note"] = "not timed (Triton interpreter)" if row["check"] == "ok" else "not timed (check failed)"
            del row["step_ms"]

    batch, seq, d_in, d, n_classes = shape
    payload = {"environment": common.environment(device), "dtype": args.dtype, "steps": steps, "rounds": rounds,
               "shape": {"batch": batch, "seq": seq, "d_in": d_in, "d": d, "classes": n_classes},
               "deq_args": {**DEQ_ARGS, "ift": args.dtype == "fp32"}, "rows": rows}
    headers = ["variant", "check", "max rel. loss diff", "step ms", "steps/s", "× unchanged", "final loss"]
    table_rows = [[r["variant"], r["check"] + (f" ({r['note']})" if "note" in r else ""), f"{r['max_rel_loss_diff']:.1e}",
                   r.get("step_ms", "-"), r.get("steps_per_s", "-"), r.get("speedup_vs_unchanged", "-"),
                   r["losses"][-1]] for r in rows]
    grad = "IFT" if args.dtype == "fp32" else "1-step grad"
    table = (f"torchdeq DEQ z = RMSNorm(W z + U x), weight_norm, {grad}; B={batch} S={seq} d_in={d_in} d={d}; "
             f"{args.dtype}{' (autocast)' if args.dtype != 'fp32' else ''}; {steps} Adam steps; step ms = median "
             f"wall time of a training step after the first, median of {rounds} interleaved rounds.\n\n" + common.markdown_table(headers, table_rows))
    stem = "dropin" + ("" if args.dtype == "fp32" else f"_{args.dtype}")
    common.publish(device, stem, payload, table, quick=args.quick)
    if any(r["check"] != "ok" for r in rows):
        raise SystemExit("bench_dropin: a variant's losses differ from the unchanged model's")
    return payload


def run(quick: bool = True) -> dict:
    """Entry for a suite runner: ``main(["--quick"])`` or the full run."""
    return main(["--quick"] if quick else [])


if __name__ == "__main__":
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    main()
