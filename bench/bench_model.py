"""Training throughput of the reference model (``deqkern.models.CharLM``): the time-parallel
solve (Jacobi sweeps over time, all tokens at once) against the token loop.

    python bench/bench_model.py [--device cuda|cpu] [--dtype fp32|bf16] [--config tiny|small|gpu]
                                [--steps N] [--inner-iter K ...] [--colors P ...] [--b-tol X ...] [--quick]
    python bench/bench_model.py --scaling [--lengths 256 1024 4096] [--steps N]
    python bench/bench_model.py --coupling [--scales 1 2 4 8 16 32] [--steps N]

Training (the default). Each variant trains a fresh model from the same seed on the same
batches for ``--steps`` steps (default 20: the loss after 20 steps is compared):

    token loop     eager | fused | fused + graph (CUDA only)
    time-parallel  eager | fused | fused with --inner-iter K, --colors P, --b-tol X (a row each)

Recorded per variant: training tokens/s after the first logging interval (which holds
compilation and graph capture), peak memory (CUDA), every step's loss, cell iterations
per row, sweeps per step and cell applications per sweep (forward), and, from one probe
step on the trained model, the adjoint's sweeps and applications. Compared: tokens/s of
the time-parallel fused run over the eager, fused and graphed token loops, its last loss
against the eager token loop's, and the peak-memory ratio. ``--budget-s`` (default 150)
stops a run at the end of the logging interval in which it passes that many seconds.

``--scaling``: seconds per training step at sequence lengths ``--lengths`` with the same
``batch * seq_len`` (the same tokens per step), token loop (fused + graph on CUDA, eager
on a CPU) against time-parallel (fused on CUDA, eager on a CPU); writes ``model_scaling``
results and a plot. ``--coupling``: the strong-coupling study. The memory context's
``hist`` weight is scaled by each of ``--scales`` on a model trained ``--steps`` steps
(0: untrained); per scale: the memory context's RMS over the injection's, forward and
adjoint sweeps, and seconds per forward+backward of both solves.

On a CPU the config defaults to ``tiny`` and only eager variants are timed (one thread);
fused variants run in the Triton interpreter (when ``TRITON_INTERPRET=1``) for 2 steps,
checked against eager, not timed. ``--dtype bf16`` casts the model to bfloat16 and
loosens the solver's ``tol`` (stop mode "max") to ``BF16_TOL``: an iterate of size ~2
moves in steps of 2**-7.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from deqkern import _backend  # noqa: E402
from deqkern.__main__ import forced_backend, fused_available  # noqa: E402
from deqkern.models.charlm import PRESETS, VOCAB, CharLMConfig, batches  # noqa: E402
from deqkern.models.train import train  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_TOL = 2e-2
LOG_EVERY = 5
INTERPRETER_STEPS = 2
RECORDED_LOSSES = 50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(model, cfg: CharLMConfig, device: torch.device, seed: int = 1) -> dict:
    """One forward + backward of ``model`` on a fresh batch: the solve's figures,
    the adjoint's too when it ran time-parallel, and the seconds it took."""
    tokens = next(batches(cfg, seed)).to(device)
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    h_star, info = model.solve(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(model.readout(h_star).float().reshape(-1, VOCAB),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "sweeps": info["sweeps"], "iterations": info["iterations"],
        "b_sweeps": info.get("b_sweeps"), "b_iterations": info.get("b_iterations"),
        "converged": bool(info["converged"].all()), "loss": float(loss.detach()),
        "hist_inj_ratio": float((info["ctx_rms"][0] / info["inj_rms"]).mean()),
    }


def run_variant(cfg: CharLMConfig, backend: str, steps: int, device: torch.device, dtype: torch.dtype,
                seed: int, max_seconds: float | None) -> dict:
    """Train once; throughput, losses, memory and the solver's figures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with forced_backend(backend):
        result = train(cfg, steps=steps, device=device, dtype=dtype, seed=seed, log_every=LOG_EVERY,
                       max_seconds=max_seconds)
        ran = _backend.last_backend()
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        probed = probe(result.model, cfg, device) if not cfg.token_loop else {}
    logs = result.logs
    sweeps = sum(log["sweeps"] for log in logs) / len(logs)
    mean_nstep = sum(log["mean_nstep"] for log in logs) / len(logs)
    return {
        "ran": ran, "steps": len(result.losses), "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds, "peak_memory_mb": peak, "losses": result.losses[:RECORDED_LOSSES],
        "loss_first": result.losses[0], "loss_last": result.losses[-1],
        "mean_nstep": mean_nstep, "max_nstep": max(log["max_nstep"] for log in logs),
        "sweeps_per_step": sweeps, "iterations_per_sweep": mean_nstep / sweeps if sweeps else None,
        "adjoint_sweeps": probed.get("b_sweeps"),
        "adjoint_iterations_per_sweep": (probed["b_iterations"] / probed["b_sweeps"]) if probed else None,
        "unconverged": sum(log["unconverged"] for log in logs),
        "max_contraction": max(log["contraction"] for log in logs),
        "hist_inj_ratio": logs[-1]["hist_inj_ratio"], "logs": logs,
    }


def variants(cfg: CharLMConfig, device: torch.device, dtype: torch.dtype, extra: list[tuple[str, object]]) -> list:
    """(label, backend, config) of every training variant that can run here; ``extra``:
    (field, value) of the additional time-parallel fused rows."""
    fused = fused_available(device, dtype, cfg.d_model)
    loop, parallel = dataclasses.replace(cfg, token_loop=True), dataclasses.replace(cfg, token_loop=False)
    out = [("token loop, eager", "eager", loop), ("time-parallel, eager", "eager", parallel)]
    if fused:
        out += [("token loop, fused", "triton", loop), ("time-parallel, fused", "triton", parallel)]
        out += [(f"time-parallel, fused, {field} {value}", "triton", dataclasses.replace(parallel, **{field: value}))
                for field, value in extra]
    if fused and device.type == "cuda":
        out.append(("token loop, fused + graph", "triton", dataclasses.replace(loop, graph=True)))
    return out


def bench_training(args, cfg: CharLMConfig, device: torch.device, dtype: torch.dtype) -> dict:
    on_gpu = device.type == "cuda"
    runs = {}
    extra = ([("inner_iter", k) for k in args.inner_iter] + [("colors", p) for p in args.colors]
             + [("b_tol", x) for x in args.b_tol])
    for label, backend, run_cfg in variants(cfg, device, dtype, extra):
        interpreted = backend == "triton" and not on_gpu
        steps = min(args.steps, INTERPRETER_STEPS) if interpreted else args.steps
        print(f"training {steps} steps: {label}")
        r = runs[label] = run_variant(run_cfg, backend, steps, device, dtype, args.seed, args.budget_s)
        if interpreted:
            r["tokens_per_s"] = None
        speed = "not timed" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f} tok/s"
        print(f"  {speed}, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, iters/row {r['mean_nstep']:.2f}, "
              f"sweeps {r['sweeps_per_step']:.1f}, adjoint sweeps {r['adjoint_sweeps']}, unconverged {r['unconverged']}")
    comparison = compare(runs, on_gpu)
    headers = ["variant", "ran", "steps", "tokens/s", "peak MiB", "loss first→last", "iters/row", "sweeps/step",
               "iters/sweep", "adjoint sweeps", "adjoint iters/sweep", "unconverged", "max contraction"]
    rows = [[label, r["ran"], r["steps"], r["tokens_per_s"] or "not timed", r["peak_memory_mb"] or "-",
             f"{r['loss_first']:.3f}→{r['loss_last']:.3f}", r["mean_nstep"], r["sweeps_per_step"] or "-",
             r["iterations_per_sweep"] or "-", r["adjoint_sweeps"] or "-", r["adjoint_iterations_per_sweep"] or "-",
             r["unconverged"], r["max_contraction"]] for label, r in runs.items()]
    table = (f"Reference model training ({args.dtype}, batch {cfg.batch} × seq {cfg.seq_len}, {cfg.n_slots} slots, "
             f"d_model {cfg.d_model}, tol {cfg.tol:g} {cfg.stop_mode}); tokens/s after the first logging interval "
             f"({LOG_EVERY} steps). iters/row: cell applications per row (per token in the token loop, batched over "
             f"all tokens time-parallel).\n\n" + common.markdown_table(headers, rows))
    table += "".join(f"\n\n{key}: {value:.3g}" for key, value in comparison.items())
    if not on_gpu:
        table += "\n\n" + common.CPU_NOTE
    return {"config": dataclasses.asdict(cfg), "runs": runs, "comparison": comparison}, table


def compare(runs: dict, on_gpu: bool) -> dict:
    """Speed, loss and memory of the time-parallel fused run (eager where the fused one
    is not timed) against each token loop."""
    timed = {k: r for k, r in runs.items() if r["tokens_per_s"]}
    parallel = timed.get("time-parallel, fused") or timed.get("time-parallel, eager")
    out = {}
    for label, r in runs.items():
        if not label.startswith("token loop"):
            continue
        base = runs.get("time-parallel, fused" if "fused" in label else "time-parallel, eager")
        if base is not None:
            steps = min(len(base["losses"]), len(r["losses"]))
            out[f"time-parallel vs {label}: relative loss difference at step {steps}"] = (
                abs(base["losses"][steps - 1] - r["losses"][steps - 1]) / r["losses"][steps - 1])
        if parallel is not None and r["tokens_per_s"]:
            out[f"time-parallel tokens/s over {label}"] = parallel["tokens_per_s"] / r["tokens_per_s"]
        if on_gpu and parallel is not None:
            out[f"time-parallel peak memory over {label}"] = parallel["peak_memory_mb"] / r["peak_memory_mb"]
    return out


def bench_scaling(args, cfg: CharLMConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per training step against T at a fixed number of tokens per step."""
    on_gpu = device.type == "cuda"
    backend = "triton" if on_gpu and fused_available(device, dtype, cfg.d_model) else "eager"
    tokens = cfg.batch * cfg.seq_len
    rows = []
    for length in args.lengths:
        batch = max(1, tokens // length)
        for label, overrides in (("token loop", dict(token_loop=True, graph=on_gpu)), ("time-parallel", {})):
            run_cfg = dataclasses.replace(cfg, seq_len=length, batch=batch, **overrides)
            with forced_backend(backend):
                result = train(run_cfg, steps=args.steps + 1, device=device, dtype=dtype, seed=args.seed, log_every=1)
            steady = result.logs[1:]  # the first step holds compilation and capture
            rows.append({"method": label, "backend": backend + (" + graph" if overrides.get("graph") else ""),
                         "seq_len": length, "batch": batch,
                         "seconds_per_step": statistics.median(log["seconds"] for log in steady),
                         "sweeps": statistics.mean(log["sweeps"] for log in steady),
                         "loss": result.losses[-1]})
            print(f"T={length:5d} B={batch:3d} {label:14s}: {rows[-1]['seconds_per_step']:.3f} s/step, "
                  f"sweeps {rows[-1]['sweeps']:.1f}")
    headers = ["method", "backend", "T", "B", "s/step", "sweeps/step", "last loss"]
    table = (f"Seconds per training step at {tokens} tokens per step ({args.dtype}, {cfg.n_slots} slots, "
             f"d_model {cfg.d_model}; median of {args.steps} steps after one warm-up step)\n\n"
             + common.markdown_table(headers, [[r["method"], r["backend"], r["seq_len"], r["batch"],
                                                r["seconds_per_step"], r["sweeps"], r["loss"]] for r in rows]))
    where = Path(args.out) if args.out else common.results_dir(device)
    plot_scaling(rows, where / "model_scaling.png", f"{tokens} tokens per step, {args.dtype}")
    return {"config": dataclasses.asdict(cfg), "rows": rows}, table


def plot_scaling(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["seq_len"] for r in mine], [r["seconds_per_step"] for r in mine], marker="o",
                label=f"{method} ({mine[0]['backend']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (batch × T fixed)")
    ax.set_ylabel("seconds per training step")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def bench_coupling(args, cfg: CharLMConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Sweeps against the memory's coupling strength (its ``hist`` weight scaled)."""
    backend = "triton" if fused_available(device, dtype, cfg.d_model) and device.type == "cuda" else "eager"
    rows = []
    with forced_backend(backend):
        model = train(cfg, steps=max(args.steps, 1), device=device, dtype=dtype, seed=args.seed,
                      log_every=max(args.steps, 1)).model if args.steps else None
        if model is None:
            from deqkern.models.charlm import CharLM

            torch.manual_seed(args.seed)
            model = CharLM(cfg).to(device=device, dtype=dtype)
        hist = model.deq.contexts[0].hist.weight
        original = hist.detach().clone()
        for scale in args.scales:
            with torch.no_grad():
                hist.copy_(scale * original)
            row = {"scale": scale}
            for label, token_loop in (("time-parallel", False), ("token loop", True)):
                model.cfg = dataclasses.replace(cfg, token_loop=token_loop)
                probe(model, model.cfg, device)  # warm-up
                result = probe(model, model.cfg, device)
                row.update({f"{label} s": result["seconds"], "hist_inj_ratio": result["hist_inj_ratio"]})
                if not token_loop:
                    row.update(sweeps=result["sweeps"], iterations=result["iterations"], b_sweeps=result["b_sweeps"],
                               b_iterations=result["b_iterations"], converged=result["converged"])
            rows.append(row)
            print(f"hist x{scale:g}: hist/inj {row['hist_inj_ratio']:.3f}, sweeps {row['sweeps']} (adjoint "
                  f"{row['b_sweeps']}), time-parallel {row['time-parallel s']:.3f} s, token loop {row['token loop s']:.3f} s")
    headers = ["hist scale", "hist/inj", "sweeps", "cell iterations", "adjoint sweeps", "adjoint iterations",
               "converged", "time-parallel s", "token loop s"]
    table = (f"Coupling: the memory's hist weight scaled, model trained {args.steps} steps ({backend}, {args.dtype}, "
             f"batch {cfg.batch} × seq {cfg.seq_len}); one forward + backward per row, default sweep "
             f"settings\n\n" + common.markdown_table(headers, [
                 [r["scale"], r["hist_inj_ratio"], r["sweeps"], r["iterations"], r["b_sweeps"], r["b_iterations"],
                  r["converged"], r["time-parallel s"], r["token loop s"]] for r in rows]))
    return {"config": dataclasses.asdict(cfg), "rows": rows}, table


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--config", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, tiny on a CPU")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default 20; --quick 5); --scaling: timed steps (default 3); "
                         "--coupling: training steps before the study (default 0 on CUDA, 60 on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=150.0, help="cap per training run, seconds")
    ap.add_argument("--inner-iter", type=int, nargs="*", default=[], help="extra time-parallel rows, one per value")
    ap.add_argument("--colors", type=int, nargs="*", default=[], help="extra time-parallel rows, one per value")
    ap.add_argument("--b-tol", type=float, nargs="*", default=[], help="extra time-parallel rows, one per value")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default 256 1024 4096 (CPU: 16 32 64)")
    ap.add_argument("--coupling", action="store_true")
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)  # tiny matrices; see deqkern/__main__.py
    cfg = PRESETS[args.config or ("gpu" if on_gpu else "tiny")]()
    if dtype == torch.bfloat16:
        cfg = dataclasses.replace(cfg, tol=BF16_TOL)
    if args.scaling:
        args.steps = args.steps or (1 if args.quick else 3)
        args.lengths = args.lengths or ([256, 1024, 4096] if on_gpu else [16, 32, 64])
        payload, table, stem = *bench_scaling(args, cfg, device, dtype), "model_scaling"
    elif args.coupling:
        args.steps = (0 if on_gpu else 60) if args.steps is None else args.steps
        payload, table, stem = *bench_coupling(args, cfg, device, dtype), "model_coupling"
    else:
        args.steps = args.steps or (5 if args.quick else 20)
        payload, table, stem = *bench_training(args, cfg, device, dtype), "model"
    payload = {"environment": common.environment(device), "dtype": args.dtype, "steps": args.steps, **payload}
    stem += "_bf16" if dtype == torch.bfloat16 else ""
    out = Path(args.out) / f"{stem}.json" if args.out else None
    return common.publish(device, stem, payload, table, quick=args.quick and out is None, out=out)


if __name__ == "__main__":
    main()
