"""Data-parallel training on torch.distributed (CPU, gloo, 2 processes): DDP and FSDP2
give the single process's losses and implicit gradients in every backward mode, the
spectral schedule leaves every rank with the same weights, checkpoints move between
world sizes. GPU variants (NCCL, graph=True) run where two CUDA devices are present.

The ranks run in spawned processes, joined with a deadline: a hang fails the test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deqkern.models.charlm import CharLMConfig
from deqkern.models.train import train
from deqkern.nn import FrozenContextDEQ, MambaMemory, SlotAttentionContext

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
D, SLOTS, TOKENS, CLASSES, ROWS_PER_RANK = 12, 3, 2, 7, 2
MODES = [("ift", True), ("ift", False), ("onestep", False), ("unrolled", False)]   # (backward, fused adjoint)
WRAPS = ["ddp", "fsdp", "fsdp-nested"]
DTYPES = [torch.float64, torch.float32]


class Case(NamedTuple):
    """One parity check. ``wrap``: "ddp", "fsdp" (the whole model one FSDP2 unit) or
    "fsdp-nested" (the DEQ layer its own unit, resharded after each call)."""

    wrap: str
    backward: str
    fused: bool                  # FrozenContextDEQ(fused_backward=...): the fused adjoint or autograd's
    dtype: torch.dtype
    compiled: bool = False       # torch.compile(wrapped model, backend="aot_eager")
    graph: bool = False          # FrozenContextDEQ(graph=True): CUDA only
    time_parallel: bool = False  # FrozenContextDEQ.forward_sequence (issue 13)

    def __str__(self) -> str:
        flags = [name for name in ("compiled", "graph", "time_parallel") if getattr(self, name)]
        return "-".join([self.wrap, self.backward + ("-fused" if self.fused else ""),
                         str(self.dtype).removeprefix("torch."), *flags])


#: Relative (Frobenius) error allowed between 2 ranks x b rows and 1 process x 2b rows.
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
GPUS = torch.cuda.device_count()
TINY = CharLMConfig.tiny()


# --------------------------------------------------------------------------- harness
def run_ranks(worker, folder: Path, *args, world: int = WORLD, timeout: float = 600.0) -> None:
    """Run ``worker(rank, world, folder, *args)`` in ``world`` spawned processes; fail
    (and kill them) if they are not all done within ``timeout`` seconds."""
    context = mp.start_processes(worker, args=(world, str(folder), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout:.0f} s (deadlock?)")


def _leave() -> None:
    """End a worker: every rank done, the group destroyed, then exit without running
    interpreter teardown (gloo's threads at exit aborted a rank now and then on a loaded
    CPU: "terminate called without an active exception", after all results were saved)."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _join(rank: int, world: int, folder: str, backend: str = "gloo") -> torch.device:
    torch.set_num_threads(1)
    os.environ["DEQKERN_BACKEND"] = "eager" if backend == "gloo" else "auto"
    device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{folder}/store-{backend}", rank=rank, world_size=world)
    return device


def _wrap(model: nn.Module, how: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if how == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # the mesh on the model's device (left to itself, FSDP2 picks the accelerator when there is one)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if how == "fsdp-nested":   # the DEQ layer its own unit: resharded after each of its calls
        fully_shard(model.deq, mesh=mesh)
        # FSDP2 gathers a unit's parameters around its forward; other entry points are declared
        register_fsdp_forward_method(model.deq, "forward_sequence")
    return fully_shard(model, mesh=mesh)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, dist.tensor.DTensor) else t


# --------------------------------------------------------------------------- the model
class SequenceNet(nn.Module):
    """The reference model's pattern, small: ``TOKENS`` solves of one FrozenContextDEQ
    (provider states carried, warm start), then a head. ``forward(x, h0)``: ``x``
    ``(B, TOKENS, SLOTS, D)``, ``h0`` ``(B, SLOTS, D)`` the first solve's start.
    ``time_parallel``: all tokens in one ``forward_sequence`` call instead (h0 unused)."""

    def __init__(self, backward: str, fused: bool, tol: float, graph: bool = False, time_parallel: bool = False):
        super().__init__()
        self.time_parallel = time_parallel
        self.deq = FrozenContextDEQ(D, contexts=[MambaMemory(D), SlotAttentionContext(D, n_heads=2)],
                                    backward=backward, fused_backward=fused, tol=tol, max_iter=60, b_tol=tol,
                                    check_every=1, on_nonconvergence="raise", graph=graph)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: torch.Tensor, h0: torch.Tensor):
        if self.time_parallel:
            h, _, info = self.deq.forward_sequence(x)
            return self.head(h.mean(2)), [info.get("sweeps")]
        state, h, outputs, iterations = None, h0, [], []
        for t in range(x.shape[1]):
            h, state, info = self.deq(x[:, t], state, h0=h.detach())
            outputs.append(h.mean(1))
            iterations.append(info["iterations"])
        return self.head(torch.stack(outputs, 1)), iterations


def _problem(case: Case, device: torch.device, tol: float = 0.0):
    """A fresh model and one global batch, the same on every rank. Rank 0's rows start
    at their fixed point, rank 1's at zero: the ranks need different iteration counts.
    ``tol`` 0: tight (1e-11 in float64, 1e-6 in float32)."""
    torch.manual_seed(1)
    dtype = case.dtype
    tol = tol or (1e-11 if dtype == torch.float64 else 1e-6)
    model = SequenceNet(case.backward, case.fused, tol, case.graph, case.time_parallel).to(device, dtype)
    rows = WORLD * ROWS_PER_RANK
    x = 3 * torch.randn(rows, TOKENS, SLOTS, D, device=device, dtype=dtype)
    target = torch.randint(0, CLASSES, (rows, TOKENS), device=device)
    with torch.no_grad():
        h_fixed = model.deq(x[:, 0], None)[0]
    h0 = torch.cat([h_fixed[:ROWS_PER_RANK], torch.zeros_like(h_fixed[ROWS_PER_RANK:])])
    return model, x, h0, target


def _loss(net: nn.Module, x, h0, target):
    logits, iterations = net(x, h0)
    return nn.functional.cross_entropy(logits.reshape(-1, CLASSES), target.reshape(-1)), iterations


# --------------------------------------------------------------------------- workers
def _parity_worker(rank: int, world: int, folder: str, backend: str, cases: list[Case]) -> None:
    """Per case: the loss and every parameter gradient of the wrapped model on this
    rank's rows, against one process on the whole batch (computed on rank 0). Rank 0
    saves the results."""
    device = _join(rank, world, folder, backend)
    results = {}
    for case in cases:
        model, x, h0, target = _problem(case, device)
        reference = None
        if rank == 0:
            ref_model = _problem(case, device)[0]
            ref_loss, _ = _loss(ref_model, x, h0, target)
            ref_loss.backward()
            reference = (ref_loss.detach().cpu(), {n: p.grad.cpu() for n, p in ref_model.named_parameters()})
        net = _wrap(model, case.wrap)
        if case.compiled:
            net = torch.compile(net, backend="aot_eager")
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        loss, iterations = _loss(net, x[rows], h0[rows], target[rows])
        resharded = isinstance(model.deq.weight, dist.tensor.DTensor)   # FSDP2 freed the gathered weight
        loss.backward()
        grads = {n: _full(p.grad).cpu() for n, p in model.named_parameters()}
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, iterations)
        if rank == 0:
            results[case] = {
                "loss": (global_loss / world).cpu(), "grads": grads, "ref_loss": reference[0],
                "ref_grads": reference[1], "iterations": per_rank, "resharded": resharded,
            }
        dist.barrier()
    if rank == 0:
        torch.save(results, Path(folder) / f"parity-{backend}.pt")
    _leave()


def _schedule_worker(rank: int, world: int, folder: str, steps: int) -> None:
    """``steps`` AdamW steps with the spectral schedule attached (every 2), on rank-local
    rows, under DDP and FSDP2; rank 0 saves every rank's final weights and u, v, sigma."""
    device = _join(rank, world, folder)
    out = {}
    for wrap in ("ddp", "fsdp"):
        model = _problem(Case(wrap, "ift", True, torch.float32), device, tol=1e-4)[0]
        net = _wrap(model, wrap)
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.05)
        schedule = model.deq.spectral_schedule(every=2)   # after wrapping: FSDP2 replaced the parameters
        schedule.attach(optimizer)
        generator = torch.Generator().manual_seed(100 + rank)
        clamped = 0
        for _ in range(steps):
            x = 3 * torch.randn(ROWS_PER_RANK, TOKENS, SLOTS, D, generator=generator)
            target = torch.randint(0, CLASSES, (ROWS_PER_RANK, TOKENS), generator=generator)
            loss, _ = _loss(net, x, torch.zeros_like(x[:, 0]), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            clamped += bool(schedule.step_count % 2 == 0 and schedule.sigma_tensor().max() > 0.85)
        state = schedule.state_dict()
        mine = {"params": {n: _full(p.detach()).cpu() for n, p in model.named_parameters()},
                "u": state["u"], "v": state["v"], "sigma": state["sigma"], "clamped": clamped,
                "step_count": schedule.step_count}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        out[wrap] = gathered
    if rank == 0:
        torch.save(out, Path(folder) / "schedule.pt")
    _leave()


def _train_worker(rank: int, world: int, folder: str) -> None:
    """The training loop on 2 ranks: straight, and saved at step 2 then resumed, with
    DDP and FSDP2; rank 0 saves the losses."""
    _join(rank, world, folder)
    out = {}
    for fsdp in (False, True):
        name = "fsdp" if fsdp else "ddp"
        path = Path(folder) / f"{name}.pt"
        straight = train(TINY, steps=4, seed=0, log_every=2, fsdp=fsdp)
        out[name], out[name + "-logs"] = straight.losses, straight.logs
        out[name + "-saved"] = train(TINY, steps=2, seed=0, log_every=2, fsdp=fsdp, save=path).losses
        out[name + "-resumed"] = train(TINY, steps=4, seed=0, log_every=2, fsdp=fsdp, resume=path).losses
    if rank == 0:
        torch.save(out, Path(folder) / "train.pt")
    _leave()


# --------------------------------------------------------------------------- layer parity
CPU_CASES = [Case(wrap, backward, fused, dtype) for wrap in WRAPS for backward, fused in MODES for dtype in DTYPES]
CPU_CASES += [Case(wrap, "ift", True, torch.float32, compiled=True) for wrap in ("ddp", "fsdp")]
GPU_CASES = [Case(wrap, backward, fused, torch.float32, graph=graph) for wrap in WRAPS for backward, fused in MODES
             for graph in (False, True) if not (graph and backward == "unrolled")]  # graph=True refuses unrolled
GPU_CASES += [Case(wrap, "ift", True, torch.float32, compiled=True) for wrap in ("ddp", "fsdp")]
SEQUENCE_CASES = [Case(wrap, "ift", fused, torch.float64, time_parallel=True) for wrap in WRAPS
                  for fused in (True, False)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _parity_errors(results: dict, cases: list[Case]) -> list[str]:
    """What differs, per case, beyond TOL between the ranks' loss and gradients and one process's."""
    errors = []
    for case in cases:
        result, tol = results[case], TOL[case.dtype]
        if _rel(result["loss"], result["ref_loss"]) > tol:
            errors.append(f"{case}: loss {result['loss'].item()!r} vs {result['ref_loss'].item()!r}")
        for name, ref in result["ref_grads"].items():
            if ref.norm() == 0:
                errors.append(f"{case}: {name}: the reference gradient is zero (nothing tested)")
            elif _rel(result["grads"][name], ref) > tol:
                errors.append(f"{case}: {name}: relative error {_rel(result['grads'][name], ref):.2e} > {tol:g}")
    return errors


# One spawn per test (not a module fixture shared by parametrized tests): under
# pytest-xdist a shared fixture would be re-run by every worker.
def test_two_ranks_match_one_process(tmp_path):
    """Loss and every parameter gradient of 2 ranks x b rows equal 1 process x 2b rows,
    for every backward mode, DDP and FSDP2 (whole model, and the DEQ layer resharded
    after each call: the fused adjoint then reads the weight FSDP2 re-gathers for the
    backward), with the ranks running different iteration counts."""
    run_ranks(_parity_worker, tmp_path, "gloo", CPU_CASES)
    results = torch.load(tmp_path / "parity-gloo.pt", weights_only=False)
    errors = _parity_errors(results, CPU_CASES)
    for case in CPU_CASES:
        first_solve = [iters[0] for iters in results[case]["iterations"]]
        if not first_solve[0] < first_solve[1]:     # rank 0 started at its fixed point
            errors.append(f"{case}: iterations of the first solve per rank {first_solve}: expected rank 0 < rank 1")
        if case.wrap == "fsdp-nested" and not results[case]["resharded"]:
            errors.append(f"{case}: FSDP2 did not free the gathered weight after the layer's forward")
    assert not errors, "\n".join(errors)


@pytest.mark.skipif(GPUS < WORLD, reason="needs 2 CUDA devices (NCCL)")
def test_two_gpus_match_one_gpu(tmp_path):
    """NCCL, with and without graph=True (the captured solves must not hold collectives)."""
    run_ranks(_parity_worker, tmp_path, "nccl", GPU_CASES)
    errors = _parity_errors(torch.load(tmp_path / "parity-nccl.pt", weights_only=False), GPU_CASES)
    assert not errors, "\n".join(errors)


@pytest.mark.skipif(not hasattr(FrozenContextDEQ, "forward_sequence"),
                    reason="enable once FrozenContextDEQ.forward_sequence (issue 13) lands")
def test_time_parallel_sequence_solve_matches(tmp_path):
    """The time-parallel sequence solve under DDP and FSDP2: the same parity as the token loop."""
    run_ranks(_parity_worker, tmp_path, "gloo", SEQUENCE_CASES)
    errors = _parity_errors(torch.load(tmp_path / "parity-gloo.pt", weights_only=False), SEQUENCE_CASES)
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- spectral schedule
def test_spectral_schedule_keeps_ranks_identical(tmp_path):
    """After 50 steps with clamps, every rank holds bitwise the same weights, u, v, sigma."""
    run_ranks(_schedule_worker, tmp_path, 50)
    out = torch.load(tmp_path / "schedule.pt", weights_only=False)
    for wrap, (first, second) in out.items():
        assert first["step_count"] == second["step_count"] == 50
        assert first["clamped"] >= 5, f"{wrap}: the schedule clamped only {first['clamped']} times"
        for name, value in first["params"].items():
            assert torch.equal(value, second["params"][name]), f"{wrap}: {name} differs across ranks"
        for key in ("u", "v"):
            assert torch.equal(first[key]["weight"], second[key]["weight"]), f"{wrap}: {key} differs across ranks"
        assert torch.equal(first["sigma"], second["sigma"])
        sigma = torch.linalg.matrix_norm(first["params"]["deq.weight"].double(), ord=2).item()
        assert sigma <= 0.85 * 1.2, f"{wrap}: ||W||_2 = {sigma:.3f}"


# --------------------------------------------------------------------------- training loop
def _close(a: list, b: list, rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_training_on_two_ranks(tmp_path, monkeypatch):
    """The training loop on 2 ranks (DDP and FSDP2) gives one process's losses; a
    checkpoint saved on 2 ranks resumes on 2 (bit for bit) and on 1 (the same losses)."""
    run_ranks(_train_worker, tmp_path)
    out = torch.load(tmp_path / "train.pt", weights_only=False)
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_run = train(TINY, steps=4, seed=0, log_every=2)
        single = single_run.losses
        on_one = {wrap: train(TINY, steps=4, seed=0, log_every=2, resume=tmp_path / f"{wrap}.pt")
                  for wrap in ("ddp", "fsdp")}
    finally:
        torch.set_num_threads(threads)
    for wrap in ("ddp", "fsdp"):
        assert _close(out[wrap], single), (wrap, out[wrap], single)
        for ours, theirs in zip(out[wrap + "-logs"], single_run.logs, strict=True):   # the global batch's figures
            assert _close([ours["loss"], ours["mean_nstep"]], [theirs["loss"], theirs["mean_nstep"]]), (ours, theirs)
            # batch-level statistics combined over ranks (ratio of RMS over each rank's rows;
            # each rank's loop stops on its own rows), not recomputed on the global batch
            assert _close([ours["hist_inj_ratio"], ours["contraction"]],
                          [theirs["hist_inj_ratio"], theirs["contraction"]], rel=1e-2), (ours, theirs)
            assert (ours["max_nstep"], ours["unconverged"], ours["tokens"]) == \
                (theirs["max_nstep"], theirs["unconverged"], theirs["tokens"])
        if wrap == "ddp":
            assert out[wrap + "-saved"] + out[wrap + "-resumed"] == out[wrap], wrap  # bit for bit
        else:  # FSDP2's reduce-scatter on gloo sums in varying order: two FSDP2 runs may differ as
            # much as either does from one process (seen: 4.5e-6 relative at the second step)
            assert _close(out[wrap + "-saved"] + out[wrap + "-resumed"], out[wrap]), wrap
        assert on_one[wrap].start_step == 2
        assert _close(on_one[wrap].losses, out[wrap + "-resumed"]), (wrap, on_one[wrap].losses)


def test_torchrun_cli_prints_the_single_process_losses(tmp_path):
    """``torchrun --nproc_per_node=2 -m deqkern --device cpu`` = ``python -m deqkern --device cpu``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEQKERN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    common = ["-m", "deqkern", "--config", "tiny", "--device", "cpu", "--steps", "2", "--log-every", "1"]
    losses = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={WORLD}"])):
        metrics = tmp_path / f"{name}.json"
        process = subprocess.Popen([sys.executable, *launcher, *common, "--metrics", str(metrics)], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{name}: the run did not finish within 300 s")
        assert process.returncode == 0, output
        losses[name] = json.loads(metrics.read_text())
        if name == "two":
            assert "2 ranks, DDP, 2 rows each" in output
            assert output.count("step     2 | loss") == 1, output     # rank 0 prints, once
    assert losses["two"]["world_size"] == WORLD
    assert _close(losses["two"]["losses"], losses["one"]["losses"])


def test_uneven_global_batch_refused(monkeypatch):
    from deqkern.models import distributed

    monkeypatch.setattr(distributed, "world", lambda: (1, 3))     # rank 1 of 3
    assert distributed.local_rows(torch.arange(6)).tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"\(5 rows\) must divide by the number of ranks \(3\)"):
        distributed.local_rows(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"cfg.batch=4 must divide by the number of ranks \(3\)"):
        train(TINY, steps=1)


def test_fsdp_without_process_group_refused():
    from deqkern.models import distributed

    with pytest.raises(ValueError, match="fsdp=True needs a process group"):
        distributed.wrap(nn.Linear(2, 2), fsdp=True)
