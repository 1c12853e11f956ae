"""Generation from the reference model: CharLM.generate, deqkern.models.generation and
``python -m deqkern generate``, at CPU scale."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import warnings

import pytest
import torch

import deqkern
from deqkern.__main__ import main, parse_args
from deqkern.models.charlm import VOCAB, CharLM, CharLMConfig
from deqkern.models.checkpoint import CheckpointError
from deqkern.models.generation import load_model, timed_generate, to_text
from deqkern.models import token_step
from deqkern.models.train import train
from deqkern.solver import report as report_module
from deqkern.solver.errors import ConvergenceError, ConvergenceWarning, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one intra-op thread

ROOT = Path(__file__).resolve().parent.parent


def _model(dtype=torch.float64, seed=0, **overrides) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(dataclasses.replace(CharLMConfig.tiny(), **overrides)).to(dtype)


def _prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- CharLM.generate
@pytest.mark.parametrize("warm_start", [True, False])
@pytest.mark.parametrize("batch, length, n_tokens", [(1, 1, 6), (3, 7, 4)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_greedy_logits_equal_token_loop_forward(monkeypatch, warm_start, batch, length, n_tokens, scale):
    """float64: every position's logits (prompt and generated) are forward's token-loop
    logits of the generated sequence, and greedy picks their argmax; at any input scale."""
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model = _model(token_loop=True, warm_start=warm_start)
    with torch.no_grad():
        model.emb.weight.mul_(scale)
        model.slot_emb.mul_(scale)
    prompt = _prompt(batch, length)
    tokens, stats = model.generate(prompt, n_tokens, temperature=0)
    assert tokens.shape == (batch, length + n_tokens) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, :length], prompt)
    logits = stats["logits"]
    assert logits.shape == (batch, length + n_tokens - 1, VOCAB)
    with torch.no_grad():
        reference, ref_stats = model(tokens[:, :-1])
    assert (logits - reference).abs().max() <= 1e-12 * reference.abs().max()
    assert torch.equal(tokens[:, length:], logits[:, length - 1:].argmax(-1))
    assert stats["unconverged"].item() == 0 and stats["max_nstep"].item() <= model.cfg.max_iter
    assert stats["mean_nstep"].item() == pytest.approx(ref_stats["mean_nstep"].item(), rel=1e-12)
    assert 0 < stats["contraction"].item() < 1


def test_generation_matches_the_time_parallel_forward(monkeypatch):
    """The default (time-parallel) forward solves the same fixed points, to the solver's tolerance."""
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model = _model()
    tokens, stats = model.generate(_prompt(2, 5), 5, temperature=0)
    with torch.no_grad():
        reference, _ = model(tokens[:, :-1])
    assert (stats["logits"] - reference).abs().max() <= 1e-3 * reference.abs().max()


def test_generation_on_the_fused_kernels(fused, monkeypatch, device):
    """float32 on the Triton kernels (interpreted on a CPU): the token loop's logits, and
    eager's within float32 rounding carried through the solves."""
    model = _model(torch.float32, token_loop=True).to(device)
    prompt = _prompt(2, 3).to(device)
    tokens, stats = model.generate(prompt, 3, temperature=0)
    assert deqkern.last_backend() == "triton-persistent"  # the layer solves each token with solve_cell
    with torch.no_grad():
        reference, _ = model(tokens[:, :-1])
    scale = reference.abs().max()
    assert (stats["logits"] - reference).abs().max() <= 1e-5 * scale
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    eager_tokens, eager_stats = model.generate(prompt, 3, temperature=0)
    assert torch.equal(eager_tokens, tokens)
    assert (eager_stats["logits"] - stats["logits"]).abs().max() <= 1e-3 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph=True needs CUDA")
def test_graph_generation_matches_the_default_path():
    """graph=True (every solve replayed from a CUDA graph, max_iter iterations) gives the
    default path's logits to the solver's tolerance."""
    prompt = _prompt(2, 4).cuda()
    results = []
    for graph in (False, True):
        model = _model(torch.float32, graph=graph).cuda()
        results.append(model.generate(prompt, 4, temperature=0)[1]["logits"])
    assert (results[1] - results[0]).abs().max() <= 1e-2 * results[0].abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("temperature, seeded", [(0, False), (0.8, True), (0.8, False)])
def test_step_graph_generation_equals_the_uncaptured_steps(monkeypatch, temperature, seeded):
    """Each whole token step replayed from a CUDA graph (the default on CUDA): one capture,
    and the same tokens, logits and statistics as the
    same steps run without capture (sampling from a seeded or the global generator)."""
    model = _model(torch.float32).cuda()
    prompt = _prompt(3, 4).cuda()
    captured = []
    capture = token_step.TokenSteps._capture
    monkeypatch.setattr(token_step.TokenSteps, "_capture", lambda self: captured.append(1) or capture(self))
    results = {}
    for graph in (None, False):
        generator = torch.Generator("cuda").manual_seed(3) if seeded else None
        torch.cuda.manual_seed(11)
        results[graph] = model.generate(prompt, 7, temperature=temperature, generator=generator, step_graph=graph)
    assert captured == [1]
    (tokens, stats), (ref_tokens, ref_stats) = results[None], results[False]
    assert torch.equal(tokens, ref_tokens)
    assert (stats["logits"] - ref_stats["logits"]).abs().max() <= 1e-5 * ref_stats["logits"].abs().max()
    for key in ("mean_nstep", "max_nstep", "unconverged"):
        assert stats[key].item() == ref_stats[key].item(), key


def test_step_graph_argument():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="step_graph=True: .*the model is on cpu, not a CUDA device"):
        model.generate(_prompt(1, 2), 1, step_graph=True)
    with pytest.raises(TypeError, match="step_graph must be a bool or None; got int"):
        model.generate(_prompt(1, 2), 1, step_graph=1)


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_nonconvergence_policy_applied_once_after_the_last_token(monkeypatch, policy):
    """No host check between tokens (the solver's reads fail the test); the layer's
    policy is applied once, to the rows of every step, and the layer keeps its policy."""
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    monkeypatch.setattr(report_module, "read_check", _no_host_read)
    monkeypatch.setattr(report_module, "host_check", _no_host_read)
    model = _model(torch.float32, max_iter=2, tol=1e-6)
    model.deq.solver_options["on_nonconvergence"] = policy
    steps = 3 + 4 - 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if policy == "raise":
            with pytest.raises(ConvergenceError, match=r"CharLM.generate: .* of 24 row\(s\) did not converge") as err:
                model.generate(_prompt(2, 3), 4, temperature=0)
            assert 0 < err.value.unconverged <= 24 and err.value.info["logits"].shape == (2, steps, VOCAB)
        else:
            stats = model.generate(_prompt(2, 3), 4, temperature=0)[1]
            assert 0 < stats["unconverged"].item() <= 2 * model.cfg.n_slots * steps
    convergence = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(convergence) == (policy == "warn")
    if policy == "warn":
        assert f"{int(stats['unconverged'].item())} of 24 row(s)" in str(convergence[0].message)
    assert model.deq.solver_options["on_nonconvergence"] == policy


def test_nonfinite_fixed_point_raises_after_the_last_token(monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model = _model(torch.float32)
    model.deq.solver_options["on_nonconvergence"] = "ignore"
    with torch.no_grad():
        model.emb.weight[7] = float("nan")
    prompt = torch.tensor([[1, 2, 7, 3]])
    with pytest.raises(NonFiniteError, match="non-finite fixed points in 6 row.*first at the step for position 2"):
        model.generate(prompt, 2, temperature=0)


def _no_host_read(*args):
    raise AssertionError("a host read of a solve's check during generation")


def test_sampling_reproducible_from_a_seed(monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model = _model(torch.float32)
    prompt = _prompt(2, 3)

    def sample(seed: int, temperature: float = 1.0) -> torch.Tensor:
        return model.generate(prompt, 12, temperature=temperature, generator=torch.Generator().manual_seed(seed))[0]

    first = sample(5)
    assert torch.equal(first, sample(5))
    assert not torch.equal(first, sample(6))
    assert first.min() >= 0 and first.max() < VOCAB
    torch.manual_seed(9)
    global_rng = model.generate(prompt, 12, temperature=1.0)[0]
    torch.manual_seed(9)
    assert torch.equal(global_rng, model.generate(prompt, 12, temperature=1.0)[0])
    # a vanishing temperature is greedy (no inf / inf), whatever the seed
    assert torch.equal(sample(5, 1e-30), model.generate(prompt, 12, temperature=0)[0])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_samples_follow_softmax_over_temperature(monkeypatch, temperature):
    """50000 sequences with one prompt: the first sampled byte's counts fit
    softmax(logits / temperature) of the prompt's last position (Pearson's chi-square,
    255 degrees of freedom, below mean + 5 sd), and do not fit temperature x 1.5 or / 1.5."""
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model = _model(torch.float32)
    n = 50000
    prompt = _prompt(1, 2).expand(n, 2).contiguous()
    tokens, stats = model.generate(prompt, 1, temperature=temperature, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens[:, -1], minlength=VOCAB).double() / n
    logits = stats["logits"][0, -1].double()
    assert torch.equal(stats["logits"][0, -1].expand(n, VOCAB), stats["logits"][:, -1])  # one distribution

    def chi_square(t: float) -> float:
        probs = (logits / t).softmax(-1)
        return (n * (freq - probs) ** 2 / probs).sum().item()

    bound = (VOCAB - 1) + 5 * (2 * (VOCAB - 1)) ** 0.5
    assert chi_square(temperature) < bound
    assert chi_square(temperature * 1.5) > bound and chi_square(temperature / 1.5) > bound


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": -1.0}, ValueError, r"temperature must be a finite float >= 0 \(0: greedy\); got -1.0"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"temperature": "hot"}, ValueError, "temperature"),
    ({"temperature": True}, ValueError, "temperature"),
    ({"n_tokens": 0}, ValueError, "n_tokens must be an int >= 1; got 0"),
    ({"n_tokens": 2.0}, ValueError, "n_tokens"),
    ({"prompt": torch.zeros(2, 3)}, ValueError, r"prompt must be an int64 tensor of shape \(B, P\).*torch.float32"),
    ({"prompt": torch.zeros(3, dtype=torch.long)}, ValueError, "prompt"),
    ({"prompt": torch.zeros(2, 0, dtype=torch.long)}, ValueError, r"got torch.int64 of shape \(2, 0\)"),
    ({"prompt": torch.full((2, 3), 256)}, ValueError, r"byte values in \[0, 256\); got values in \[256, 256\]"),
    ({"prompt": torch.full((2, 3), -1)}, ValueError, "byte values"),
    ({"prompt": torch.zeros(2, 3, dtype=torch.long, device="meta")}, ValueError, "model's device cpu; got meta"),
    ({"prompt": [[1, 2]]}, ValueError, "got list"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator or None; got int"),
])
def test_bad_arguments_raise(kwargs, error, match):
    model = _model(torch.float32)
    args = {"prompt": _prompt(2, 3), "n_tokens": 2, "temperature": 1.0, "generator": None, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(args.pop("prompt"), args.pop("n_tokens"), **args)


def test_timed_generate_reports_latency(monkeypatch):
    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model = _model(torch.float32)
    prompt = _prompt(3, 4)
    tokens, stats, timing = timed_generate(model, prompt, 5, temperature=0, generator=None, warmup=2)
    assert torch.equal(tokens, model.generate(prompt, 5, temperature=0)[0])
    assert timing["steps"] == 4 + 5 - 1 and timing["warmup"] == 2
    assert timing["latency_ms"] > 0 and timing["seconds"] > 0
    assert timing["tokens_per_s"] == pytest.approx(3 * 5 / timing["seconds"])
    # fewer steps than the warm-up: the median of them all
    assert timed_generate(model, prompt[:, :1], 1, temperature=0, generator=None, warmup=3)[2]["warmup"] == 0


def test_to_text():
    tokens = torch.tensor(list("déf\tx\n".encode()) + [0xFF, 0x1B, ord("["), 0x7F])
    assert to_text(tokens) == "déf\tx\n\ufffd\ufffd[\ufffd"


# --------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEQKERN_BACKEND")}
    return subprocess.run([sys.executable, "-m", "deqkern", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=180)


def _sample_text(stdout: str) -> str:
    return stdout.split(" sequence 1 of ")[1].split("\n", 1)[1].rsplit("\n" + "-" * 60, 1)[0]


def test_cli_checkpoint_round_trip(tmp_path, monkeypatch):
    """Train 2 steps with --save, then generate with --resume: the model is training's
    (load_model gives the parameters an in-process run of the same training reaches), and
    the printed greedy text is that model's."""
    path = tmp_path / "ckpt.pt"
    trained = _cli("--config", "tiny", "--steps", "2", "--device", "cpu", "--save", str(path))
    assert trained.returncode == 0, trained.stderr
    out = _cli("generate", "--resume", str(path), "--tokens", "12", "--temperature", "0", "--prompt", "def f(",
               "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert f"checkpoint {path} (step 2)" in out.stdout and "untrained" not in out.stdout

    monkeypatch.setenv("DEQKERN_BACKEND", "eager")
    model, step = load_model(path, torch.device("cpu"))
    reference = train(CharLMConfig.tiny(), steps=2, seed=0, log_every=1).model
    assert step == 2
    for (name, loaded), (_, ref) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(loaded, ref, rtol=1e-6, atol=1e-7), name
    tokens, _ = model.generate(torch.tensor([list(b"def f(")]), 12, temperature=0)
    assert _sample_text(out.stdout) == to_text(tokens[0])


def test_cli_fresh_model(capsys):
    assert main(["generate", "--config", "tiny", "--device", "cpu", "--tokens", "6", "--batch", "3",
                 "--prompt", "import", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "a fresh model from seed 4 (untrained: it prints noise" in out
    assert "sequence 1 of 3" in out and _sample_text(out).startswith("import")
    tokens_per_s = float(out.split(" tokens/s")[0].rsplit(": ", 1)[1].replace(",", ""))
    latency = float(out.split("latency per token: median ")[1].split(" ms")[0])
    assert tokens_per_s > 0 and latency > 0
    assert "6 tokens x batch 3 in" in out and "(8 of 11 steps, after 3 warm-up;" in out
    assert "rows that missed tol: 0" in out
    # the same seed samples the same text
    main(["generate", "--config", "tiny", "--device", "cpu", "--tokens", "6", "--batch", "3", "--prompt", "import",
          "--seed", "4"])
    assert _sample_text(capsys.readouterr().out) == _sample_text(out)


@pytest.mark.parametrize("argv, match", [
    (["generate", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--tokens", "0"], "--tokens must be >= 1; got 0"),
    (["generate", "--prompt", ""], "--prompt must be a non-empty text"),
    (["generate", "--batch", "0"], "--batch must be >= 1; got 0"),
    (["generate", "--resume", "x.pt", "--config", "tiny"], "with --resume the checkpoint's configuration is used"),
    (["generate", "--steps", "3", "--save", "x.pt"], "generate does not train: --steps, --save are training options"),
    (["generate", "--token-loop"], "--token-loop"),
    (["--prompt", "x", "--tokens", "3"], "--prompt, --tokens: options of the generate command"),
    (["check", "--temperature", "1"], "--temperature"),
    (["generate", "--graph", "--device", "cpu"], "--graph needs a CUDA device"),
])
def test_cli_bad_arguments(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--device", "cpu"] if "--device" not in argv else argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_bad_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--resume", str(tmp_path / "missing.pt"), "--device", "cpu"])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        main(["generate", "--resume", str(corrupt), "--device", "cpu"])


def test_load_model_refuses_an_unbuildable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    train(CharLMConfig.tiny(), steps=1, seed=0, save=path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["d_model"] = 48          # parameters no longer fit
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="cannot build the model"):
        load_model(path, torch.device("cpu"))
    payload["config"]["unknown_field"] = 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="unknown_field"):
        load_model(path, torch.device("cpu"))
