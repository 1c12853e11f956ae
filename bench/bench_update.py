"""Fused frozen-context RMSNorm update vs eager vs torch.compile(eager).

    python bench/bench_update.py [--dtype bf16 fp32] [--sizes 8192x512 ...] [--quick]

Forward alone (no grad), forward + ``autograd.grad`` of all four inputs, and the fused
backward kernel alone. Two clocks: wall time per call (``common.wall_ms``: back-to-back
calls, host included, synchronized only at the ends -- what a training loop sees; shown
first) and device time (20 calls replayed from one CUDA graph: the kernels alone), with
achieved GB/s against the device-to-device copy bandwidth measured in the same run. Every variant's
output (h_next, residual) and its gradients (signal, frozen, h_prev, gain) are compared
with eager's on random inputs before it is timed (a wrong fast kernel is reported as
FAIL and not timed). On a CPU-only machine only eager is timed; the fused op is still
checked (through the Triton interpreter when ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import deqkern  # noqa: E402
from deqkern.functional import _update_backward_op  # noqa: E402
from deqkern.ops.update import update_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_SIZES = ["256x512", "8192x512", "8192x1024", "32768x1024", "16384x2048", "65536x256"]
QUICK_SIZES = ["1024x256", "2048x512"]
DAMPING, EPS, STOP = 0.85, 1e-6, "rel"


def eager_update(signal, frozen, h_prev, gain):
    h, res, _ = update_reference(signal, frozen, h_prev, gain, EPS, DAMPING, STOP)
    return h, res


def fused_update(signal, frozen, h_prev, gain):
    return deqkern.frozen_rmsnorm_update(signal, frozen, h_prev, gain, eps=EPS, damping=DAMPING, stop_mode=STOP)


def _try_time(fn, device, graph):
    try:
        return common.time_ms(fn, device, graph=graph)
    except Exception as exc:  # a variant that cannot be captured is reported, not hidden
        print(f"  timing failed (graph={graph}): {type(exc).__name__}: {exc}".splitlines()[0])
        return float("nan")


def bench_size(n: int, d: int, dtype: torch.dtype, device: torch.device, copy_gbs: float, variants: dict,
               timed: set) -> list[dict]:
    """Check every variant at one size and time those in ``timed``. ``variants`` maps a
    name to a factory returning the function (a fresh ``torch.compile`` per size)."""
    es = torch.finfo(dtype).bits // 8
    fwd_bytes = 4 * n * d * es + 8 * n + d * es
    bwd_bytes = 6 * n * d * es + 4 * n
    on_gpu = device.type == "cuda"

    def make():
        s, f, p = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(3))
        g = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
        grad = torch.randn(n, d, device=device, dtype=dtype)
        return [t.requires_grad_() for t in (s, f, p, g)] + [grad]

    inputs = common.Rotating(make, 5 * n * d * es, device)
    check_in = inputs.sets[0]
    with torch.no_grad():
        h_ref, res_ref = eager_update(*check_in[:4])
    grads_ref = torch.autograd.grad(eager_update(*check_in[:4])[0], check_in[:4], check_in[4])
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-5
    rows = []
    for name, factory in variants.items():
        fn = factory()
        with torch.no_grad():
            h, res = fn(*check_in[:4])
        status = common.check_close("h_next", h, h_ref, tol)
        if status == "ok":
            status = common.check_close("residual", res, res_ref, 1e-4)
        if status == "ok":
            grads = torch.autograd.grad(fn(*check_in[:4])[0], check_in[:4], check_in[4])
            for label, got, ref in zip(("d_signal", "d_frozen", "d_h_prev", "d_gain"), grads, grads_ref):
                if status == "ok":
                    status = common.check_close(label, got, ref, max(tol, 1e-4))
        row = {"n": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "variant": name, "check": status}
        if name == "fused":
            row["backend"] = deqkern.last_backend()
        rows.append(row)
        if status != "ok" or name not in timed:
            if status == "ok":
                row["note"] = "checked, not timed (Triton interpreter)"
            continue

        def fwd():
            ins = inputs.next()
            with torch.no_grad():
                fn(*ins[:4])

        def fwd_bwd():
            ins = inputs.next()
            h, _ = fn(*ins[:4])
            torch.autograd.grad(h, ins[:4], ins[4])

        row["fwd_wall_ms"] = common.wall_ms(fwd, device)
        row["fwd_bwd_wall_ms"] = common.wall_ms(fwd_bwd, device)
        if on_gpu:
            row["fwd_ms"] = _try_time(fwd, device, graph=True)
            row["fwd_bwd_ms"] = _try_time(fwd_bwd, device, graph=True)
        else:
            row["fwd_ms"], row["fwd_bwd_ms"] = row["fwd_wall_ms"], row["fwd_bwd_wall_ms"]
        row["fwd_gbs"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
        row["fwd_frac_copy"] = row["fwd_gbs"] / copy_gbs
        if name == "fused":
            with torch.no_grad():
                _, _, rstd = deqkern.functional.update_with_stats(*check_in[:4], eps=EPS, damping=DAMPING, stop_mode=STOP)

            def bwd_kernel():
                ins = inputs.next()
                _update_backward_op(*(t.detach() for t in (ins[4], ins[0], ins[1], ins[3])), rstd, DAMPING, True, True)

            row["bwd_ms"] = _try_time(bwd_kernel, device, graph=on_gpu)
            row["bwd_gbs"] = bwd_bytes / (row["bwd_ms"] * 1e-3) / 1e9
            row["bwd_frac_copy"] = row["bwd_gbs"] / copy_gbs
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("eager", "compile"):
            for key in ("fwd_ms", "fwd_bwd_ms", "fwd_wall_ms", "fwd_bwd_wall_ms"):
                if base in by and key in r and key in by[base]:
                    r[f"{key}_speedup_vs_{base}"] = by[base][key] / r[key]
    return rows


def _variant_label(row: dict) -> str:
    backend = row.get("backend")
    return row["variant"] if backend in (None, "triton") else f"{row['variant']} ({backend})"


def _check_label(row: dict) -> str:
    return row["check"] + (" (not timed)" if "note" in row else "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(ap, DTYPES)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    variants = {"eager": lambda: eager_update}
    if device.type == "cuda":
        variants["compile"] = lambda: common.fresh_compile(eager_update)
    variants["fused"] = lambda: fused_update
    timed = set(variants) if device.type == "cuda" else {"eager"}
    if device.type != "cuda":
        print(common.CPU_NOTE)
    copy_gbs = common.copy_bandwidth_gbs(device)
    rows, skipped = common.sweep(sizes, args.dtype, DTYPES,
                                 lambda n, d, dtype: bench_size(n, d, dtype, device, copy_gbs, variants, timed))
    payload = {"environment": common.environment(device), "copy_bandwidth_gbs": copy_gbs,
               "damping": DAMPING, "stop_mode": STOP, "rows": rows, "skipped_time_budget": skipped}
    headers = ["dtype", "N×d", "variant", "check", "fwd wall ms", "fwd wall× eager", "fwd wall× compile",
               "fwd+bwd wall ms", "fwd+bwd wall× eager", "fwd+bwd wall× compile",
               "fwd ms", "fwd GB/s", "fwd % copy", "fwd× eager", "fwd× compile",
               "fwd+bwd ms", "fwd+bwd× eager", "fwd+bwd× compile", "bwd kernel % copy"]
    pct = lambda r, k: f"{100 * r[k]:.0f}%" if k in r else "-"  # noqa: E731
    table_rows = [[
        r["dtype"], f"{r['n']}×{r['d']}", _variant_label(r), _check_label(r),
        r.get("fwd_wall_ms", "-"), r.get("fwd_wall_ms_speedup_vs_eager", "-"),
        r.get("fwd_wall_ms_speedup_vs_compile", "-"), r.get("fwd_bwd_wall_ms", "-"),
        r.get("fwd_bwd_wall_ms_speedup_vs_eager", "-"), r.get("fwd_bwd_wall_ms_speedup_vs_compile", "-"),
        r.get("fwd_ms", "-"), r.get("fwd_gbs", "-"), pct(r, "fwd_frac_copy"), r.get("fwd_ms_speedup_vs_eager", "-"),
        r.get("fwd_ms_speedup_vs_compile", "-"), r.get("fwd_bwd_ms", "-"), r.get("fwd_bwd_ms_speedup_vs_eager", "-"),
        r.get("fwd_bwd_ms_speedup_vs_compile", "-"), pct(r, "bwd_frac_copy"),
    ] for r in rows]
    timing = ("device time: 20 calls captured in one CUDA graph, median replay / 20" if device.type == "cuda"
              else "CPU wall time, median")
    table = (f"Copy bandwidth (read+write): {copy_gbs:,.0f} GB/s. damping={DAMPING}, stop_mode={STOP}, "
             f"frozen (N, d) with gradient; fwd+bwd = forward + autograd.grad of all four inputs. 'wall' columns: "
             f"back-to-back calls, host included, synchronized only at the ends, median of 5 rounds; other ms "
             f"columns: {timing}.\n\n" + common.markdown_table(headers, table_rows))
    if skipped:
        table += "\n\nSkipped (run time budget reached): " + ", ".join(skipped)
    return common.publish(device, "update", payload, table, quick=args.quick)


if __name__ == "__main__":
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    main()
