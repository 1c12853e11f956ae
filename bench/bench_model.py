"""Training throughput of the reference model (``deqkern.models.CharLM``), fused vs eager.

    python bench/bench_model.py [--quick] [--device cuda|cpu] [--dtype fp32|bf16] [--steps N]

Both backends train from the same seed on the same batches for the same steps, in one
process, one after the other (``DEQKERN_BACKEND`` forced per run). Recorded per backend:
training tokens/s after the first logging interval (which holds the Triton compilation),
the loss of every step (the first 50 are written) and the largest difference between the
backends, peak memory (``torch.cuda.max_memory_allocated``), and the convergence
statistics (Picard iterations per token, converged fraction, contraction).

Sizes: the ``gpu`` config on CUDA (batch 32, 8 slots, d_model 512, seq 256), 50 steps by
default (``--quick``: 10); ``--budget-s`` (default 75) caps the eager run, which goes
first, at the end of the logging interval (5 steps) in which it passes that many
seconds, and the fused run then takes exactly as many steps, so the whole benchmark
stays near three minutes on an H100 whatever the per-step cost. The model is
launch-bound at this size (256 rows of 512 per solve), so the per-step cost is mostly
host overhead and is not known before it is measured. Under ``python -m bench`` the
eager run also keeps within 40% of the time left before the run-wide deadline.

On a CPU: the tiny config, eager timed as a smoke test (``--quick``: 20 steps, well
under a minute); the fused kernels only under ``TRITON_INTERPRET=1`` (as ``python -m
bench`` sets it), for their first 2 steps, checked against eager and not timed.

``--dtype bf16`` casts the whole model (parameters and AdamW state) to bfloat16 and,
because a bfloat16 iterate of magnitude ~2 moves in steps of 2**-7, loosens the solver's
``tol`` (stop mode "max") from 1e-4 to ``BF16_TOL``; the default is fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from deqkern import _backend  # noqa: E402
from deqkern.__main__ import forced_backend, fused_available  # noqa: E402
from deqkern.models.charlm import CharLMConfig  # noqa: E402
from deqkern.models.train import train  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_TOL = 2e-2
RECORDED_LOSSES = 50
LOG_EVERY = 5
INTERPRETER_STEPS = 2


def time_budget(budget_s: float) -> float:
    """Seconds the eager run may take: ``--budget-s``, and at most 40% of what is left
    before the run-wide deadline of ``python -m bench`` (the fused run takes as many
    steps, and is not slower)."""
    deadline = os.environ.get("DEQKERN_BENCH_DEADLINE")
    if deadline is None:
        return budget_s
    return max(5.0, min(budget_s, 0.4 * (float(deadline) - time.time())))


def run_backend(cfg: CharLMConfig, backend: str, steps: int, device: torch.device, dtype: torch.dtype,
                seed: int, max_seconds: float | None = None) -> dict:
    """Train once on ``backend``; throughput, losses, memory and convergence."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with forced_backend(backend):
        result = train(cfg, steps=steps, device=device, dtype=dtype, seed=seed, log_every=LOG_EVERY,
                       max_seconds=max_seconds)
        ran = _backend.last_backend()
    logs = result.logs
    steps = len(result.losses)
    rows = steps * cfg.batch * cfg.seq_len * cfg.n_slots
    unconverged = sum(log["unconverged"] for log in logs)
    return {
        "backend": backend,
        "ran": ran,
        "steps": steps,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "losses": result.losses[:RECORDED_LOSSES],
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "mean_nstep": sum(log["mean_nstep"] for log in logs) / len(logs),
        "max_nstep": max(log["max_nstep"] for log in logs),
        "converged_fraction": 1.0 - unconverged / rows,
        "max_contraction": max(log["contraction"] for log in logs),
        "logs": logs,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=75.0,
                    help="stop the first (eager) run after the interval that passes this many seconds; "
                         "the fused run then takes as many steps")
    ap.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)  # tiny matrices; see deqkern/__main__.py
    cfg = CharLMConfig.gpu() if on_gpu else CharLMConfig.tiny()
    if dtype == torch.bfloat16:
        cfg = dataclasses.replace(cfg, tol=BF16_TOL)
    steps = args.steps or (10 if on_gpu and args.quick else 50 if on_gpu else 20 if args.quick else 40)
    backends = ["eager"] + (["triton"] if fused_available(device, dtype, cfg.d_model) else [])
    if backends == ["eager"]:
        print(f"{device}: the fused kernels cannot run here; timing eager only.")
    elif not on_gpu:
        print(f"{device}: {common.CPU_NOTE} (fused: the first {INTERPRETER_STEPS} steps, compared with eager)")

    variants = [(b, b, cfg) for b in backends]
    if on_gpu and "triton" in backends:  # the fused path with its solves replayed from CUDA graphs
        variants.append(("triton+graph", "triton", dataclasses.replace(cfg, graph=True)))
    runs = {}
    for label, backend, run_cfg in variants:
        interpreted = backend == "triton" and not on_gpu
        run_steps = min(steps, INTERPRETER_STEPS) if interpreted else steps
        print(f"training {run_steps} steps, {label}, {run_cfg}")
        budget = time_budget(args.budget_s) if backend == "eager" else None
        r = runs[label] = run_backend(run_cfg, backend, run_steps, device, dtype, args.seed, budget)
        r["backend"] = label
        if r["steps"] < run_steps:
            print(f"  stopped after {r['steps']} steps (time budget {budget:.0f} s)")
            steps = r["steps"]
        if interpreted:
            r["tokens_per_s"] = None
        speed = "not timed" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f} tok/s"
        print(f"  {speed}, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, iters mean {r['mean_nstep']:.2f} "
              f"max {r['max_nstep']}, converged {100 * r['converged_fraction']:.2f}%")
    comparison = {}
    if "triton" in runs:
        eager, fused = runs["eager"], runs["triton"]
        compared = min(len(eager["losses"]), len(fused["losses"]))
        comparison["loss_steps_compared"] = compared
        comparison["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(eager["losses"], fused["losses"]))
        if on_gpu:
            comparison["speedup_tokens_per_s"] = fused["tokens_per_s"] / eager["tokens_per_s"]
            comparison["peak_memory_ratio"] = fused["peak_memory_mb"] / eager["peak_memory_mb"]
        if "triton+graph" in runs:
            graphed = runs["triton+graph"]
            comparison["graph_max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(eager["losses"], graphed["losses"]))
            comparison["graph_speedup_tokens_per_s"] = graphed["tokens_per_s"] / eager["tokens_per_s"]
            comparison["graph_peak_memory_ratio"] = graphed["peak_memory_mb"] / eager["peak_memory_mb"]

    payload = {"environment": common.environment(device), "config": dataclasses.asdict(cfg), "steps": steps,
               "dtype": args.dtype, "runs": runs, "comparison": comparison}
    headers = ["backend", "ran", "tokens/s", "peak MiB", "loss first→last", "mean iters", "max iters",
               "converged", "max contraction"]
    rows = [[r["backend"], r["ran"], r["tokens_per_s"] or "not timed", r["peak_memory_mb"] if on_gpu else "-",
             f"{r['loss_first']:.3f}→{r['loss_last']:.3f}", r["mean_nstep"], r["max_nstep"],
             f"{100 * r['converged_fraction']:.2f}%", r["max_contraction"]] for r in runs.values()]
    table = (f"Reference model training ({args.dtype}, {steps} steps, batch {cfg.batch} × seq {cfg.seq_len}, "
             f"{cfg.n_slots} slots, d_model {cfg.d_model}, tol {cfg.tol:g} {cfg.stop_mode}); tokens/s after the "
             f"first logging interval ({LOG_EVERY} steps, holds compilation).\n\n"
             + common.markdown_table(headers, rows))
    if comparison:
        table += (f"\n\nlargest |loss difference| fused vs eager over the first {comparison['loss_steps_compared']} "
                  f"steps: {comparison['max_abs_loss_diff']:.2e}")
        if on_gpu:
            table += (f"; fused / eager tokens/s: {comparison['speedup_tokens_per_s']:.2f}×; peak memory fused / "
                      f"eager: {comparison['peak_memory_ratio']:.2f}")
        if "graph_speedup_tokens_per_s" in comparison:
            table += (f"\n\nfused with graph=True: tokens/s {comparison['graph_speedup_tokens_per_s']:.2f}× eager; "
                      f"largest |loss difference| vs eager {comparison['graph_max_abs_loss_diff']:.2e}; peak memory "
                      f"{comparison['graph_peak_memory_ratio']:.2f}× eager")
    if not on_gpu:
        table += "\n\n" + common.CPU_NOTE
    stem = "model" + ("_bf16" if dtype == torch.bfloat16 else "")
    return common.publish(device, stem, payload, table, quick=args.quick)


if __name__ == "__main__":
    main()
