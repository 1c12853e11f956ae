"""Per-token latency of generation from the reference model (``python -m deqkern generate``).

    python bench/bench_generate.py [--config tiny|small|gpu] [--resume PATH] [--batch 1 32] [--tokens N]
                                   [--prompt-len P] [--temperature T] [--device cuda|cpu] [--out DIR]

Each token is one solve of the DEQ layer on that token's slots (``CharLM.generate``: the
providers' state and the warm start carried from the previous token), then the readout
and sampling. Variants, at each ``--batch``:

    default     the default path: on CUDA each whole token step (prelude, one-launch solve,
                state update, readout, sampling) replayed from one CUDA graph
    no-capture  the same steps run without capture (``step_graph=False``; CUDA only)
    graph       ``graph=True``: each token's solve replayed from a CUDA graph, the rest of the
                step eager (``--graph``; CUDA only; the baseline of issue 14's target)

Recorded per variant and batch (:func:`deqkern.models.generation.timed_generate`, the
device synchronized after every token, so each token's time is its true latency): median
milliseconds per token (after ``GENERATE_WARMUP`` steps; the prompt's steps count, they
are the same step), tokens/s (``batch * tokens`` over the seconds of the sampling steps),
Picard iterations per row, the backend that ran, and each variant's latency relative to
``graph`` (issue 14's target: the new path ≥ 3× today's ``--graph`` path at batch 1 and 32).

Checked before timing: the variant's logits for a teacher-forced prompt against the float64
eager token loop of the same weights (relative Frobenius error).

Weights: a fresh model from ``--seed`` (untrained), or a training checkpoint with
``--resume PATH`` (a trained model may need other iteration counts per token). The prompt
is the first ``--prompt-len`` bytes of the training corpus. On a CPU (``--config`` then
defaults to ``tiny``) only ``default`` runs, on the eager path, as a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from deqkern import _backend  # noqa: E402
from deqkern.__main__ import forced_backend  # noqa: E402
from deqkern.models.charlm import PRESETS, CharLM, corpus  # noqa: E402
from deqkern.models.generation import GENERATE_WARMUP, load_model, timed_generate  # noqa: E402

#: Largest relative Frobenius error of a variant's prompt logits against the float64
#: eager reference: the solves stop at tol 1e-4 (relative), the logits follow to ~1e-4.
CHECK_TOL = 1e-3
CHECK_PROMPT = 8


def build(args: argparse.Namespace, device: torch.device, graph: bool) -> CharLM:
    """The benchmarked model on ``device``, with ``cfg.graph = graph``."""
    if args.resume:
        return load_model(args.resume, device, graph=graph)[0]
    torch.manual_seed(args.seed)
    return CharLM(dataclasses.replace(PRESETS[args.config](), graph=graph)).to(device)


def check(model: CharLM, reference: CharLM, device: torch.device, step_graph: Optional[bool]) -> str:
    """'ok' or 'FAIL (...)': the prompt's logits (teacher-forced) against ``reference``."""
    prompt = corpus()[:CHECK_PROMPT].long()[None].to(device)
    logits = model.generate(prompt, 1, temperature=0, step_graph=step_graph)[1]["logits"]
    with forced_backend("eager"):
        expected = reference.generate(prompt, 1, temperature=0)[1]["logits"]
    return common.check_close("prompt logits", logits, expected, CHECK_TOL)


def run(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], CharLM]:
    """The rows (one per variant and batch), and the float64 reference model."""
    reference = build(args, device, graph=False).double()
    variants = ["default"] + (["no-capture", "graph"] if device.type == "cuda" else [])
    prompt_text = corpus()[:args.prompt_len].long().to(device)
    rows = []
    for variant in variants:
        model = build(args, device, graph=variant == "graph")
        step_graph = False if variant == "no-capture" else None
        verdict = check(model, reference, device, step_graph)
        for batch in args.batch:
            prompt = prompt_text.repeat(batch, 1)
            generator = torch.Generator(device).manual_seed(args.seed)
            _, stats, timing = timed_generate(model, prompt, args.tokens, temperature=args.temperature,
                                              generator=generator, step_graph=step_graph)
            row = {"variant": variant, "batch": batch, "check": verdict, "ran": _backend.last_backend(),
                   "ms_per_token": timing["latency_ms"], "tokens_per_s": timing["tokens_per_s"],
                   "mean_nstep": stats["mean_nstep"].item(), "max_nstep": stats["max_nstep"].item(),
                   "unconverged": stats["unconverged"].item(), "steps": timing["steps"], "warmup": timing["warmup"]}
            print("row", row, flush=True)
            rows.append(row)
    graph_ms = {r["batch"]: r["ms_per_token"] for r in rows if r["variant"] == "graph"}
    for row in rows:
        row["speedup_vs_graph"] = graph_ms[row["batch"]] / row["ms_per_token"] if row["batch"] in graph_ms else None
    return rows, reference


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, tiny on a CPU")
    ap.add_argument("--resume", default=None, metavar="PATH", help="a training checkpoint (default: a fresh model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=None, help="sampled bytes per run (default 64; CPU 16)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt bytes (default 16)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="directory for generate.json and generate.md "
                    "(default bench/results/<device>/)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.resume and args.config:
        ap.error("--config builds a fresh model; with --resume the checkpoint's configuration is used")
    args.config = args.config or ("gpu" if on_gpu else "tiny")
    args.tokens = args.tokens or (64 if on_gpu else 16)
    for name in ("tokens", "prompt_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if min(args.batch) < 1:
        ap.error(f"--batch must be >= 1; got {args.batch}")
    if not on_gpu:
        torch.set_num_threads(1)  # tiny matrices; see deqkern/__main__.py
    rows, reference = run(args, device)
    cfg = reference.cfg
    notes = [f"{'checkpoint ' + args.resume if args.resume else 'fresh model, seed ' + str(args.seed)}; "
             f"d_model {cfg.d_model}, {cfg.n_slots} slots, tol {cfg.tol:g} ({cfg.stop_mode}), max_iter {cfg.max_iter}; "
             f"prompt {args.prompt_len} bytes, {args.tokens} sampled, temperature {args.temperature:g}; latency: "
             f"median ms per token after {GENERATE_WARMUP} warm-up steps, device synchronized every token."]
    if not on_gpu:
        notes.append("CPU run: the default path on eager only, a smoke test; no graph variant.")
    payload = {"environment": common.environment(device), "notes": notes, "config": dataclasses.asdict(cfg),
               "prompt_len": args.prompt_len, "tokens": args.tokens, "temperature": args.temperature,
               "resume": args.resume, "rows": rows}
    table = "\n".join(f"> {note}" for note in notes) + "\n\n" + common.markdown_table(
        ["variant", "batch", "check", "backend", "ms / token", "tokens/s", "× graph", "iters mean", "iters max",
         "unconverged rows"],
        [[r["variant"], r["batch"], r["check"], r["ran"], r["ms_per_token"], r["tokens_per_s"],
          "-" if r["speedup_vs_graph"] is None else f"{r['speedup_vs_graph']:.2f}×", r["mean_nstep"],
          int(r["max_nstep"]), int(r["unconverged"])] for r in rows])
    out = Path(args.out) / "generate.json" if args.out else None
    return common.publish(device, "generate", payload, table, out=out)


if __name__ == "__main__":
    main()
