"""pytest-benchmark cases (``pytest bench --benchmark-only``; the default test run only
collects ``tests/``). As in tests/conftest.py: on a machine without a CUDA GPU the
Triton kernels run through the interpreter, so TRITON_INTERPRET is set before triton
is imported, and eager runs on one CPU thread."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # as python -m bench: stable timings on small shared CPUs

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

import deqkern  # noqa: E402,F401  (imports triton after the variable is set)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
