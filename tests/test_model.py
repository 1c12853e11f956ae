"""The reference model (deqkern.models.charlm) and ``python -m deqkern``, at CPU scale."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deqkern
from deqkern.models.charlm import CharLM, CharLMConfig, batches, corpus
from deqkern.models.train import train
from deqkern.nn.sequence import DEFAULT_INNER_ITER

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["time-parallel", "token-loop"])
def trained(request):
    """The tiny config trained for 40 steps on the eager backend, time-parallel (the
    default) and token by token (shared by the checks below)."""
    previous_threads, previous_backend = torch.get_num_threads(), os.environ.get("DEQKERN_BACKEND")
    torch.set_num_threads(1)
    os.environ["DEQKERN_BACKEND"] = "eager"
    cfg = dataclasses.replace(CharLMConfig.tiny(), token_loop=request.param == "token-loop")
    try:
        yield train(cfg, steps=40, seed=0, log_every=5)
    finally:
        torch.set_num_threads(previous_threads)
        if previous_backend is None:
            os.environ.pop("DEQKERN_BACKEND", None)
        else:
            os.environ["DEQKERN_BACKEND"] = previous_backend


def test_loss_decreases(trained):
    first, last = trained.logs[0]["loss"], trained.logs[-1]["loss"]
    assert last < first - 1.5, f"interval-mean loss {first:.3f} -> {last:.3f}"
    assert all(torch.isfinite(torch.tensor(trained.losses)))


def test_contraction_below_target_throughout(trained):
    contractions = [log["contraction"] for log in trained.logs]
    assert max(contractions) < 0.85, contractions


def test_every_token_converged_during_training(trained):
    unconverged = [log["unconverged"] for log in trained.logs]
    assert sum(unconverged) == 0, unconverged
    if trained.model.cfg.token_loop:
        assert max(log["max_nstep"] for log in trained.logs) <= 20
        assert all(log["sweeps"] == 0 for log in trained.logs)
    else:  # a handful of sweeps, far below the cap (T + max_iter / inner_iter)
        assert 1 < max(log["sweeps"] for log in trained.logs) <= 12


def test_trained_model_converges_fast(trained, monkeypatch, one_thread):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    cfg = trained.model.cfg
    tokens = next(batches(cfg, seed=123))
    with torch.no_grad():
        logits, stats = trained.model(tokens[:, :-1])
    assert logits.shape == (cfg.batch, cfg.seq_len, 256)
    assert stats["unconverged"].item() == 0
    assert stats["contraction"].item() < 0.85
    if cfg.token_loop:
        assert stats["max_nstep"].item() <= cfg.max_iter
        assert stats["mean_nstep"].item() < 10
    else:  # batched cell applications: inner_iter per sweep, plus the joint checks
        assert stats["sweeps"].item() <= 10
        assert stats["mean_nstep"].item() <= (DEFAULT_INNER_ITER + 1) * stats["sweeps"].item()


def test_time_parallel_trains_like_the_token_loop(monkeypatch, one_thread):
    """Same seed, 20 steps: every step's loss within 1% of the token loop's (the two
    solve the same fixed points; the gradients differ by the solves' tolerances)."""
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    cfg = CharLMConfig.tiny()
    parallel = train(cfg, steps=20, seed=3, log_every=10).losses
    loop = train(dataclasses.replace(cfg, token_loop=True), steps=20, seed=3, log_every=10).losses
    assert parallel == pytest.approx(loop, rel=1e-2)
    assert parallel[0] == pytest.approx(loop[0], rel=1e-5)  # same parameters: same fixed points


def test_fused_and_eager_train_alike(monkeypatch, one_thread, device):
    """Same seed, two steps: the Triton kernels (interpreted on a CPU) and eager agree."""
    cfg = dataclasses.replace(CharLMConfig.tiny(), seq_len=6)
    losses = {}
    for backend in ("triton", "eager"):
        monkeypatch.setenv("DEQKERN_BACKEND", backend)
        losses[backend] = train(cfg, steps=2, seed=1, log_every=1, device=device).losses
        assert deqkern.last_backend() == ("eager" if backend == "eager" else
                                          "triton" if torch.cuda.is_available() else "triton-interpreter")
    assert losses["triton"] == pytest.approx(losses["eager"], abs=1e-4)


def test_batches_deterministic_and_in_corpus():
    cfg = CharLMConfig.tiny()
    a, b, c = next(batches(cfg, 7)), next(batches(cfg, 7)), next(batches(cfg, 8))
    assert a.shape == (cfg.batch, cfg.seq_len + 1) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = bytes(corpus().tolist())
    assert bytes(a[0].tolist()) in text


@pytest.mark.parametrize("overrides, match", [
    ({"d_model": 30, "n_heads": 4}, "n_heads"),
    ({"n_slots": 0}, "n_slots"),
    ({"damping": 1.5}, "damping"),
    ({"tol": 0.0}, "tol"),
    ({"inner_iter": 0}, "inner_iter"),
    ({"colors": 0}, "colors"),
    ({"b_tol": 0.0}, "b_tol"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CharLMConfig.tiny(), **overrides)


def _layer_and_inputs():
    torch.manual_seed(0)
    model = CharLM(CharLMConfig.tiny())
    cfg = model.cfg
    x = torch.randn(3, cfg.n_slots, cfg.d_model)
    return model.deq, x, model.deq.init_state(3, cfg.n_slots)


def test_wrong_d_model_raises(monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    layer, x, state = _layer_and_inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(3, x.shape[1], x.shape[2] + 1), state)
    with pytest.raises(ValueError, match="h0"):
        layer(x, state, h0=torch.zeros(3, x.shape[1], x.shape[2] + 1))


@pytest.mark.parametrize("which", ["memory_width", "slots_count", "slots_batch", "tuple_length"])
def test_mismatched_state_raises(monkeypatch, which):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    layer, x, (memory, slots) = _layer_and_inputs()
    bad = {
        "memory_width": (torch.zeros(3, x.shape[2] + 2), slots),
        "slots_count": (memory, torch.zeros(3, x.shape[1] + 1, x.shape[2])),
        "slots_batch": (memory, torch.zeros(2, x.shape[1], x.shape[2])),
        "tuple_length": (memory,),
    }[which]
    with pytest.raises(ValueError):
        layer(x, bad)


def test_bad_tokens_raise():
    model = CharLM(CharLMConfig.tiny())
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 5))                         # float
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(5, dtype=torch.long))          # 1-D


def _cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEQKERN_BACKEND")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "deqkern", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("mode", ["time-parallel", "token-loop"])
def test_cli_train_smoke(mode):
    out = _cli("--steps", "3", "--config", "tiny", "--device", "cpu", *(["--token-loop"] if mode == "token-loop" else []))
    assert out.returncode == 0, out.stderr
    assert "step     3 | loss" in out.stdout
    assert "backend auto (ran: eager)" in out.stdout
    assert "100% of tokens converged (tol 0.0001, rel, cap 20): yes" in out.stdout
    if mode == "token-loop":
        assert "| sweeps - |" in out.stdout and "(token loop)" in out.stdout
    else:
        sweeps = float(out.stdout.split("| sweeps ")[1].split()[0])
        assert 1 < sweeps <= 12 and "(time-parallel)" in out.stdout


def test_cli_compare_smoke():
    """Eager then fused from one seed (on a CPU the kernels run in the interpreter)."""
    interpreter = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    out = _cli("--compare", "--steps", "1", "--config", "tiny", **interpreter)
    assert out.returncode == 0, out.stderr
    assert "=== backend eager ===" in out.stdout and "=== backend triton ===" in out.stdout
    diff = float(out.stdout.split("largest |loss difference| over 1 steps: ")[1].split()[0])
    assert diff < 1e-4


def test_cli_check_smoke():
    out = _cli("check", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    errors = [float(line.split("h_next ")[1].split(",")[0]) for line in out.stdout.splitlines() if "h_next" in line]
    assert errors and max(errors) < 1e-4, out.stdout


def test_cli_rejects_triton_without_kernels():
    if torch.cuda.is_available():
        pytest.skip("the kernels can run here")
    out = _cli("--backend", "triton", "--device", "cpu", "--steps", "1")
    assert out.returncode == 2
    assert "--backend triton needs the Triton kernels" in out.stderr
