"""Fused frozen-context RMSNorm update vs eager vs torch.compile(eager).

    python bench/bench_update.py [--dtype bf16 fp32] [--sizes 8192x512 ...] [--quick]

Forward alone, forward+backward, and the fused backward kernel alone; achieved GB/s
against the device-to-device copy bandwidth measured in the same run. Every variant's
output is compared with the eager result before it is timed (a wrong fast kernel is
reported as FAIL). On a CPU-only machine only eager is timed.
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
DEFAULT_SIZES = ["8192x512", "8192x1024", "32768x1024", "16384x2048", "65536x256"]
DAMPING, EPS, STOP = 0.85, 1e-6, "rel"


def eager_update(signal, frozen, h_prev, gain):
    h, res, _ = update_reference(signal, frozen, h_prev, gain, EPS, DAMPING, STOP)
    return h, res


def fused_update(signal, frozen, h_prev, gain):
    return deqkern.frozen_rmsnorm_update(signal, frozen, h_prev, gain, eps=EPS, damping=DAMPING, stop_mode=STOP)


def bench_size(n: int, d: int, dtype: torch.dtype, device: torch.device, copy_gbs: float, variants: dict) -> list[dict]:
    es = torch.finfo(dtype).bits // 8
    fwd_bytes = 4 * n * d * es + 8 * n + d * es
    bwd_bytes = 6 * n * d * es + 4 * n

    def make():
        s, f, p = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(3))
        g = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
        grad = torch.randn(n, d, device=device, dtype=dtype)
        return [t.requires_grad_() for t in (s, f, p, g)] + [grad]

    inputs = common.Rotating(make, 5 * n * d * es, device)
    check_in = inputs.sets[0]
    with torch.no_grad():
        h_ref, res_ref = eager_update(*check_in[:4])
    rows = []
    for name, fn in variants.items():
        with torch.no_grad():
            h, res = fn(*check_in[:4])
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3 if dtype == torch.float16 else 1e-5
        status = common.check_close("h_next", h, h_ref, tol)
        if status == "ok":
            status = common.check_close("residual", res, res_ref, 1e-4)
        row = {"n": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "variant": name, "check": status}
        if status == "ok":
            def fwd():
                ins = inputs.next()
                with torch.no_grad():
                    fn(*ins[:4])

            def fwd_bwd():
                ins = inputs.next()
                h, _ = fn(*ins[:4])
                torch.autograd.grad(h, ins[:4], ins[4])

            row["fwd_ms"] = common.time_ms(fwd, device)
            row["fwd_gbs"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
            row["fwd_frac_copy"] = row["fwd_gbs"] / copy_gbs
            row["fwd_bwd_ms"] = common.time_ms(fwd_bwd, device)
            if name == "fused":
                with torch.no_grad():
                    _, _, rstd = deqkern.functional.update_with_stats(*check_in[:4], eps=EPS, damping=DAMPING, stop_mode=STOP)

                def bwd_kernel():
                    ins = inputs.next()
                    _update_backward_op(ins[4], ins[0], ins[1], ins[3], rstd, DAMPING, True, True)

                row["bwd_ms"] = common.time_ms(bwd_kernel, device)
                row["bwd_gbs"] = bwd_bytes / (row["bwd_ms"] * 1e-3) / 1e9
                row["bwd_frac_copy"] = row["bwd_gbs"] / copy_gbs
                row["backend"] = deqkern.last_backend()
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("eager", "compile"):
            if base in by and "fwd_ms" in r and "fwd_ms" in by[base]:
                r[f"fwd_speedup_vs_{base}"] = by[base]["fwd_ms"] / r["fwd_ms"]
                r[f"fwd_bwd_speedup_vs_{base}"] = by[base]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--sizes", nargs="+", default=None, help="NxD, e.g. 8192x1024")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (["1024x256", "2048x512"] if args.quick else DEFAULT_SIZES)
    variants = {"eager": eager_update}
    if device.type == "cuda":
        variants["compile"] = torch.compile(eager_update, dynamic=False)
        variants["fused"] = fused_update
    else:
        print("CPU-only machine: timing eager only (the Triton interpreter is a correctness tool, not a speed baseline).")
    copy_gbs = common.copy_bandwidth_gbs(device)
    rows = []
    for dt in args.dtype:
        for size in sizes:
            n, d = (int(x) for x in size.lower().split("x"))
            rows.extend(bench_size(n, d, DTYPES[dt], device, copy_gbs, variants))
    payload = {"environment": common.environment(device), "copy_bandwidth_gbs": copy_gbs,
               "damping": DAMPING, "stop_mode": STOP, "rows": rows}
    headers = ["dtype", "N×d", "variant", "check", "fwd ms", "fwd GB/s", "fwd % copy", "fwd× eager", "fwd× compile",
               "fwd+bwd ms", "fwd+bwd× eager", "fwd+bwd× compile", "bwd kernel ms", "bwd % copy"]
    table_rows = [[
        r["dtype"], f"{r['n']}×{r['d']}", r["variant"], r["check"], r.get("fwd_ms", "-"), r.get("fwd_gbs", "-"),
        f"{100 * r['fwd_frac_copy']:.0f}%" if "fwd_frac_copy" in r else "-",
        r.get("fwd_speedup_vs_eager", "-"), r.get("fwd_speedup_vs_compile", "-"), r.get("fwd_bwd_ms", "-"),
        r.get("fwd_bwd_speedup_vs_eager", "-"), r.get("fwd_bwd_speedup_vs_compile", "-"), r.get("bwd_ms", "-"),
        f"{100 * r['bwd_frac_copy']:.0f}%" if "bwd_frac_copy" in r else "-",
    ] for r in rows]
    table = (f"Copy bandwidth (read+write): {copy_gbs:,.0f} GB/s. damping={DAMPING}, stop_mode={STOP}, "
             f"frozen (N, d) with gradient.\n\n" + common.markdown_table(headers, table_rows))
    out_dir = common.write_results(device, "update" + ("_quick" if args.quick else ""), payload, table)
    print(table)
    print(f"\nwritten to {out_dir}")
    return payload


if __name__ == "__main__":
    os.environ.setdefault("DEQKERN_BACKEND", "auto")
    main()
