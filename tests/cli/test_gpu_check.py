"""The device check's CPU dry run: every section runs and reports, the way it will on a GPU host."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_device_check_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["errors"]
    assert r["env"]["torch"] and r["env"]["packages"]["grpcio"] and r["env"]["packages"]["protobuf"]
    assert r["pytest"]["returncode"] in (0, 5) and "skipped" in r["pytest"]["summary"]  # CUDA tests skip here
    stage = r["stage"]["bf16"]
    assert stage["precision"] == "bf16" and stage["gradients_sent"] > 0 and stage["step_seconds"] > 0
    assert set(r["stage"]["adamw_seconds"]) == {"per-tensor (foreach=False)", "foreach"}
    run = r["pipeline"]["bf16"]
    assert "error" not in run, run
    assert {v["used"] for v in run["precision"].values()} == {"bf16"} and run["step_seconds"] > 0
    assert r["verify"]["ok"], r["verify"]
    assert r["single"]["bf16"]["step_seconds"] > 0
    assert "pipeline (bf16):" in proc.stdout and "the speed of all-on-device" in proc.stdout
    for variant in ("two stages", "three stages", "two replicas"):
        assert f"verify tiny, {variant}: OK" in proc.stdout
