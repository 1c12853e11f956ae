"""The top-level package: what ``import deqkern`` gives, and what it does not import."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compat_is_reachable_from_a_plain_import_without_importing_torchdeq():
    """README: ``deqkern.compat.torchdeq.register()`` after ``import deqkern``. torchdeq (an
    optional dependency) is imported by ``register()``, not by ``import deqkern``."""
    script = textwrap.dedent("""
        import sys
        import deqkern
        assert "torchdeq" not in sys.modules and "deqkern.compat" not in sys.modules
        adapter = deqkern.compat.torchdeq
        assert adapter.SOLVER_NAME == "deqkern" and callable(adapter.register)
        assert "torchdeq" not in sys.modules, "reaching the adapter must not import torchdeq"
        try:
            deqkern.no_such_name
        except AttributeError as exc:
            assert str(exc) == "module 'deqkern' has no attribute 'no_such_name'", exc
        else:
            raise AssertionError("deqkern.no_such_name did not raise")
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
