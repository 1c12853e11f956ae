"""``python -m deqkern``: train the reference model, sample from it, or check the fused update.

    python -m deqkern [--config tiny|small|gpu] [--steps N] [--backend auto|eager|triton] [--graph] [--token-loop]
                      [--device cpu|cuda] [--seed S] [--compare] [--batch B]
                      [--save PATH [--save-every N]] [--resume PATH] [--metrics PATH]
    torchrun --nproc_per_node=N -m deqkern [same options] [--fsdp]
    python -m deqkern generate [--resume PATH | --config tiny|small|gpu] [--prompt TEXT] [--tokens N] [--batch B]
                               [--temperature T] [--seed S] [--device cpu|cuda] [--backend ...] [--graph]
    python -m deqkern check [--device cpu|cuda]

``train`` (the default) trains :class:`deqkern.models.CharLM` (a byte-level LM on Python
standard-library sources, no download) with the layer's spectral-norm schedule attached
to the optimizer, and prints per logging interval: loss, tokens/s, Picard iterations per
row (mean, max), sweeps per step (``-`` with ``--token-loop``), converged fraction,
contraction, the memory context's RMS over the injection's RMS, the largest spectral norm
after the latest clamp (at most the target) and the pre-clamp drift (largest estimate
before that clamp over the target); then a summary. ``--compare`` trains twice from the
same seed, eager and fused, and prints the throughput ratio and the largest per-step loss
difference.

``--save PATH`` writes a checkpoint every ``--save-every`` steps and at the end;
``--resume PATH`` continues from one, bit for bit, up to ``--steps`` in all
(:mod:`deqkern.models.checkpoint`). ``--metrics PATH`` writes the logs and every step's
loss as JSON.

Under ``torchrun`` the model trains data-parallel (:mod:`deqkern.models.distributed`):
NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``), gloo with ``--device cpu``; the
global batch (``--batch``, default the preset's) is split across ranks, rank 0 prints
the global batch's figures and writes checkpoints and metrics. DDP, or FSDP2 with
``--fsdp``.

``generate`` samples ``--tokens`` bytes after ``--prompt`` (:meth:`CharLM.generate`: one
solve of the DEQ layer per token, warm-started from the previous token's fixed point;
``--temperature 0`` is greedy) from the model of a training checkpoint (``--resume
PATH``: its configuration, parameters and dtype; the optimizer is not read) or, without
one, from a fresh model built from ``--config`` and ``--seed`` (untrained: it prints
noise, and says so). ``--batch`` sequences share the prompt; the first is printed
(bytes decoded as UTF-8 with replacement characters, control characters other than
newline and tab shown as replacement characters too), then the per-token latency
(median after :data:`~deqkern.models.generation.GENERATE_WARMUP` tokens, the device
synchronized after every token) and tokens/s (``batch * tokens`` over the seconds of the
sampling steps). ``--seed`` also seeds the sampling.

``check`` compares :func:`deqkern.frozen_rmsnorm_update` with a float64 reference on
each backend that can run here, and times it.

``--backend`` sets ``DEQKERN_BACKEND`` for the run (``deqkern._backend`` reads it at every
call). On the CPU, ``torch.set_num_threads(1)``: the model's matrices are tiny, and on a
shared two-core machine intra-op threads made training 10-20x slower whenever another
process was busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Iterator

import torch

from deqkern import _backend
from deqkern.models import checkpoint, distributed
from deqkern.models.charlm import PRESETS, CharLM, CharLMConfig
from deqkern.models.generation import load_model, timed_generate, to_text
from deqkern.models.train import DEFAULT_SAVE_EVERY, TrainResult, train

BACKENDS = ("auto", "eager", "triton")
GENERATE_DEFAULTS = {"prompt": "def ", "tokens": 200, "temperature": 0.8}
#: Training options that ``generate`` refuses (name, the value meaning "not given").
TRAIN_ONLY = (("steps", None), ("log_every", None), ("token_loop", False), ("compare", False), ("save", None),
              ("save_every", DEFAULT_SAVE_EVERY), ("metrics", None), ("fsdp", False))


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Set ``DEQKERN_BACKEND`` for the duration of the block."""
    previous = os.environ.get("DEQKERN_BACKEND")
    os.environ["DEQKERN_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DEQKERN_BACKEND", None)
        else:
            os.environ["DEQKERN_BACKEND"] = previous


def fused_available(device: torch.device, dtype: torch.dtype = torch.float32, d: int = 64) -> bool:
    """Whether the Triton kernels can run here (GPU, or CPU under ``TRITON_INTERPRET=1``:
    ``auto`` never picks the interpreter, so ask for the kernels)."""
    with forced_backend("triton"):
        try:
            return _backend.select(device, dtype, d) != "eager"
        except RuntimeError:
            return False


def format_log(log: dict) -> str:
    sweeps = f"{log['sweeps']:.1f}" if log["sweeps"] else "-"
    return (
        f"step {log['step']:>5} | loss {log['loss']:.3f} | {log['tokens_per_s']:>9,.0f} tok/s | "
        f"iters mean {log['mean_nstep']:.2f} max {log['max_nstep']:>2} | sweeps {sweeps} | "
        f"converged {100 * log['converged_fraction']:.2f}% | contraction {log['contraction']:.3f} | "
        f"hist/inj {log['hist_inj_ratio']:.3f} | sigma {log['sigma_max']:.3f} (drift {log['sigma_drift']:.3f}x)"
    )


def summarize(result: TrainResult, cfg: CharLMConfig, backend: str) -> str:
    logs = result.logs
    steps = logs[-1]["step"]
    rows = steps * cfg.batch * cfg.seq_len * cfg.n_slots
    unconverged = sum(log["unconverged"] for log in logs)
    mean_nstep = sum(log["mean_nstep"] * log["tokens"] for log in logs) / sum(log["tokens"] for log in logs)
    verdict = "yes" if unconverged == 0 else f"no: {unconverged:,} of {rows:,} rows missed tol"
    return "\n".join([
        f"summary ({steps} steps, backend {backend}, {result.seconds:.1f} s, {result.tokens_per_s:,.0f} tok/s "
        f"after the first interval):",
        f"  100% of tokens converged (tol {cfg.tol:g}, {cfg.stop_mode}, cap {cfg.max_iter}): {verdict}",
        f"  Picard iterations per row: mean {mean_nstep:.2f}, max {max(log['max_nstep'] for log in logs)}"
        + (f"; sweeps per step: mean {sum(log['sweeps'] for log in logs) / len(logs):.1f} (time-parallel)"
           if logs[-1]["sweeps"] else " (token loop)"),
        f"  max contraction: {max(log['contraction'] for log in logs):.3f}",
        f"  spectral norm after a clamp: <= {max(log['sigma_max'] for log in logs):.3f} "
        f"(target {cfg.spectral_target:g}); largest pre-clamp drift {max(log['sigma_drift'] for log in logs):.3f}x "
        "the target",
        f"  loss: {result.losses[0]:.3f} -> {result.losses[-1]:.3f} "
        f"(first -> last interval mean: {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f})",
    ])


def run_training(cfg: CharLMConfig, args: argparse.Namespace, backend: str) -> TrainResult:
    from tqdm.auto import tqdm

    steps = args.steps or cfg.steps
    log_every = args.log_every or max(1, steps // 10)
    lead = distributed.world()[0] == 0   # rank 0 prints and writes; the others only train
    with forced_backend(backend):
        result = train(cfg, steps=steps, device=args.device, seed=args.seed, log_every=log_every,
                       on_log=(lambda log: tqdm.write(format_log(log))) if lead else None, progress=True,
                       save=args.save, save_every=args.save_every, resume=args.resume, fsdp=args.fsdp)
        ran = _backend.last_backend()
    if lead:
        print(summarize(result, cfg, f"{backend} (ran: {ran})"))
        if args.metrics:
            write_metrics(args.metrics, result, cfg, args, ran)
    return result


def write_metrics(path: str, result: TrainResult, cfg: CharLMConfig, args: argparse.Namespace, ran: str) -> None:
    """The run as JSON: configuration, ranks, every step's loss (exact floats), the logs."""
    payload = {
        "argv": sys.argv[1:], "config": dataclasses.asdict(cfg), "world_size": distributed.world()[1],
        "fsdp": args.fsdp, "backend": ran, "device": str(args.device), "start_step": result.start_step,
        "losses": result.losses, "tokens_per_s": result.tokens_per_s, "seconds": result.seconds, "logs": result.logs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(payload, file, indent=1)


# --------------------------------------------------------------------------- check
def _time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """Median wall milliseconds of one call (device synchronized around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def check(device: torch.device) -> None:
    """Parity with a float64 reference and timing of ``frozen_rmsnorm_update``."""
    import deqkern
    from deqkern.ops.update import update_reference

    damping, eps, stop_mode = 0.85, 1e-6, "rel"
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    print(f"frozen_rmsnorm_update on {device} (damping {damping}, stop_mode {stop_mode}): "
          "max abs error against the float64 reference")
    generator = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        backends = ["eager"] + (["triton"] if fused_available(device, dtype) else [])
        if device.type == "cpu" and backends == ["eager"]:
            print("  (CPU without TRITON_INTERPRET=1: eager only; the fused kernels need a GPU)")
        for n, d in ((4096, 256), (4096, 1000), (1024, 4096)):
            signal, frozen, h_prev = (torch.randn(n, d, device=device, generator=generator).to(dtype) for _ in range(3))
            gain = (1 + 0.1 * torch.randn(d, device=device, generator=generator)).to(dtype)
            inputs = (signal, frozen, h_prev, gain)
            h_ref, res_ref, _ = update_reference(*(t.double() for t in inputs), eps, damping, stop_mode)
            for name in backends:
                with forced_backend(name), torch.no_grad():
                    def call():
                        return deqkern.frozen_rmsnorm_update(*inputs, eps=eps, damping=damping, stop_mode=stop_mode)

                    h, res = call()
                    ran = deqkern.last_backend()
                    # The interpreter is a correctness tool: its timings compare nothing.
                    timing = ("not timed" if ran == "triton-interpreter" else
                              f"{_time_ms(call, device, reps=20 if device.type == 'cuda' else 5):8.3f} ms")
                h_err = (h.double() - h_ref).abs().max().item()
                res_err = (res.double() - res_ref).abs().max().item()
                print(f"  {str(dtype).replace('torch.', ''):>8} {n:>5}x{d:<5} {ran:>18}: h_next {h_err:.2e}, "
                      f"residual {res_err:.2e}, {timing}")


# --------------------------------------------------------------------------- generate
def generate(args: argparse.Namespace) -> None:
    """The ``generate`` command (module docstring)."""
    torch.manual_seed(args.seed)
    if args.resume:
        model, step = load_model(args.resume, args.device, graph=args.graph)
        origin = f"checkpoint {args.resume} (step {step})"
    else:
        cfg = dataclasses.replace(PRESETS[args.config or ("gpu" if args.device.type == "cuda" else "small")](),
                                  graph=args.graph)
        model = CharLM(cfg).to(args.device)  # initialized as training's step 0 with this seed
        origin = f"a fresh model from seed {args.seed} (untrained: it prints noise; --resume PATH loads a trained one)"
    prompt_bytes = args.prompt.encode("utf-8")
    prompt = torch.tensor(list(prompt_bytes), device=args.device).repeat(args.batch, 1)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    print(f"deqkern generate on {args.device}: {origin}\n  model: {model.cfg}\n"
          f"  prompt {args.prompt!r} ({len(prompt_bytes)} bytes), {args.tokens} tokens, batch {args.batch}, "
          f"temperature {args.temperature:g}, seed {args.seed}")
    with forced_backend(args.backend):
        tokens, stats, timing = timed_generate(model, prompt, args.tokens, temperature=args.temperature,
                                               generator=generator)
        ran = _backend.last_backend()
    text = to_text(tokens[0])
    rule = "-" * 60
    print(f"{rule} sequence 1 of {args.batch}\n{text}\n{rule}")
    mean_nstep, max_nstep, unconverged = (stats[k].item() for k in ("mean_nstep", "max_nstep", "unconverged"))
    print(f"{args.tokens} tokens x batch {args.batch} in {timing['seconds']:.3f} s: "
          f"{timing['tokens_per_s']:,.1f} tokens/s | latency per token: median {timing['latency_ms']:.3f} ms "
          f"({timing['steps'] - timing['warmup']} of {timing['steps']} steps, after {timing['warmup']} warm-up; "
          f"device synchronized every token) | backend {args.backend} (ran: {ran}) | Picard iterations per row: "
          f"mean {mean_nstep:.2f}, max {max_nstep:.0f} | rows that missed tol: {unconverged:.0f}")


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m deqkern", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="train", choices=("train", "check", "generate"))
    ap.add_argument("--config", choices=sorted(PRESETS), default=None,
                    help="model preset (default: gpu on CUDA, small on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--log-every", type=int, default=None, help="steps per logging interval (default: steps/10)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="DEQKERN_BACKEND for the run: auto (fused where possible), eager, triton")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graph", action="store_true",
                    help="token loop with each token's solve and adjoint solve replayed from CUDA graphs (CUDA only)")
    ap.add_argument("--token-loop", action="store_true",
                    help="solve token by token instead of all tokens at once (time-parallel sweeps, the default)")
    ap.add_argument("--compare", action="store_true",
                    help="train twice from the same seed, eager and fused; print speed ratio and loss difference")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch (default: the preset's); under torchrun split across ranks")
    ap.add_argument("--save", default=None, metavar="PATH",
                    help="write a checkpoint to PATH every --save-every steps and at the end (atomic)")
    ap.add_argument("--save-every", type=int, default=DEFAULT_SAVE_EVERY, metavar="N",
                    help=f"steps between checkpoints (default {DEFAULT_SAVE_EVERY})")
    ap.add_argument("--resume", default=None, metavar="PATH",
                    help="continue from the checkpoint at PATH (same config), up to --steps steps in all")
    ap.add_argument("--metrics", default=None, metavar="PATH", help="write the logs and every step's loss as JSON")
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--prompt", default=None, metavar="TEXT",
                    help=f"generate: the text to continue (default {GENERATE_DEFAULTS['prompt']!r})")
    ap.add_argument("--tokens", type=int, default=None, metavar="N",
                    help=f"generate: bytes to sample (default {GENERATE_DEFAULTS['tokens']})")
    ap.add_argument("--temperature", type=float, default=None, metavar="T",
                    help=f"generate: sampling temperature >= 0, 0 greedy (default {GENERATE_DEFAULTS['temperature']})")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.command == "generate":
        _check_generate_args(ap, args)
    else:
        given = [f"--{name}" for name in GENERATE_DEFAULTS if getattr(args, name) is not None]
        if given:
            ap.error(f"{', '.join(given)}: options of the generate command (python -m deqkern generate ...)")
    for name in ("batch", "save_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.fsdp and not distributed.launched():
        ap.error("--fsdp shards the model over the ranks of a torchrun launch: "
                 "torchrun --nproc_per_node=N -m deqkern --fsdp ...")
    if args.compare and (distributed.launched() or args.save or args.resume):
        ap.error("--compare trains twice in one process: not with torchrun, --save or --resume")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1; got {args.steps}")
    if args.log_every is not None and args.log_every < 1:
        ap.error(f"--log-every must be >= 1; got {args.log_every}")
    if args.command != "check" and (args.backend == "triton" or args.compare) and not fused_available(args.device):
        what = "--compare" if args.compare else "--backend triton"
        ap.error(f"{what} needs the Triton kernels, which cannot run on {args.device} here "
                 "(use a CUDA device, or TRITON_INTERPRET=1 on the CPU)")
    if args.graph and args.device.type != "cuda":
        ap.error(f"--graph needs a CUDA device; got {args.device}")
    return args


def _check_generate_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``generate``'s options: its own filled with their defaults and checked; training's refused."""
    given = [f"--{name.replace('_', '-')}" for name, unset in TRAIN_ONLY if getattr(args, name) != unset]
    if given:
        ap.error(f"generate does not train: {', '.join(given)} are training options")
    if distributed.launched():
        ap.error("generate runs in one process: python -m deqkern generate ..., not under torchrun")
    if args.resume and args.config:
        ap.error("--config builds a fresh model; with --resume the checkpoint's configuration is used")
    for name, default in GENERATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.batch = 1 if args.batch is None else args.batch
    if not args.prompt:
        ap.error("--prompt must be a non-empty text (the model has no start token)")
    if args.tokens < 1:
        ap.error(f"--tokens must be >= 1; got {args.tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        ap.error(f"--temperature must be a finite number >= 0 (0: greedy); got {args.temperature}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cpu":
        torch.set_num_threads(1)
    if args.command == "check":
        check(args.device)
        return 0
    if args.command == "generate":
        try:
            generate(args)
        except (FileNotFoundError, checkpoint.CheckpointError) as err:
            raise SystemExit(f"python -m deqkern generate: {err}") from err
        return 0
    cfg = PRESETS[args.config or ("gpu" if args.device.type == "cuda" else "small")]()
    if args.graph or args.token_loop:
        cfg = dataclasses.replace(cfg, graph=args.graph, token_loop=args.token_loop or args.graph)
    if args.batch is not None:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    if not args.compare:
        if distributed.launched():
            args.device = distributed.init(args.device.type)
        try:
            rank, world_size = distributed.world()
            if cfg.batch % world_size:
                raise SystemExit(f"--batch {cfg.batch} (the global batch) must divide by the number of ranks "
                                 f"({world_size})")
            if rank == 0:
                ranks = (f" ({world_size} ranks, {'FSDP2' if args.fsdp else 'DDP'}, "
                         f"{cfg.batch // world_size} rows each)" if distributed.launched() else "")
                print(f"deqkern reference model on {args.device}{ranks}: {cfg}")
            run_training(cfg, args, args.backend)
        finally:
            distributed.shutdown()
        return 0
    print(f"deqkern reference model on {args.device}: {cfg}")
    results = {}
    for name in ("eager", "triton"):
        print(f"\n=== backend {name} ===")
        results[name] = run_training(cfg, args, name)
    eager, fused = results["eager"], results["triton"]
    diff = max(abs(a - b) for a, b in zip(eager.losses, fused.losses))
    print(f"\nfused / eager tokens/s: {fused.tokens_per_s:,.0f} / {eager.tokens_per_s:,.0f} = "
          f"{fused.tokens_per_s / eager.tokens_per_s:.2f}x; largest |loss difference| over "
          f"{len(eager.losses)} steps: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
