"""Plots from a results folder's JSON files, then its SUMMARY.md.

    python bench/plot.py bench/results/<device-slug>      (or: python -m bench.plot DIR)

Reads ``update*.json``, ``iteration*.json`` and ``solve*.json`` (a full run's file is
preferred to a ``_quick`` one) and writes, next to them:

- ``speedup_update.png``: the fused update op's speedup over eager and torch.compile
  (forward, forward+backward), by problem size, one panel per dtype;
- ``speedup_iteration.png``: one iteration's speedup, and time / floor per variant;
- ``speedup_solve.png``: deqkern's forward-solve and train-step speedups;
- ``solve_time_vs_iterations.png``: ms per forward solve against iterations run;
- ``bandwidth_update.png``: achieved GB/s of each update variant against the copy
  bandwidth measured in the same run.

A plot with nothing timed to show (a CPU run times eager only) is not drawn. Only the
committed JSON is needed, so the plots can be drawn on any machine with matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPE_ORDER = ("bfloat16", "float16", "float32")


def load(folder: Path, kind: str) -> dict | None:
    """``<kind>.json`` if present, else ``<kind>_quick.json``; for "solve" also the
    one-phase files ``solve_forward[_quick].json`` + ``solve_train[_quick].json``,
    merged. None if there is none."""
    for suffix in ("", "_quick"):
        if (folder / f"{kind}{suffix}.json").exists():
            return json.loads((folder / f"{kind}{suffix}.json").read_text())
        parts = [folder / f"{kind}_{phase}{suffix}.json" for phase in ("forward", "train")]
        parts = [json.loads(p.read_text()) for p in parts if kind == "solve" and p.exists()]
        if parts:
            return {**parts[0], "rows": [r for part in parts for r in part["rows"]]}
    return None


def _sizes(rows: list[dict]) -> list[tuple[int, int]]:
    return sorted({(r["n"], r["d"]) for r in rows}, key=lambda s: (s[0] * s[1], s))


def _dtypes(rows: list[dict]) -> list[str]:
    present = {r["dtype"] for r in rows}
    return [d for d in DTYPE_ORDER if d in present] + sorted(present - set(DTYPE_ORDER))


def _panels(n_cols: int, n_rows: int = 1, width: float = 5.0, height: float = 3.6):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def _size_axis(ax, sizes):
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"{n}×{d}" for n, d in sizes], rotation=20)
    ax.set_xlabel("N × d")
    ax.grid(True, alpha=0.3)


def _series(ax, rows, sizes, dtype, select: dict, key: str, label: str, **style) -> bool:
    """Plot ``key`` of the rows matching ``select`` at each size; False if none had it."""
    xs, ys = [], []
    for i, (n, d) in enumerate(sizes):
        for r in rows:
            if (r["n"], r["d"], r["dtype"]) == (n, d, dtype) and all(r.get(k) == v for k, v in select.items()):
                value = r.get(key)
                if isinstance(value, (int, float)) and value == value:
                    xs.append(i)
                    ys.append(value)
    if xs:
        ax.plot(xs, ys, marker="o", label=label, **style)
    return bool(xs)


def _legend(ax, fontsize: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _finish(fig, path: Path, drawn: bool, title: str) -> bool:
    if drawn:
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.2 if fig.legends else 0, 1, 1))
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")
    else:
        print(f"skipped {path.name}: nothing timed to compare")
    plt.close(fig)
    return drawn


def plot_update(folder: Path, data: dict) -> list[bool]:
    rows = data["rows"]
    sizes, dtypes = _sizes(rows), _dtypes(rows)
    fig, axes = _panels(len(dtypes))
    drawn = False
    for ax, dtype in zip(axes[0], dtypes):
        for key, label in (("fwd_ms_speedup_vs_eager", "fwd × eager"), ("fwd_ms_speedup_vs_compile", "fwd × compile"),
                           ("fwd_bwd_ms_speedup_vs_eager", "fwd+bwd × eager"),
                           ("fwd_bwd_ms_speedup_vs_compile", "fwd+bwd × compile"),
                           ("fwd_wall_ms_speedup_vs_compile", "fwd × compile (wall)"),
                           ("fwd_bwd_wall_ms_speedup_vs_compile", "fwd+bwd × compile (wall)")):
            drawn |= _series(ax, rows, sizes, dtype, {"variant": "fused"}, key, label)
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_title(f"fused update, {dtype}")
        ax.set_ylabel("speedup (×)")
        _size_axis(ax, sizes)
        _legend(ax, 8)
    out = [_finish(fig, folder / "speedup_update.png", drawn, "Update op: fused speedup (device time; wall where marked)")]

    fig, axes = _panels(len(dtypes))
    drawn = False
    for ax, dtype in zip(axes[0], dtypes):
        for variant in ("eager", "compile", "fused"):
            drawn |= _series(ax, rows, sizes, dtype, {"variant": variant}, "fwd_gbs", f"{variant} fwd")
        _series(ax, rows, sizes, dtype, {"variant": "fused"}, "bwd_gbs", "fused bwd kernel", ls=":")
        ax.axhline(data["copy_bandwidth_gbs"], color="black", lw=1, ls="--", label="copy bandwidth")
        ax.set_title(f"update op, {dtype}")
        ax.set_ylabel("GB/s (bytes read + written)")
        _size_axis(ax, sizes)
        _legend(ax, 8)
    out.append(_finish(fig, folder / "bandwidth_update.png", drawn, "Update op: achieved bandwidth"))
    return out


def plot_iteration(folder: Path, data: dict) -> list[bool]:
    rows = data["rows"]
    sizes, dtypes = _sizes(rows), _dtypes(rows)
    fig, axes = _panels(len(dtypes), 2)
    drawn = False
    for col, dtype in enumerate(dtypes):
        ax = axes[0][col]
        for key, label in (("ms_speedup_vs_eager", "fused × eager"), ("ms_speedup_vs_compile", "fused × compile"),
                           ("wall_ms_speedup_vs_eager", "fused × eager (wall time)")):
            drawn |= _series(ax, rows, sizes, dtype, {"variant": "fused"}, key, label)
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_title(f"one iteration, {dtype}")
        ax.set_ylabel("speedup (×)")
        _size_axis(ax, sizes)
        _legend(ax, 8)
        ax = axes[1][col]
        for variant in ("eager", "compile", "fused"):
            _series(ax, rows, sizes, dtype, {"variant": variant}, "time_over_floor", variant)
        ax.axhline(1.0, color="black", lw=1, ls="--", label="floor (GEMM + update bytes at copy BW)")
        ax.set_ylabel("time / floor")
        _size_axis(ax, sizes)
        _legend(ax, 8)
    return [_finish(fig, folder / "speedup_iteration.png", drawn, "One iteration: GEMM + update")]


SOLVE_SERIES = (
    ("forward", "deqkern", "xw_eager-item", "fwd deqkern × eager-item"),
    ("forward", "deqkern-graph", "xw_eager-item", "fwd deqkern-graph × eager-item"),
    ("forward", "deqkern-graph", "xw_eager-graph", "fwd deqkern-graph × eager-graph"),
    ("forward", "deqkern", "xw_compile-item", "fwd deqkern × compile-item"),
    ("train", "deqkern-ift", "xw_torchdeq-ift", "train deqkern-ift × torchdeq-ift"),
    ("train", "deqkern-ift", "xw_torchdeq-1step", "train deqkern-ift × torchdeq-1step"),
    ("train", "deqkern-ift", "xw_compile-unrolled", "train deqkern-ift × compile-unrolled"),
)


def plot_solve(folder: Path, data: dict) -> list[bool]:
    rows = data["rows"]
    sizes, dtypes = _sizes(rows), _dtypes(rows)
    fig, axes = _panels(len(dtypes), width=6.0)
    drawn = False
    for ax, dtype in zip(axes[0], dtypes):
        for phase, variant, key, label in SOLVE_SERIES:
            drawn |= _series(ax, rows, sizes, dtype, {"phase": phase, "variant": variant}, key, label,
                             ls="-" if phase == "forward" else "--")
        ax.axhline(1.0, color="gray", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"solve / train step, {dtype}")
        ax.set_ylabel("speedup (×, log)")
        _size_axis(ax, sizes)
    labelled = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    if labelled:
        fig.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=3, fontsize=8)
        fig.set_figheight(fig.get_figheight() + 1.0)
    out = [_finish(fig, folder / "speedup_solve.png", drawn, "Picard solve: deqkern speedups")]

    forward = [r for r in rows if r["phase"] == "forward" and "ms" in r and r.get("iterations")]
    f_dtypes, f_sizes = _dtypes(forward), _sizes(forward)
    fig, axes = _panels(max(1, len(f_sizes)), max(1, len(f_dtypes)), width=4.2, height=3.4)
    variants = sorted({r["variant"] for r in forward})
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    for row_axes, dtype in zip(axes, f_dtypes):
        for ax, (n, d) in zip(row_axes, f_sizes):
            for r in forward:
                if (r["dtype"], r["n"], r["d"]) == (dtype, n, d):
                    ax.scatter(r["iterations"], r["ms"], color=colors[r["variant"]], label=r["variant"])
            ax.set_yscale("log")
            ax.set_title(f"{dtype} {n}×{d}")
            ax.set_xlabel("iterations run")
            ax.set_ylabel("ms per solve (log)")
            ax.grid(True, alpha=0.3)
    if forward:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colors[v], label=v) for v in variants]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(variants), 8), fontsize=8)
        fig.subplots_adjust(bottom=0.18)
    out.append(_finish(fig, folder / "solve_time_vs_iterations.png", bool(forward),
                       "Forward solve: time vs iterations"))
    return out


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a results folder, e.g. bench/results/nvidia-h100-80gb-hbm3")
    args = ap.parse_args(argv)
    folder = args.folder
    if not folder.is_dir():
        ap.error(f"{folder} is not a folder")
    for name in common.PLOTS:  # a plot from an older run must not outlive its data
        (folder / name).unlink(missing_ok=True)
    for kind, draw in (("update", plot_update), ("iteration", plot_iteration), ("solve", plot_solve)):
        data = load(folder, kind)
        if data is None:
            print(f"no {kind}.json in {folder}: its plots are not drawn")
            continue
        draw(folder, data)
    summary = common.write_summary(folder)
    print(f"wrote {summary}")
    return [folder / name for name in common.PLOTS if (folder / name).exists()]


if __name__ == "__main__":
    main()
