"""DEQ-INR (torchdeq's deq-zoo image representation model) trained with
``f_solver="deqkern_anderson"`` vs torchdeq's ``"anderson"``: loss after N steps and time
per step.

    python bench/deq_inr.py [--steps 20] [--res 512] [--image camera|synthetic] [--skip-solver]
                            [--solvers anderson deqkern_anderson] [--device cuda|cpu] [--out PATH]

Model: our own code following deq-zoo/deq-inr's ``DEQINR`` in its camera configuration
(``configs/image_representation``: Fourier filter, MFN with 1 layer of width 256,
``input_scale`` 256): the injection ``u_0, u_1 = sin(A x + c)`` (``A`` scaled by
``input_scale / sqrt(2)``, ``c ~ U(-pi, pi)``), the cell ``f(z) = u_1 * (W (z + u_0) + b)``
with ``W`` under torchdeq's weight norm (``apply_norm`` / ``reset_norm``), the output
``Linear(256, 1)`` of the last state. The DEQ is ``get_deq`` on ``add_deq_args``'s
arguments with the zoo's ``--f_max_iter 100 --grad 3`` (torchdeq defaults otherwise:
``f_tol`` 1e-3, abs, sliced core, 1-step phantom gradient of 3 steps). Loss: MSE to the
image mapped to [-1, 1], every pixel each step, Adam lr 1e-3, states cached per pixel
between steps (the zoo's ``use_cached_input``). The zoo solves only at the first step
(later steps start from the cache with ``f_max_iter=0``): ``--skip-solver`` does that;
by default every step solves, which is what compares the solvers.

Image: ``skimage.data.camera()`` (the zoo's) when scikit-image is installed, else a
deterministic synthetic 8-bit grayscale image (disks, bars, a smooth gradient and a
fine texture); either is area-resized to ``--res`` (512: the zoo's size).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torchdeq  # noqa: E402
from torchdeq.norm import apply_norm, reset_norm  # noqa: E402

import deqkern.compat.torchdeq as dk_torchdeq  # noqa: E402

WIDTH, INPUT_SCALE, MAX_ITER, GRAD_STEPS, LR = 256, 256.0, 100, 3, 1e-3


def load_image(kind: str, res: int) -> tuple[torch.Tensor, str]:
    """``(res, res)`` float32 in [0, 1] and a description of its source."""
    if kind in ("camera", "auto"):
        try:
            import skimage.data

            img = torch.tensor(skimage.data.camera(), dtype=torch.float32) / 255
            source = "skimage.data.camera()"
        except ImportError:
            if kind == "camera":
                raise SystemExit("--image camera needs scikit-image (pip install scikit-image)")
            kind = "synthetic"
    if kind == "synthetic":
        t = torch.linspace(-1, 1, 512)
        y, x = torch.meshgrid(t, t, indexing="ij")
        img = 0.35 + 0.25 * x
        for cx, cy, r, v in ((-0.4, -0.3, 0.35, 0.9), (0.45, 0.2, 0.25, 0.1), (0.1, 0.6, 0.15, 0.7)):
            img = torch.where((x - cx) ** 2 + (y - cy) ** 2 < r * r, torch.full_like(img, v), img)
        img = torch.where((x > 0.55) & (x < 0.75) & (y < -0.1), 0.95 - 0.5 * (y + 1), img)
        img = img + 0.05 * torch.sin(40 * x) * torch.sin(37 * y)
        img = (img.clamp(0, 1) * 255).round() / 255
        source = "synthetic (disks, bars, gradient, texture; deterministic)"
    img = F.interpolate(img[None, None], size=(res, res), mode="area")[0, 0]
    return img, source


class DEQINR(nn.Module):
    """deq-zoo's DEQINR, Fourier filter, MFN of one layer (see the module docstring)."""

    def __init__(self, deq_args: argparse.Namespace):
        super().__init__()
        n_chunks = 2  # n_layers + 1
        self.x_map = nn.Linear(2, WIDTH * n_chunks)
        with torch.no_grad():
            self.x_map.weight.mul_(INPUT_SCALE / math.sqrt(n_chunks))
            self.x_map.bias.uniform_(-math.pi, math.pi)
        self.f = nn.Module()
        self.f.z_map = nn.Linear(WIDTH, WIDTH)
        nn.init.uniform_(self.f.z_map.weight, -math.sqrt(1 / WIDTH), math.sqrt(1 / WIDTH))
        self.output_map = nn.Linear(WIDTH, 1)
        apply_norm(self.f, args=deq_args)
        self.deq = torchdeq.get_deq(deq_args)

    def forward(self, coords: torch.Tensor, z: torch.Tensor, solve: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        u0, u1 = torch.sin(self.x_map(coords)).chunk(2, dim=-1)
        reset_norm(self.f)
        z_out, info = self.deq(lambda z: u1 * self.f.z_map(z + u0), z,
                               solver_kwargs={} if solve else {"f_max_iter": 0})
        return self.output_map(z_out[-1]), z_out[-1], info


def train(solver: str, coords: torch.Tensor, target: torch.Tensor, steps: int, skip_solver: bool,
          device: torch.device) -> dict:
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)  # after dk_torchdeq.register(): accepts deqkern's solvers
    deq_args = parser.parse_args(["--f_solver", solver, "--b_solver", solver, "--f_max_iter", str(MAX_ITER),
                                  "--grad", str(GRAD_STEPS)])
    torch.manual_seed(0)
    model = DEQINR(deq_args).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    z_cache = torch.zeros(coords.shape[0], WIDTH, device=device)
    losses, seconds, nsteps = [], [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out, z_star, info = model(coords, z_cache, solve=not (skip_solver and step > 0))
        z_cache = z_star.detach()
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # a sync, as the zoo's logging does
        seconds.append(time.perf_counter() - start)
        nsteps.append(info["nstep"].float().mean().item())
    return {"solver": solver, "losses": losses, "seconds": seconds, "mean_nstep": nsteps,
            "ms_per_step": 1e3 * sum(seconds[1:]) / max(len(seconds) - 1, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--image", default="auto", choices=["auto", "camera", "synthetic"])
    ap.add_argument("--skip-solver", action="store_true", help="solve at the first step only, as the zoo")
    ap.add_argument("--solvers", nargs="+", default=["anderson", "deqkern_anderson"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written next to it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dk_torchdeq.register()
    img, source = load_image(args.image, args.res)
    grid = torch.linspace(-1, 1, args.res)
    coords = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1).reshape(-1, 2).to(device)
    target = (img.reshape(-1, 1) * 2 - 1).to(device)
    runs = [train(s, coords, target, args.steps, args.skip_solver, device) for s in args.solvers]
    base = runs[0]["losses"][-1]
    table = common.markdown_table(
        ["f_solver", f"loss after {args.steps} steps", "rel. diff to " + args.solvers[0], "ms / step",
         "× " + args.solvers[0], "mean forward steps (last)"],
        [[r["solver"], r["losses"][-1], abs(r["losses"][-1] - base) / base, r["ms_per_step"],
          runs[0]["ms_per_step"] / r["ms_per_step"], r["mean_nstep"][-1]] for r in runs])
    table += (f"\n\nImage: {source}, {args.res}x{args.res} ({args.res ** 2} pixels per step). "
              f"{'Solver at the first step only (--skip-solver).' if args.skip_solver else 'Solver at every step.'} "
              f"ms / step: mean wall time of steps 2..{args.steps}, host included.")
    payload = {"environment": common.environment(device), "image": source, "res": args.res, "steps": args.steps,
               "skip_solver": args.skip_solver, "runs": runs}
    return common.publish(device, "deq_inr", payload, table, out=None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
