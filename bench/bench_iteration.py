"""One Picard iteration of the frozen-context cell, fused vs eager vs torch.compile, against its floor.

    python bench/bench_iteration.py [--dtype bf16 fp32] [--sizes 8192x1024 ...] [--quick]

One iteration is what a solver runs per step: ``signal = h @ W.T`` (cuBLAS) and the
update ``h_next = (1 - b) h + b * g * RMSNorm(signal + frozen)`` with its per-row
residual. Variants (forward, no grad):

  gemm      ``F.linear(h, W)`` alone -- the part no update kernel can remove
  eager     GEMM + the eager update (``deqkern.ops.update.update_reference``)
  compile   ``torch.compile`` of that whole eager iteration (GEMM included)
  fused     GEMM + ``deqkern.frozen_rmsnorm_update``

Floor: the GEMM's measured time plus one pass over the bytes the update must move (read
signal, frozen and h_prev, write h_next, all in the storage dtype; write the float32
residual and rstd; read the gain) at the device-to-device copy bandwidth measured in the
same run. ``time / floor`` = 1 means the update costs no more than moving its bytes once.

Every variant's h_next and residual are compared with eager's on random inputs before
timing (FAIL rows are not timed). CUDA: wall time per iteration (``wall ms``: back-to-back
calls, host included, synchronized only at the ends; shown first) and device time from 20
iterations captured in one CUDA graph (``ms``).
CPU: only eager and the GEMM are timed; the fused op is checked, not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from deqkern.ops.update import update_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SIZES = ["8192x1024", "32768x512", "256x512"]
QUICK_SIZES = ["256x64", "1024x128"]
DAMPING, EPS, STOP = 0.8, 1e-6, "rel"


def gemm(h, w, frozen, gain):
    return F.linear(h, w)


def eager_iteration(h, w, frozen, gain):
    h_next, residual, _ = update_reference(F.linear(h, w), frozen, h, gain, EPS, DAMPING, STOP)
    return h_next, residual


def fused_iteration(h, w, frozen, gain):
    return deqkern.frozen_rmsnorm_update(F.linear(h, w), frozen, h, gain, eps=EPS, damping=DAMPING, stop_mode=STOP)


def update_bytes(n: int, d: int, dtype: torch.dtype) -> int:
    """Bytes the update moves at least once: 3 reads + 1 write of (n, d) in the storage
    dtype, the float32 residual and rstd (n each), the gain (d)."""
    es = torch.finfo(dtype).bits // 8
    return 4 * n * d * es + 2 * 4 * n + d * es


def _time(fn, device, graph: bool) -> float:
    try:
        return common.time_ms(fn, device, graph=graph)
    except Exception as exc:  # a variant that cannot be captured is reported, not hidden
        print(f"  timing failed (graph={graph}): {type(exc).__name__}: {exc}".splitlines()[0])
        return float("nan")


def bench_size(n: int, d: int, dtype: torch.dtype, device: torch.device, copy_gbs: float) -> list[dict]:
    on_gpu = device.type == "cuda"
    gen = torch.Generator().manual_seed(n * 7919 + d)
    w = (torch.randn(d, d, generator=gen) / d**0.5).to(device=device, dtype=dtype)
    gain = (1 + 0.1 * torch.randn(d, generator=gen)).to(device=device, dtype=dtype)
    es = torch.finfo(dtype).bits // 8

    def make():
        return [torch.randn(n, d, device=device, dtype=dtype), w,
                torch.randn(n, d, device=device, dtype=dtype), gain]

    inputs = common.Rotating(make, 4 * n * d * es, device)
    check_in = inputs.sets[0]
    with torch.no_grad():
        h_ref, res_ref = eager_iteration(*check_in)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5

    variants = {"gemm": lambda: gemm, "eager": lambda: eager_iteration}
    if on_gpu:
        variants["compile"] = lambda: common.fresh_compile(eager_iteration)
    variants["fused"] = lambda: fused_iteration
    timed = set(variants) if on_gpu else {"gemm", "eager"}

    rows = []
    for name, factory in variants.items():
        fn = factory()
        row = {"n": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "variant": name}
        rows.append(row)
        with torch.no_grad():
            out = fn(*check_in)
        if name == "gemm":
            ref = check_in[0].double() @ check_in[1].double().T
            row["check"] = common.check_close("h @ W.T", out, ref, 2e-2 if dtype == torch.bfloat16 else 1e-2)
        else:
            row["check"] = common.check_close("h_next", out[0], h_ref, tol)
            if row["check"] == "ok":
                row["check"] = common.check_close("residual", out[1], res_ref, 1e-4)
        if name == "fused":
            row["backend"] = deqkern.last_backend()
        if row["check"] != "ok":
            continue
        if name not in timed:
            row["note"] = "checked, not timed (Triton interpreter)"
            continue

        def one_iteration():
            with torch.no_grad():
                fn(*inputs.next())

        row["wall_ms"] = common.wall_ms(one_iteration, device)
        row["ms"] = _time(one_iteration, device, graph=True) if on_gpu else row["wall_ms"]

    by = {r["variant"]: r for r in rows}
    gemm_ms = by["gemm"].get("ms", float("nan"))
    update_floor_ms = update_bytes(n, d, dtype) / (copy_gbs * 1e9) * 1e3
    floor_ms = gemm_ms + update_floor_ms
    for r in rows:
        if "ms" not in r:
            continue
        r["floor_ms"] = floor_ms
        r["update_floor_ms"] = update_floor_ms
        if r["variant"] != "gemm":
            r["time_over_floor"] = r["ms"] / floor_ms
            r["update_ms"] = r["ms"] - gemm_ms
        for base in ("eager", "compile"):
            for key in ("ms", "wall_ms"):
                if r["variant"] != "gemm" and key in by.get(base, {}) and key in r:
                    r[f"{key}_speedup_vs_{base}"] = by[base][key] / r[key]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(ap, DTYPES)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if device.type != "cuda":
        print(common.CPU_NOTE)
    copy_gbs = common.copy_bandwidth_gbs(device)
    rows, skipped = common.sweep(sizes, args.dtype, DTYPES,
                                 lambda n, d, dtype: bench_size(n, d, dtype, device, copy_gbs))
    payload = {"environment": common.environment(device), "copy_bandwidth_gbs": copy_gbs, "damping": DAMPING,
               "stop_mode": STOP, "rows": rows, "skipped_time_budget": skipped}

    headers = ["dtype", "N×d", "variant", "check", "wall ms", "wall × eager", "wall × compile", "ms", "update ms",
               "floor ms", "time / floor", "× eager", "× compile"]
    table_rows = []
    for r in rows:
        label = r["variant"] if r.get("backend") in (None, "triton") else f"{r['variant']} ({r['backend']})"
        table_rows.append([
            r["dtype"], f"{r['n']}×{r['d']}", label, r["check"] + (" (not timed)" if "note" in r else ""),
            r.get("wall_ms", "-"), r.get("wall_ms_speedup_vs_eager", "-"), r.get("wall_ms_speedup_vs_compile", "-"),
            r.get("ms", "-"), r.get("update_ms", "-"), r.get("floor_ms", "-"), r.get("time_over_floor", "-"),
            r.get("ms_speedup_vs_eager", "-"), r.get("ms_speedup_vs_compile", "-"),
        ])
    timing = ("device time: 20 iterations captured in one CUDA graph, median replay / 20" if device.type == "cuda"
              else "CPU wall time, median")
    table = (f"Copy bandwidth (read+write): {copy_gbs:,.0f} GB/s. One iteration = h @ W.T + update "
             f"(damping={DAMPING}, stop_mode={STOP}, frozen (N, d)), no grad. wall: back-to-back calls, host "
             f"included, synchronized only at the ends, median of 5 rounds; ms: {timing}. floor = measured GEMM ms + update bytes / copy "
             f"bandwidth; update ms = ms - GEMM ms.\n\n" + common.markdown_table(headers, table_rows))
    if skipped:
        table += "\n\nSkipped (run time budget reached): " + ", ".join(skipped)
    return common.publish(device, "iteration", payload, table, quick=args.quick)


if __name__ == "__main__":
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    main()
