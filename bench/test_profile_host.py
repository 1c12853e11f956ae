"""Smoke test of bench/profile_host.py: ``--quick`` end to end (on a CPU: tiny sizes, kernel
launches stubbed or interpreted), into a temporary directory."""

import json

import profile_host


def test_profile_host_quick(tmp_path, device):
    profile_host.main(["--quick", "--device", device.type, "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "profile.json").read_text())
    rows = {(r["dtype"], r["entry"]): r for r in payload["rows"]}
    n, d = payload["size"]
    for name, dtype in profile_host.DTYPES.items():
        for entry, _, _, cuda_only, _ in profile_host.cases(n, d, dtype, device):
            row = rows[(name, entry)]
            if cuda_only and device.type != "cuda":
                assert row["wall_us"] is None and row["note"] == "needs CUDA: not run"
                continue
            assert row["wall_us"] > 0 and row["prof_wall_us"] > 0, row
            assert row["top"], f"no CPU event recorded for {entry}"
    floor = rows[("bf16", "floor: x * 2 + autograd.grad (one-op graph)")]
    assert floor["aten_ops"] >= 2 and floor["autograd_us"] > 0, floor  # mul forward, its backward's mul
    if device.type == "cuda":
        assert rows[("bf16", "frozen_rmsnorm_update forward, no grad")]["launches"] >= 1
        assert all(r["device_us"] > 0 for r in payload["rows"] if r["wall_us"] is not None and r["kernels"])
    md = (tmp_path / "profile.md").read_text()
    assert "| entry | dtype N×d | wall µs | prof wall µs |" in md and "**Top 8 CPU events" in md
