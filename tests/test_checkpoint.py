"""Checkpoints of the reference model's training (deqkern.models.checkpoint): bit-for-bit
resume in a fresh process, atomic writes, clear errors for bad or foreign files."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqkern.models import checkpoint
from deqkern.models.charlm import CharLM, CharLMConfig, batches
from deqkern.models.checkpoint import CheckpointError
from deqkern.models.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = CharLMConfig.tiny()


@pytest.fixture(autouse=True)
def eager_one_thread(monkeypatch, one_thread):
    """What the CLI runs on a CPU (eager, one thread): the resumed subprocess must match it bit for bit."""
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEQKERN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "deqkern", "--config", "tiny", "--device", "cpu", "--backend", "eager",
                           *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_resume_in_a_fresh_process_is_bitwise(tmp_path):
    """10 steps straight == 4 steps, a resume in a new process, 6 more: every loss and
    every parameter, optimizer moment and schedule vector bit for bit."""
    path = tmp_path / "run.pt"
    first = train(TINY, steps=4, seed=3, log_every=2, save=path)
    assert checkpoint.read(path)["step"] == 4
    out = _cli("--seed", "3", "--steps", "10", "--resume", str(path), "--save", str(path),
               "--metrics", str(tmp_path / "metrics.json"))
    assert out.returncode == 0, out.stderr
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["start_step"] == 4 and len(resumed["losses"]) == 6

    straight_path = tmp_path / "straight.pt"
    straight = train(TINY, steps=10, seed=3, log_every=5, save=straight_path)
    assert first.losses + resumed["losses"] == straight.losses   # exact floats (JSON round-trips them)
    ours, theirs = checkpoint.read(path), checkpoint.read(straight_path)
    assert ours["step"] == theirs["step"] == 10
    for key in ("model", "buffers", "optimizer", "schedule", "data", "rng"):
        _assert_bitwise(ours[key], theirs[key], key)


def _assert_bitwise(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_bitwise(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_the_schedule_state_is_what_keeps_a_resume_exact(tmp_path):
    """Why the checkpoint saves the spectral schedule: a resume with a fresh schedule
    (step counter 0, new vectors) trains on without error but diverges."""
    path = tmp_path / "run.pt"
    train(TINY, steps=3, seed=0, log_every=3, save=path)
    payload = checkpoint.read(path)
    # sigma(W) well above the target, so the clamp due at step 4 must act (whether
    # training alone pushes sigma past the target there depends on rounding)
    payload["model"]["deq.weight"] = payload["model"]["deq.weight"] * 2
    checkpoint.write_atomic(path, payload)
    exact = train(TINY, steps=6, seed=0, log_every=3, resume=path).losses
    torch.manual_seed(0)
    payload["schedule"] = CharLM(TINY).deq.spectral_schedule(every=TINY.spectral_every).state_dict()
    checkpoint.write_atomic(path, payload)
    without = train(TINY, steps=6, seed=0, log_every=3, resume=path).losses
    assert exact[0] == without[0]             # the clamps differ from step 4 on
    assert exact[1:] != without[1:]


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_checkpoint_raises_before_loading_anything(tmp_path, keep):
    path = tmp_path / "run.pt"
    train(TINY, steps=1, seed=0, log_every=1, save=path)
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data))])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.read(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(TINY, steps=2, seed=0, log_every=1, resume=path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint.read(tmp_path / "nope.pt")


def test_foreign_file_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(CharLM(TINY).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a deqkern training checkpoint"):
        checkpoint.read(path)


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    train(TINY, steps=2, seed=0, log_every=1, save=path)
    before = path.read_bytes()

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, steps=3, seed=0, log_every=1, resume=path, save=path)
    assert path.read_bytes() == before
    assert checkpoint.read(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]   # no partial file left


@pytest.mark.parametrize("change, message", [
    ({"d_model": 48}, "d_model 32 (checkpoint) vs 48 (this run)"),
    ({"batch": 8, "lr": 1e-3}, "batch 4 (checkpoint) vs 8 (this run); lr 0.005 (checkpoint) vs 0.001"),
    ({"dtype": torch.float64}, "dtype float32 (checkpoint) vs float64 (this run)"),
])
def test_other_configuration_refused(tmp_path, change, message):
    path = tmp_path / "run.pt"
    train(TINY, steps=1, seed=0, log_every=1, save=path)
    dtype = change.pop("dtype", torch.float32)
    cfg = dataclasses.replace(TINY, **change)
    with pytest.raises(CheckpointError, match="another configuration: " + re.escape(message)):
        train(cfg, steps=2, seed=0, log_every=1, resume=path, dtype=dtype)


def test_execution_settings_may_change_on_resume(tmp_path):
    """steps and graph say how to run, not what the model is: a resume may change them."""
    path = tmp_path / "run.pt"
    train(TINY, steps=1, seed=0, log_every=1, save=path)
    result = train(dataclasses.replace(TINY, steps=99), steps=2, seed=5, log_every=1, resume=path)
    assert result.start_step == 1 and len(result.losses) == 1


def test_resume_past_the_end_raises(tmp_path):
    path = tmp_path / "run.pt"
    train(TINY, steps=2, seed=0, log_every=1, save=path)
    with pytest.raises(ValueError, match="already at step 2"):
        train(TINY, steps=2, seed=0, log_every=1, resume=path)


def test_save_every_writes_periodically(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(checkpoint, "write_atomic", lambda path, payload: written.append(payload["step"]))
    train(TINY, steps=7, seed=0, log_every=7, save=tmp_path / "run.pt", save_every=3)
    assert written == [3, 6, 7]


def test_batch_stream_resumes_where_it_stopped():
    stream = batches(TINY, 11)
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(2)]
    fresh = batches(TINY, 0)
    fresh.load_state_dict(state)
    assert fresh.drawn == 3
    assert all(torch.equal(a, next(fresh)) for a in expected)


@pytest.mark.parametrize("argv, message", [
    (["--save-every", "0"], "--save-every must be >= 1; got 0"),
    (["--batch", "0"], "--batch must be >= 1; got 0"),
    (["--compare", "--save", "x.pt"], "--compare trains twice in one process: not with torchrun, --save or --resume"),
    (["--fsdp"], "--fsdp shards the model over the ranks of a torchrun launch"),
])
def test_cli_rejects_bad_checkpoint_and_launch_options(argv, message, capsys, monkeypatch):
    from deqkern.__main__ import parse_args

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
