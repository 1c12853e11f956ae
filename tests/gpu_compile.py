"""Compile deqkern's Triton kernels (the fused update forward and backward, the adjoint step,
the one-launch solves, the solver's bookkeeping) for an sm_90 GPU on a machine without one: the launchers run on CPU tensors with every Triton launch
recorded instead of run, then each recorded launch is compiled for ``cuda:90`` down to a
cubin (Triton's own frontend, passes and ptxas). Catches what the interpreter cannot: a
construct the compiler rejects (``tl.dot`` with K < 16, a type mismatch across branches of
a runtime ``if``) in the kernels' GPU configurations.

    python tests/gpu_compile.py        (TRITON_INTERPRET unset; tests/test_gpu_compile.py runs it)

Prints one line per compiled kernel and ``compiled N kernels``; exits 1 on the first failure.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without Triton's interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from deqkern.ops import adjoint, commit, launch, persistent, persistent_adjoint, persistent_split, stats, update  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
N_SM = 132
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
         torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.int8: "i8"}
recorded: list[tuple[JITFunction, dict, dict, dict]] = []


def record(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: the launch's signature, constexprs and options."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for param in self.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    if "DOT_F32" in constexprs:
        constexprs["DOT_F32"] = False  # the GPU's value (the interpreter's workaround is on for CPU tensors)
    recorded.append((self, signature, constexprs, options))


def launches() -> None:
    """The launchers, in the GPU configurations they would pick on an H200-sized device."""
    gen = torch.Generator().manual_seed(0)
    for dtype, n, d in ((torch.bfloat16, 256, 512), (torch.bfloat16, 100, 777), (torch.float16, 5, 3),
                        (torch.float32, 256, 512)):
        w = (torch.randn(d, d, generator=gen) / d).to(dtype)
        frozen, h0 = torch.randn(n, d, generator=gen).to(dtype), torch.zeros(n, d, dtype=dtype)
        gain, v = torch.ones(d, dtype=dtype), torch.randn(n, d, generator=gen)
        cfg = persistent_split.split_config(n, d, w.element_size(), N_SM, False)
        for config in (cfg, {**cfg, "ONE_DOT": not cfg["ONE_DOT"]}, {**cfg, "EXCHANGE": "z"},
                       {**cfg, "ONE_DOT": not cfg["ONE_DOT"], "EXCHANGE": "z"}):
            if config["ONE_DOT"] and (config["BLOCK_M"] + config["BLOCK_N"]) * max(16, d) * w.element_size() > 2**17:
                continue  # far past the tile the chooser would take
            for mode, rstd in (("rel", True), ("abs", False), ("max", False))[:3 if n == 256 else 1]:
                persistent_split.solve_split(w, frozen, gain, h0, 1e-6, 0.85, 20, 1e-4, mode, rstd, config=config)
            persistent_split.adjoint_split(w, frozen, gain, h0, v, 1e-6, 0.85, 20, 1e-4, config=config)
        block = persistent.persistent_config(n, d, w.element_size(), False, N_SM)
        saved = persistent.config_for
        persistent.config_for = lambda *a, block=block: block
        try:
            persistent.solve_triton(w, frozen, gain, h0, 1e-6, 0.85, 20, 1e-4, "rel", True)
            persistent_adjoint.adjoint_triton(w, frozen, gain, h0, v, 1e-6, 0.85, 20, 1e-4)
        finally:
            persistent.config_for = saved
    for dtype, n, d in ((torch.bfloat16, 4096, 1024), (torch.float32, 300, 97), (torch.float16, 8, 4096)):
        signal, h_prev, grad = (torch.randn(n, d, generator=gen).to(dtype) for _ in range(3))
        gain = torch.ones(d, dtype=dtype)
        for frozen in (torch.randn(n, d, generator=gen).to(dtype), torch.randn(d, generator=gen).to(dtype)):
            plan = update.UpdatePlan(signal, frozen, h_prev, gain, 1e-6, 0.85, "rel")
            plan.interpreted = False  # the backward's program count of a GPU
            _, _, rstd = plan.forward(signal, frozen, h_prev, gain)
            rstd = torch.rand(n, generator=gen)
            plan.backward(grad, signal, frozen, gain, rstd, True, True)
            plan.backward(grad, signal, frozen, gain, rstd, False, False)
        for u in (None, grad):
            adjoint.adjoint_step_triton(u, grad.float(), grad, signal, torch.rand(n, generator=gen), gain, 0.85, "rel")
    state = commit.RowState.start(300, torch.device("cpu"))
    x = torch.randn(300, 64, generator=gen)
    commit.commit_triton(x, x + 1, None, state, 1e-4, "rel", False)
    commit.commit_triton(x, x + 1, torch.rand(300, generator=gen), state, 1e-4, "abs", True)
    stats.check_triton(state.residual, state.nstep, 1e-4)
    for mode in ("rel", "max"):
        norm = None if mode == "max" else torch.rand(300, generator=gen)
        stats.summary_triton(state.residual, state.nstep, state.residual, state.nstep, state.prev, norm, 1e-4, mode)


def gpu_launch_config(n_rows: int, d: int, interpreted: bool, tile: int = launch.GPU_TILE) -> tuple:
    return launch.launch_config(n_rows, d, False, tile)


def main() -> int:
    saved = JITFunction.run, update.launch_config, adjoint.launch_config, update.sm_count
    JITFunction.run = record
    update.launch_config = adjoint.launch_config = gpu_launch_config  # a GPU's tiles, not the interpreter's
    update.sm_count = lambda index: N_SM
    try:
        launches()
    finally:
        JITFunction.run, update.launch_config, adjoint.launch_config, update.sm_count = saved
    seen = set()
    for fn, signature, constexprs, options in recorded:
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                                    options=options)
        except Exception as err:  # noqa: BLE001  (the report is the point)
            print(f"FAILED {fn.__name__} {constexprs} {options}:\n{err}", flush=True)
            return 1
        assert "cubin" in kernel.asm, fn.__name__
        print(f"ok {fn.__name__} {constexprs} {options}", flush=True)
    print(f"compiled {len(seen)} kernels", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
