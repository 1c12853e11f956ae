"""deqkern's Triton kernels compile for an sm_90 GPU (Triton's
frontend, passes and ptxas, no GPU needed): ``tests/gpu_compile.py`` in a process without
Triton's interpreter, which a test process on a CPU machine has turned on. The CUDA
cluster kernels (forward and adjoint) compile with nvcc where one is installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton_backends = pytest.importorskip("triton.backends")


@pytest.mark.skipif("nvidia" not in getattr(triton_backends, "backends", {}),
                    reason="this Triton build has no CUDA backend to compile with")
def test_kernels_compile_for_sm90():
    script = Path(__file__).with_name("gpu_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(script.parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    count = int(done.stdout.strip().splitlines()[-1].split()[1])
    assert count >= 20, done.stdout[-2000:]  # every launcher's kernels, several configurations each


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    found = shutil.which("nvcc") or str(Path(home) / "bin" / "nvcc")
    return found if Path(found).exists() else None


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc here to compile the CUDA extension's kernels with")
@pytest.mark.parametrize("source,instantiations", [
    ("cell_cluster.cu", 12),          # the forward: bf16/fp16 x 16/32 rows x 32/64/128 columns
    ("cell_cluster_adjoint.cu", 6),   # the adjoint: bf16/fp16 x 32/64/128 columns, 16 rows
])
def test_cluster_kernels_compile_for_sm90(tmp_path, source, instantiations):
    """The CUDA extension's kernels (csrc/cuda/, which a CUDA build of torch compiles with
    setup.py) compile for sm_90 with nvcc alone, every instantiation without register spills."""
    path = Path(__file__).parent.parent / "csrc" / "cuda" / source
    done = subprocess.run([_nvcc(), "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v",
                           "-c", str(path), "-o", str(tmp_path / "kernel.o")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    spills = [line for line in done.stderr.splitlines() if "spill stores" in line]
    assert len(spills) == instantiations, done.stderr[-3000:]
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in spills), "\n".join(spills)
