"""Run the benchmark suites side by side in one process and write their results.

    python -m bench [--suite all] [--dtype bf16 fp32] [--sizes 8192x1024 ...] [--quick]
                    [--device cuda|cpu] [--out DIR] [--budget-s 420]

Suites (each also runs alone as ``python bench/bench_<name>.py``):

  update     the fused update op vs eager vs torch.compile: forward, forward+backward,
             backward kernel; GB/s against the measured copy bandwidth
  iteration  one solver iteration (GEMM + update) fused vs eager vs torch.compile,
             against its floor (GEMM time + the update's bytes at copy bandwidth)
  solve      forward solve: deqkern (plain and CUDA graph) vs eager loops vs a
             torch.compile'd step in a loop vs torchdeq fixed_point_iter
  train      solve + backward: deqkern IFT / 1-step vs eager and compiled unrolled
             autograd vs torchdeq (IFT and its default 1-step gradient); peak memory
  spectral   SpectralNormSchedule vs torch's spectral_norm parametrization
  model      bench/bench_model.py, if present (once per dtype; on a CPU, the last dtype only)
  dropin     bench/bench_dropin.py, if present (likewise)
  host       bench/host_overhead.py: host time per call of each public entry point
             (on a CPU, the Python side with kernel launches stubbed)

Results go to ``bench/results/<device-slug>/`` on a GPU, and to a fresh temporary
directory (printed) on a CPU, whose runs are smoke tests, not results to commit
(``--out DIR``: ``DIR/<device-slug>/`` either way): one ``<suite>.json`` + ``<suite>.md``
each, ``run.json`` (what ran, how long) and ``SUMMARY.md`` (all tables; plots from
``python bench/plot.py DIR/<slug>`` are embedded once they exist -- they are also drawn
here when matplotlib is installed).

Exit status: 0 when every suite ran (or was skipped for lack of time, or is an optional
suite that is not available), 1 when any failed -- raised, exited non-zero or timed out;
the other suites still run, and a summary says which failed and why.

Time budget: ``--budget-s`` (default 420) is shared among the selected suites in
proportion to their expected cost, unused time passing on to later suites. A suite
stops starting new problem sizes once its share is spent (the sizes it skipped are
listed in its table), and is interrupted if it runs more than ``GRACE_S`` past it. So
one ``python -m bench`` fits a fixed time slot. ``--budget-s 0``: no budget.

On a machine without CUDA (or with ``--device cpu``) the Triton kernels run through the
Triton interpreter: they are checked for correctness but not timed; eager variants are
timed on one CPU thread as a smoke test, not a speed comparison.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
SUITES = ("update", "iteration", "solve", "train", "spectral", "model", "dropin", "host")
#: Relative expected cost of each suite on a GPU, for sharing the time budget.
WEIGHTS = {"update": 3.0, "iteration": 1.5, "solve": 1.5, "train": 1.5, "spectral": 0.3, "model": 2.0, "dropin": 2.0,
           "host": 1.0}
GRACE_S = 45.0
DEFAULT_BUDGET_S = 420.0


class SuiteTimeout(BaseException):
    """A suite ran more than GRACE_S past its share of the time budget.

    A BaseException, like KeyboardInterrupt: a suite's own ``except Exception`` (which
    reports a variant that fails and moves on) must not swallow it, nor a library wrap it.
    """


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", nargs="+", default=["all"], choices=(*SUITES, "all"))
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp32"))
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="NxD problem sizes for update, iteration, solve and train (default: each suite's own)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="results root (default: bench/results on a GPU, a temporary "
                    "directory on a CPU); files go to OUT/<device-slug>/")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"time budget for all suites, seconds (default {DEFAULT_BUDGET_S:g}; 0: none)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is available (use --device cpu)")
    args.suite = list(SUITES) if "all" in args.suite else [s for s in SUITES if s in args.suite]
    return args


def suite_calls(args: argparse.Namespace) -> list[tuple[str, str, list[list[str]], bool]]:
    """(name, module, argv of each ``main`` call, optional) per suite to run. solve and
    train share one call; model and dropin take one ``--dtype`` per call."""
    common_argv = ["--device", args.device] + (["--quick"] if args.quick else [])
    sized = common_argv + ["--dtype", *args.dtype] + (["--sizes", *args.sizes] if args.sizes else [])
    calls = []
    phases = [p for p, s in (("forward", "solve"), ("train", "train")) if s in args.suite]
    for name in args.suite:
        if name in ("update", "iteration"):
            calls.append((name, f"bench_{name}", [sized], False))
        elif name in ("solve", "train"):
            if name == ("solve" if "solve" in args.suite else "train"):
                label = "+".join(s for s in ("solve", "train") if s in args.suite)
                calls.append((label, "bench_solve", [sized + ["--phase", *phases]], False))
        elif name == "spectral":
            calls.append((name, "bench_spectral", [common_argv], False))
        elif name == "host":
            calls.append((name, "host_overhead", [common_argv + ["--dtype", *args.dtype]], False))
        else:
            # Under the Triton interpreter a model run checks, it does not time: one dtype
            # is enough there, and the CPU run stays within minutes.
            dtypes = args.dtype if args.device == "cuda" else args.dtype[-1:]
            calls.append((name, f"bench_{name}", [common_argv + ["--dtype", dt] for dt in dtypes], True))
    return calls


def run_suite(module_name: str, argvs: list[list[str]], optional: bool) -> str:
    """Import ``module_name`` and call its ``main(argv)`` for each argv; the outcome as
    one line. An optional suite that is missing or raises ImportError is "not available"."""
    try:
        module = importlib.import_module(module_name)
        if not hasattr(module, "main"):
            return f"not available ({module_name} has no main(argv))"
        failed = []
        for argv in argvs:
            try:
                module.main(argv)
            except SystemExit as exc:  # argparse errors, or a suite's own verdict
                if exc.code not in (0, None):
                    failed.append(f"{' '.join(argv)}: exit {exc.code}")
    except ImportError as exc:
        if optional:
            return f"not available ({type(exc).__name__}: {exc})"
        raise
    return "ok" if not failed else "failed (" + "; ".join(failed) + ")"


_alarm = {"fired": False}


def _on_alarm(signum, frame):
    _alarm["fired"] = True
    raise SuiteTimeout()


def _failure(exc: BaseException, share_s: float) -> str:
    """One line saying why a suite failed. Anything escaping after the alarm fired is the
    timeout, whatever a library wrapped it in; other errors get their type and first line
    (their traceback is printed where they happen)."""
    if _alarm["fired"]:
        return f"failed (timed out: more than {GRACE_S:g} s past its {share_s:.0f} s share of the budget; " \
               "results not written)"
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"failed ({type(exc).__name__}: {first_line})"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    device = torch.device(args.device)
    if device.type == "cpu":
        # before triton is first imported (by deqkern): run the kernels in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)  # stable smoke-test medians on small shared machines
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    if args.out:
        os.environ["DEQKERN_RESULTS"] = str(Path(args.out).resolve())
    sys.path.insert(0, str(BENCH_DIR))
    import common  # noqa: E402  (after the environment is set)

    import deqkern  # noqa: E402,F401  (imports triton after TRITON_INTERPRET is set)

    print(f"results go to {common.results_dir(device)}"
          + ("" if args.out or device.type == "cuda" else " (a temporary directory; --out DIR keeps them)"))
    calls = suite_calls(args)
    budget_end = started + args.budget_s if args.budget_s > 0 else None
    status: dict[str, dict] = {}
    use_alarm = budget_end is not None and hasattr(signal, "SIGALRM")
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    for index, (name, module_name, argvs, optional) in enumerate(calls):
        now = time.time()
        print(f"\n===== {name}: " + " && ".join(f"python bench/{module_name}.py {' '.join(a)}" for a in argvs),
              flush=True)
        share = 0.0
        if budget_end is not None:
            if now >= budget_end:
                status[name] = {"status": "skipped (time budget spent)", "seconds": 0.0}
                print(status[name]["status"])
                continue
            weights = [sum(WEIGHTS[s] for s in n.split("+")) for n, *_ in calls[index:]]
            share = (budget_end - now) * weights[0] / sum(weights)
            os.environ["DEQKERN_BENCH_DEADLINE"] = str(now + share)
            _alarm["fired"] = False
            signal.alarm(max(1, int(share + GRACE_S)))
        try:
            outcome = run_suite(module_name, argvs, optional)
        except SuiteTimeout as exc:
            outcome = _failure(exc, share)
        except Exception as exc:  # one broken suite must not hide the others' results
            if not _alarm["fired"]:
                traceback.print_exc()
            outcome = _failure(exc, share)
        finally:
            if use_alarm:
                signal.alarm(0)
        status[name] = {"status": outcome, "seconds": round(time.time() - now, 1)}
        print(f"----- {name}: {outcome} ({status[name]['seconds']} s)", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if use_alarm:
        signal.signal(signal.SIGALRM, previous_handler)
    os.environ.pop("DEQKERN_BENCH_DEADLINE", None)

    out_dir = common.results_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"argv": list(sys.argv[1:] if argv is None else argv), "environment": common.environment(device),
           "budget_s": args.budget_s, "total_seconds": round(time.time() - started, 1), "suites": status}
    (out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    plotted = False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"\nmatplotlib not installed: draw the plots elsewhere with `python bench/plot.py {out_dir}`")
    else:
        import plot

        plot.main([str(out_dir)])
        plotted = True
    if not plotted:
        common.write_summary(out_dir)
    print("\n" + common.markdown_table(["suite", "status", "seconds"],
                                       [[n, s["status"], s["seconds"]] for n, s in status.items()]))
    print(f"\n{run['total_seconds']} s in all; results in {out_dir} (SUMMARY.md)")
    failed = {n: s["status"] for n, s in status.items() if s["status"].startswith("failed")}
    if failed:
        print(f"\n{len(failed)} of {len(status)} suites failed:")
        for name, outcome in failed.items():
            print(f"  {name}: {outcome[len('failed ('):-1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
