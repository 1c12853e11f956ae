"""deqkern's Triton kernels compile for an sm_90 GPU (Triton's
frontend, passes and ptxas, no GPU needed): ``tests/gpu_compile.py`` in a process without
Triton's interpreter, which a test process on a CPU machine has turned on."""

import os
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
