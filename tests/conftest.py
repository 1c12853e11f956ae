"""Test-suite setup: on a machine without a CUDA GPU, run the real Triton kernels
through Triton's interpreter. TRITON_INTERPRET must be set before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import deqkern  # noqa: E402,F401  (imports triton after the variable is set)


@pytest.fixture
def one_thread():
    """One intra-op thread (what the CLI uses on a CPU): tiny matrices, where more threads
    only slow a shared CPU down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def device() -> torch.device:
    """The device the fused kernels run on here: the GPU if there is one, else the CPU
    (kernels interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def fused_backend_name(device: torch.device) -> str:
    """What deqkern.last_backend() reports when the Triton kernels ran."""
    return "triton" if device.type == "cuda" else "triton-interpreter"


@pytest.fixture
def fused(monkeypatch, fused_backend_name: str) -> str:
    """Run the Triton kernels in this test: DEQKERN_BACKEND=triton (on a CPU through
    Triton's interpreter, which "auto" never picks). Returns fused_backend_name."""
    monkeypatch.setenv("DEQKERN_BACKEND", "triton")
    return fused_backend_name


@pytest.fixture(params=["triton", "eager"])
def backend(request, monkeypatch) -> str:
    """Force each backend in turn through DEQKERN_BACKEND."""
    monkeypatch.setenv("DEQKERN_BACKEND", request.param)
    return request.param


def pytest_report_header(config):
    mode = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, Triton interpreter"
    return f"deqkern fused kernels run on: {mode}"


def pytest_runtest_logreport(report):
    """With ``DEQKERN_FAILURE_LOG=FILE``, each failure's report is appended to FILE as it
    happens (a GPU run cut short by its time limit keeps the tracebacks it got)."""
    path = os.environ.get("DEQKERN_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
