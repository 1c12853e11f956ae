"""Data-parallel scaling of the reference model: N GPUs (DDP, FSDP2) against one.

    python bench/bench_distributed.py [--out DIR] [--nproc 2] [--per-gpu-batch 32] [--steps 20]
                                      [--sweep 8 16] [--train-args "--graph"] [--budget-s 540]
    python bench/bench_distributed.py --device cpu     # gloo, tiny config: a smoke run of the plumbing

Every run is a fresh process launched as a user launches it (the commands are recorded):

  ddp          torchrun --standalone --nproc_per_node=N -m deqkern --config gpu --batch N*b
  one-gpu      python -m deqkern --config gpu --batch b       tokens/s at the same per-GPU batch b
  one-gpu-big  python -m deqkern --config gpu --batch N*b     the losses the N-GPU runs must give
  fsdp         as ddp, with --fsdp
  sweep-<b>    python -m deqkern --batch b, for b in --sweep: step time against batch
  allreduce    torchrun ... this script --allreduce-worker: all-reduce of the gradient's bytes

Targets: ``ddp`` and ``fsdp`` tokens/s >= 1.8 x ``one-gpu`` (N = 2); their loss at every
step (the 20th included) within 1e-3 relative of ``one-gpu-big``'s.

Model of a step (docs/distributed.md): one GPU takes ``t(b) = t0 + b * t1`` seconds at
batch b (``t0``: the per-step cost that does not shrink with the batch, mostly kernel
launches of the token loop; fitted over the 1-GPU runs); data parallel adds the
all-reduce of the fp32 gradients, ``t_ar(N) = 2 (N-1)/N * 4P / busbw`` (P parameters;
not overlapped with compute: every parameter is used by every token, so its gradient is
final only when the backward reaches the first token). Strong scaling (a fixed global
batch B split over N GPUs) keeps 90% efficiency while the per-GPU batch is at least
``b* = (9 - 10/N) t0/t1 + 9 t_ar(N)/t1``. The results give t0, t1, t_ar and b*.

Runs go in order of importance and each gets at most what is left of ``--budget-s``;
a run that fails or times out is reported, not fatal. NCCL settings of the machine
(``NCCL_NVLS_ENABLE``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST``) are kept (set to 0 / 1 if
absent); ``--standalone`` gives every torchrun its own free port.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEEDUP_TARGET = 1.8
LOSS_RTOL = 1e-3
EFFICIENCY = 0.9


# --------------------------------------------------------------------------- launching
def launch_env(device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("NCCL_NVLS_ENABLE", "0")                 # no NVLink multicast (see the device notes)
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if device == "cpu":
        env.pop("TRITON_INTERPRET", None)  # the CPU smoke run trains eagerly
    return env


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def shown(argv: list[str]) -> str:
    """The command as a user types it."""
    text = shlex.join(argv).replace(f"{sys.executable} -m torch.distributed.run", "torchrun")
    return text.replace(sys.executable, "python")


def run(name: str, argv: list[str], env: dict, timeout: float, logs: Path) -> dict:
    """Run ``argv`` in its own process group; kill the group past ``timeout``."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    print(f"[{name}] {shown(argv)}", flush=True)
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = "timeout"
    seconds = time.perf_counter() - start
    stderr = err_path.read_text(errors="replace")
    record = {"command": shown(argv), "returncode": returncode, "seconds": round(seconds, 1),
              "graph_recaptures": stderr.count("recapturing")}
    if returncode != 0:
        record["stderr_tail"] = stderr[-3000:]
    print(f"[{name}] exit {returncode} after {seconds:.0f} s", flush=True)
    return record


def train_run(name: str, launcher: list[str], args: argparse.Namespace, batch: int, steps: int, env: dict,
              timeout: float, out: Path, fsdp: bool = False) -> dict:
    metrics = out / "distributed_logs" / f"{name}.json"
    argv = [*launcher, "-m", "deqkern", "--config", args.config, "--device", args.device, "--batch", str(batch),
            "--steps", str(steps), "--log-every", str(args.log_every), "--seed", "0", "--metrics", str(metrics),
            *(["--fsdp"] if fsdp else []), *shlex.split(args.train_args)]
    record = run(name, argv, env, timeout, out / "distributed_logs")
    if record["returncode"] == 0 and metrics.exists():
        data = json.loads(metrics.read_text())
        record.update(batch=batch, world_size=data["world_size"], tokens_per_s=data["tokens_per_s"],
                      losses=data["losses"], backend=data["backend"],
                      seconds_per_step=data["config"]["seq_len"] * batch / data["tokens_per_s"])
    return record


# --------------------------------------------------------------------------- all-reduce worker
def allreduce_worker(device_type: str, numel: int, reps: int, result: str) -> None:
    """Under torchrun: median seconds of one all-reduce of ``numel`` fp32 (rank 0 writes)."""
    import torch.distributed as dist

    cuda = device_type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    grads = torch.randn(numel, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    samples = []
    for i in range(reps + 3):
        dist.barrier()
        sync()
        start = time.perf_counter()
        dist.all_reduce(grads)
        sync()
        if i >= 3:  # warm-up: communicator set-up
            samples.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps({"seconds": statistics.median(samples), "bytes": 4 * numel,
                                            "world_size": dist.get_world_size()}))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the model of a step
def fit_step_time(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t(b) = t0 + b * t1`` over (batch, seconds per step) points."""
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    t1 = sum((b - mean_b) * (t - mean_t) for b, t in points) / var
    return mean_t - t1 * mean_b, t1


def allreduce_seconds(n_gpus: int, nbytes: int, busbw: float) -> float:
    """Ring all-reduce time: each GPU moves 2 (N-1)/N of the bytes at the bus bandwidth."""
    return 2 * (n_gpus - 1) / n_gpus * nbytes / busbw


def scaling_limit(t0: float, t1: float, t_ar: float, n_gpus: int) -> "float | None":
    """Per-GPU batch below which splitting a global batch over ``n_gpus`` falls under 90%
    efficiency: (t0 + N b t1) / (N (t0 + b t1 + t_ar)) >= 0.9. None when the step time
    does not grow with the batch (t1 <= 0: splitting the batch never pays)."""
    if t1 <= 0:
        return None
    return max(0.0, ((EFFICIENCY * n_gpus - 1) * t0 + EFFICIENCY * n_gpus * t_ar) / ((1 - EFFICIENCY) * n_gpus * t1))


def analyse(runs: dict, n_params: int, nproc: int) -> dict:
    checks, model = {}, {"params": n_params, "grad_bytes": 4 * n_params}
    base, big = runs.get("one-gpu", {}), runs.get("one-gpu-big", {})
    for name in ("ddp", "fsdp"):
        result = runs.get(name, {})
        if "tokens_per_s" in result and "tokens_per_s" in base:
            speedup = result["tokens_per_s"] / base["tokens_per_s"]
            checks[f"{name} tokens/s vs 1 GPU"] = {"value": speedup, "target": f">= {SPEEDUP_TARGET}",
                                                    "ok": speedup >= SPEEDUP_TARGET}
        if "losses" in result and "losses" in big:
            worst = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], big["losses"]))
            last = abs(result["losses"][-1] - big["losses"][-1]) / abs(big["losses"][-1])
            same = len(result["losses"]) == len(big["losses"])
            checks[f"{name} loss vs 1 GPU, same global batch"] = {
                "value": worst, "last_step": last, "target": f"<= {LOSS_RTOL:g} relative at every step",
                "ok": same and worst <= LOSS_RTOL}
    points = sorted((r["batch"], r["seconds_per_step"]) for name, r in runs.items()
                    if name.startswith(("one-gpu", "sweep-")) and "seconds_per_step" in r)
    allreduce = runs.get("allreduce", {}).get("result")
    if len({b for b, _ in points}) >= 2:
        t0, t1 = fit_step_time(points)
        model.update(t0_s=t0, t1_s_per_row=t1, points=points)
        if allreduce:
            busbw = allreduce_seconds(allreduce["world_size"], allreduce["bytes"], 1.0) / allreduce["seconds"]
            model.update(allreduce_s=allreduce["seconds"], busbw_gbs=busbw / 1e9)
            model["per_gpu_batch_limit"] = {
                str(n): scaling_limit(t0, t1, allreduce_seconds(n, 4 * n_params, busbw), n) for n in (2, 4, 8, 16)}
            if "batch" in base:
                b = base["batch"]
                t_b = t0 + b * t1
                model["predicted_speedup"] = nproc * t_b / (t_b + allreduce_seconds(nproc, 4 * n_params, busbw))
    return {"checks": checks, "model": model}


# --------------------------------------------------------------------------- report
def report(payload: dict) -> str:
    runs, analysis = payload["runs"], payload["analysis"]
    rows = [[name, r.get("world_size", ""), r.get("batch", ""), r.get("tokens_per_s", ""),
             r.get("seconds_per_step", ""), r["losses"][-1] if r.get("losses") else "", r["returncode"],
             r["seconds"], r.get("graph_recaptures", "")] for name, r in runs.items() if name != "allreduce"]
    lines = ["## Data-parallel training of the reference model", "",
             common.markdown_table(["run", "ranks", "global batch", "tokens/s", "s/step", "last loss", "exit",
                                    "wall s", "graph recaptures"], rows), ""]
    checks = analysis["checks"]
    if checks:
        lines += [common.markdown_table(["check", "value", "target", "ok"],
                                        [[k, v["value"], v["target"], "yes" if v["ok"] else "NO"]
                                         for k, v in checks.items()]), ""]
    model = analysis["model"]
    lines += [f"Parameters: {model['params']:,} ({model['grad_bytes'] / 2**20:.1f} MiB of fp32 gradients "
              "all-reduced per step)."]
    if "t0_s" in model:
        lines.append(f"One GPU: t(b) = {model['t0_s'] * 1e3:.1f} ms + b x {model['t1_s_per_row'] * 1e3:.2f} ms "
                     f"(fit over batches {[b for b, _ in model['points']]}).")
    if "allreduce_s" in model:
        limits = ", ".join(f"N={n}: " + ("never scales (t1 <= 0)" if b is None else f"{b:.1f}")
                           for n, b in model["per_gpu_batch_limit"].items())
        lines += [f"All-reduce of the gradients on {runs['allreduce']['result']['world_size']} ranks: "
                  f"{model['allreduce_s'] * 1e3:.3f} ms (bus bandwidth {model['busbw_gbs']:.1f} GB/s).",
                  f"Per-GPU batch below which a fixed global batch stops scaling (90% efficiency): {limits}."]
    if "predicted_speedup" in model:
        lines.append(f"Predicted speedup at the per-GPU batch of `one-gpu`: {model['predicted_speedup']:.2f}x.")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in runs.values()]
    failed = [f"- {name}: exit {r['returncode']}\n\n```\n{r.get('stderr_tail', '')[-1500:]}\n```"
              for name, r in runs.items() if r["returncode"] != 0]
    if failed:
        lines += ["", "Failures:", ""] + failed
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nproc", type=int, default=2, help="GPUs (ranks) of the data-parallel runs")
    ap.add_argument("--config", default=None, help="model preset (default: gpu on CUDA, tiny on CPU)")
    ap.add_argument("--per-gpu-batch", type=int, default=None, help="default: the preset's batch (CPU: 2)")
    ap.add_argument("--steps", type=int, default=None, help="steps of the compared runs (default 20; CPU 4)")
    ap.add_argument("--log-every", type=int, default=None, help="default 5 (CPU 2); tokens/s skips the first interval")
    ap.add_argument("--sweep", type=int, nargs="*", default=None,
                    help="extra 1-GPU batches for the step-time fit (default 8 16; CPU 1)")
    ap.add_argument("--train-args", default="", help='extra python -m deqkern arguments, e.g. "--graph"')
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all runs")
    ap.add_argument("--out", default=None, help="results folder (default: bench/results/<device>/; CPU: a temp dir)")
    ap.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--numel", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.config = args.config or ("tiny" if cpu else "gpu")
    args.steps = args.steps or (4 if cpu else 20)
    args.log_every = args.log_every or (2 if cpu else 5)
    args.sweep = [1] if cpu and args.sweep is None else ([8, 16] if args.sweep is None else args.sweep)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.allreduce_worker:
        allreduce_worker(args.device, args.numel, 20, args.result)
        return 0
    from deqkern.models.charlm import PRESETS, CharLM

    cfg = PRESETS[args.config]()
    b = args.per_gpu_batch or (2 if args.device == "cpu" else cfg.batch)
    n_params = sum(p.numel() for p in CharLM(cfg).parameters())
    device = torch.device(args.device)
    out = Path(args.out) if args.out else (common.results_dir(device) if args.device == "cuda"
                                           else Path(tempfile.mkdtemp(prefix="deqkern-dist-")))
    out.mkdir(parents=True, exist_ok=True)
    env = launch_env(args.device)
    deadline = time.monotonic() + args.budget_s
    multi = args.device == "cpu" or torch.cuda.device_count() >= args.nproc
    sweep_steps = max(2 * args.log_every, 10 if args.device == "cuda" else 4)

    plan = []
    if multi:
        plan.append(("ddp", lambda left: train_run("ddp", torchrun(args.nproc), args, args.nproc * b, args.steps,
                                                   env, left, out)))
    plan.append(("one-gpu", lambda left: train_run("one-gpu", [sys.executable], args, b, args.steps, env, left, out)))
    plan.append(("one-gpu-big", lambda left: train_run("one-gpu-big", [sys.executable], args, args.nproc * b,
                                                       args.steps, env, left, out)))
    if multi:
        plan.append(("fsdp", lambda left: train_run("fsdp", torchrun(args.nproc), args, args.nproc * b, args.steps,
                                                    env, left, out, fsdp=True)))
        plan.append(("allreduce", lambda left: allreduce_run(args, n_params, env, left, out)))
    for batch in args.sweep:
        plan.append((f"sweep-{batch}", lambda left, batch=batch: train_run(
            f"sweep-{batch}", [sys.executable], args, batch, sweep_steps, env, left, out)))

    runs, skipped = {}, []
    for name, start in plan:
        left = deadline - time.monotonic()
        if left < 30:
            skipped.append(name)
            continue
        runs[name] = start(left)
    payload = {"environment": common.environment(device), "nproc": args.nproc, "per_gpu_batch": b,
               "config": args.config, "train_args": args.train_args, "steps": args.steps,
               "nccl_env": {k: env.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
               "runs": runs, "skipped_for_time": skipped,
               "note": None if multi else f"fewer than {args.nproc} GPUs here: data-parallel runs skipped"}
    payload["analysis"] = analyse(runs, n_params, args.nproc)
    table = report(payload) + (f"\n\nSkipped for lack of time: {', '.join(skipped)}" if skipped else "")
    common.publish(device, "distributed", payload, table, out=out / "distributed.json")
    failed = [name for name, r in runs.items() if r["returncode"] != 0]
    return 1 if failed or not multi else 0


def allreduce_run(args: argparse.Namespace, n_params: int, env: dict, timeout: float, out: Path) -> dict:
    result = out / "distributed_logs" / "allreduce.json"
    argv = [*torchrun(args.nproc), str(Path(__file__).resolve()), "--allreduce-worker", "--numel", str(n_params),
            "--result", str(result), "--device", args.device]
    record = run("allreduce", argv, env, timeout, out / "distributed_logs")
    if record["returncode"] == 0 and result.exists():
        record["result"] = json.loads(result.read_text())
    return record


if __name__ == "__main__":
    sys.exit(main())
