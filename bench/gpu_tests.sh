#!/usr/bin/env bash
# The H100 test run: build the C++ extension against the machine's torch, install the
# carried pure-Python test dependencies (.whl/: torchdeq, pytest-xdist), run the test
# suite on the GPU and write the log and a summary to $OUT (or bench/results/<slug>/).
# Usage: bash bench/gpu_tests.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/deqkern-out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v WARNING; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The device image sets CXX to a g++ wrapper whose builds crash when the extension throws
# (any argument error segfaulted, 2026-11-26); the system g++ builds a working one.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
{ echo "CXX=${CXX:-c++}"; python setup.py build_ext --inplace; } >"$OUT/build.log" 2>&1 || { echo "extension build failed"; tail -20 "$OUT/build.log"; }
export DEQKERN_COMMIT="${DEQKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
python - <<'PY' >"$OUT/gpu_tests_env.txt"
import torch, triton, platform
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| CUDA", torch.version.cuda, "| python", platform.python_version())
PY
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
python -m pytest -q -p no:cacheprovider $workers "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
rc=${PIPESTATUS[0]}
{ cat "$OUT/gpu_tests_env.txt"; echo "commit: $DEQKERN_COMMIT"; echo "date: $(date -u +%F)";
  echo "pytest $*"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3; } >"$OUT/gpu_tests_summary.txt"
exit $rc
