"""`python -m regret_service.cli` as a real process: READY line, Score, /metrics, SIGTERM, config errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from redheart import calculus
from redheart.regret_client import RegretClient
from redheart.rpc import wait_for_serving
from redheart.rpc_errors import ServiceError

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"^REDHEART_READY service=regret port=(\d+) metrics_port=(\d+)$")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key in list(env):
        if key.startswith("REDHEART_"):  # the test's config must not pick up the caller's overrides
            del env[key]
    return env


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "regret_service.cli", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_ready(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"no READY line within {timeout}s; stderr:\n{proc.stderr.read()}")
    return box[0].rstrip("\n")


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


def _sigterm_while_scoring(proc: subprocess.Popen, metrics_port: int, client: RegretClient, big: np.ndarray):
    """Submit ``big``, SIGTERM the server once its handler is scoring it; the call's future."""
    in_flight = client.submit("cli-run", 0, 1, torch.from_numpy(big))
    # SIGTERM only once the server is handling it (32 MB take a while to arrive on a busy machine).
    deadline = time.monotonic() + 30
    while _metric(metrics_port, "redheart_regret_requests_in_flight") < 1:
        assert time.monotonic() < deadline and not in_flight.done(), (
            "the large Score never reached the server"
        )
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    return in_flight


def _started(tmp_path, drain_seconds: float) -> tuple[subprocess.Popen, str, int]:
    """A regret service with 2 workers and the given drain: (process, address, metrics port)."""
    config = tmp_path / "regret.toml"
    config.write_text(
        f"[regret]\nnum_workers = 2\nmax_batch = 1000000\ndrain_seconds = {drain_seconds}\n", encoding="utf-8"
    )
    proc = _spawn(["--config", str(config), "--set", "regret.port=0", "--metrics-port", "0"])
    line = _read_ready(proc)
    match = READY.match(line)
    assert match, f"unexpected first stdout line {line!r}"
    port, metrics_port = int(match.group(1)), int(match.group(2))
    assert port > 0 and metrics_port > 0
    address = f"127.0.0.1:{port}"
    wait_for_serving(address, timeout=10, service_name="regret service")
    return proc, address, metrics_port


@pytest.mark.slow
def test_serve_score_scrape_and_sigterm(tmp_path):
    # The drain is far longer than the in-flight call needs (1M scenarios: 1.5-4 s of scoring on
    # 2 cores, over 10 s beside other load), so the call is answered however busy the machine is.
    proc, address, metrics_port = _started(tmp_path, drain_seconds=120)
    try:
        assert _metric(metrics_port, "redheart_regret_workers_alive") == 2
        before = _metric(metrics_port, "redheart_regret_computations_total")
        rng = np.random.default_rng(0)
        x = rng.random((300, 8), dtype=np.float32)
        x[:, 7] = x[:, 7] * 2 - 1
        with RegretClient(address, max_message_mb=64, timeout_seconds=120) as client:
            reply = client.score("cli-run", 0, 0, torch.from_numpy(x))
            np.testing.assert_array_equal(reply.regret.numpy(), calculus.score(x).regret)
            assert _metric(metrics_port, "redheart_regret_computations_total") - before == 300 * 7
            assert _metric(metrics_port, "redheart_bentham_evaluations_total") >= 300 * 21

            # A call in flight when SIGTERM arrives is still answered.
            big = np.random.default_rng(1).random((1_000_000, 8), dtype=np.float32)
            reply = _sigterm_while_scoring(proc, metrics_port, client, big).result(timeout=120)
            answered = time.monotonic()
        for lo, hi in ((0, 1000), (999_000, 1_000_000)):
            np.testing.assert_array_equal(reply.regret[lo:hi].numpy(), calculus.score(big[lo:hi]).regret)
        # Once it has answered, the server exits promptly: only the workers are left to stop.
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - answered < 15
        rest = proc.stdout.read()
        assert "REDHEART_READY" not in rest, "exactly one READY line"
        err = proc.stderr.read()
        assert "SIGTERM" in err and "1 Score call(s) in flight get up to 120.0 s" in err
        assert "unanswered" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_cancels_calls_still_running_when_the_drain_ends(tmp_path):
    proc, address, metrics_port = _started(tmp_path, drain_seconds=0)
    try:
        big = np.random.default_rng(1).random((1_000_000, 8), dtype=np.float32)
        with RegretClient(address, max_message_mb=64, timeout_seconds=5) as client:
            in_flight = _sigterm_while_scoring(proc, metrics_port, client, big)
            signalled = time.monotonic()
            # Cancelled, then retried against a server that is gone: an error, never a hang.
            with pytest.raises(ServiceError, match="Score failed with (UNAVAILABLE|CANCELLED)"):
                in_flight.result(timeout=30)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 30
        err = proc.stderr.read()
        assert "the drain of 0.0 s ran out with 1 Score call(s) unanswered; they were cancelled" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_config_error_exits_2_with_file_and_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[regret]\nnum_worker = 2\n", encoding="utf-8")
    proc = _spawn(["--config", str(config)])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"{config}:2" in err and "num_worker" in err and "did you mean `num_workers`" in err
    assert "REDHEART_READY" not in out


def test_impossible_counts_exit_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[regret]\nregrets_per_step = 9\n", encoding="utf-8")
    proc = _spawn(["--config", str(config), "--set", "regret.port=0", "--set", "regret.metrics_port=0"])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "regrets_per_step = 9 must be in 1..7" in err
    assert "REDHEART_READY" not in out
