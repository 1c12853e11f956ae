"""``python -m bench``: a failed suite makes the run fail, and CPU results go to a scratch
directory. The suites here are stand-ins (no real benchmark runs): one succeeds, one
raises, one exits non-zero, and three outlive their time share -- one plainly, one
inside a broad ``except Exception`` (as the real suites' per-variant handlers are), one
re-raised by a library as another exception."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SUITES = {
    "bench_fine": "def main(argv):\n    print('fine ran')\n",
    "bench_broken": "def main(argv):\n    raise ValueError('broken on purpose\\nsecond line')\n",
    "bench_exits": "def main(argv):\n    raise SystemExit(3)\n",
    "bench_slow": "import time\ndef main(argv):\n    time.sleep(60)\n",
    "bench_swallows": textwrap.dedent("""
        import time
        def main(argv):
            try:
                time.sleep(60)
            except Exception as exc:  # a suite reporting a failed variant and moving on
                print('swallowed', type(exc).__name__)
        """),
    "bench_wraps": textwrap.dedent("""
        import time
        def main(argv):
            try:
                time.sleep(60)
            except BaseException as exc:  # a library re-raising whatever interrupted it
                raise RuntimeError('compilation interrupted') from exc
        """),
}

DRIVER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {suites!r}]
    import bench.__main__ as bench_main

    names = {names!r}
    bench_main.GRACE_S = 0.0  # the alarm fires at the end of each suite's share (1 s at least)
    bench_main.WEIGHTS.update({{name: 1.0 for name in names}})
    bench_main.suite_calls = lambda args: [(name, "bench_" + name, [["--quick"]], False) for name in names]
    sys.exit(bench_main.main({argv!r}))
    """)


def run_bench(tmp_path: Path, names, *argv: str) -> subprocess.CompletedProcess:
    suites = tmp_path / "suites"
    suites.mkdir(exist_ok=True)
    for module, source in SUITES.items():
        (suites / f"{module}.py").write_text(source)
    script = DRIVER.format(root=str(ROOT), suites=str(suites), names=list(names),
                           argv=["--device", "cpu", *argv])
    env = {k: v for k, v in os.environ.items() if k not in ("DEQKERN_RESULTS", "DEQKERN_BENCH_DEADLINE")}
    env["TMPDIR"] = str(tmp_path)  # where the scratch results directory is created
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


def test_failed_suites_fail_the_run_and_are_summarized(tmp_path):
    names = ["fine", "broken", "exits", "slow", "swallows", "wraps"]
    out = run_bench(tmp_path, names, "--budget-s", "12")  # 2 s a suite: room for a loaded machine
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "fine ran" in out.stdout
    summary = out.stdout.split("5 of 6 suites failed:\n")[1].splitlines()
    reasons = dict(line.strip().split(": ", 1) for line in summary)
    assert reasons["broken"] == "ValueError: broken on purpose"
    assert reasons["exits"] == "--quick: exit 3"
    for name in ("slow", "swallows", "wraps"):
        assert reasons[name].startswith("timed out: more than 0 s past its "), reasons[name]
    assert "swallowed" not in out.stdout, "a suite's except Exception must not swallow the timeout"
    # One traceback, the real error's; none for the timeouts.
    assert text.count("Traceback") == 1 and "ValueError: broken on purpose" in out.stderr, out.stderr
    assert "SuiteTimeout" not in text and "compilation interrupted" not in text


def test_cpu_results_go_to_scratch_unless_out(tmp_path):
    out = run_bench(tmp_path, ["fine"], "--budget-s", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    scratch = [p for p in tmp_path.glob("deqkern-bench-*") if p.is_dir()]
    assert len(scratch) == 1 and (scratch[0] / "cpu" / "run.json").is_file()
    assert f"results go to {scratch[0] / 'cpu'} (a temporary directory" in out.stdout
    assert not (ROOT / "bench" / "results" / "cpu").exists(), "a CPU run must not write into the repository"

    target = tmp_path / "kept"
    out = run_bench(tmp_path, ["fine"], "--budget-s", "0", "--out", str(target))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (target / "cpu" / "run.json").is_file()
    assert f"results go to {target / 'cpu'}\n" in out.stdout
