"""SIGTERM of real processes mid-work, many times: each service exits 0 on 50 SIGTERMs while both
stages are busy (see test_sigterm.py for the single-stop cases; helpers in sigterm_support.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from conftest import ROOT, cli_env
from sigterm_support import CPU_KEYS, GPU_KEYS, GRACE, PEER_WAIT, SLACK, _plan

from orchestrator.stage_client import StageClient, start_stages
from redheart.config import load_config
from redheart.rpc import ServiceError
from redheart.v1 import stage_pb2, tensor_pb2

# ----------------------------------------------------------------------------- (d) 50 stops of each service

STOPS = 50
PARALLEL = 3  # iterations at once: their waits (start-up, the drain) overlap


class Forker:
    """tests/integration/service_forker.py: real service processes without a fresh interpreter each."""

    def __init__(self) -> None:
        env = cli_env()
        env["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS threads in the parent of every fork
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "integration" / "service_forker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lock = threading.Lock()
        self.pids: dict[str, int] = {}
        self.codes: dict[int, int] = {}
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            with self.changed:
                if parts[:1] == ["spawned"]:
                    self.pids[parts[1]] = int(parts[2])
                elif parts[:1] == ["exited"]:
                    self.codes[int(parts[2])] = int(parts[3])
                self.changed.notify_all()

    def spawn(self, tag: str, log: Path, module: str, *argv: str) -> int:
        with self.lock:
            self.proc.stdin.write(" ".join(["spawn", tag, str(log), module, *argv]) + "\n")
            self.proc.stdin.flush()
        with self.changed:
            assert self.changed.wait_for(lambda: tag in self.pids, 30), f"the forker did not start {tag}"
            return self.pids[tag]

    def exit_code(self, pid: int, timeout: float) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.codes, timeout)
            return self.codes.get(pid)

    def close(self) -> None:
        for pid in set(self.pids.values()) - set(self.codes):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(10)


def _ready_port(log: Path, pid_alive, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        match = re.search(r"REDHEART_READY service=\S+ port=(\d+)", text)
        if match:
            return int(match.group(1))
        assert pid_alive(), f"{log.name}: the service exited before it was ready:\n{text[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{log.name}: not ready within {timeout}s")


def _stop_three_while_busy(
    forker: Forker, tmp: Path, config: Path, settings: dict, plans: dict, i: int
) -> dict[str, int | None]:
    """Start the three services, train continuously, SIGTERM all three mid-step; their exit codes."""
    argv = {
        "cpu": ("cpu_stage.cli",),
        "gpu": ("gpu_stage.cli",),
        "regret": ("regret_service.cli", "--set", "regret.num_workers=1"),
    }
    pids, logs = {}, {}
    for name, (module, *extra) in argv.items():
        logs[name] = tmp / f"{name}-{i}.log"
        pids[name] = forker.spawn(
            f"{name}-{i}", logs[name], module, "--config", str(config), "--port", "0", *extra
        )
    ports = {n: _ready_port(logs[n], lambda n=n: pids[n] not in forker.codes) for n in pids}
    addr = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    clients = {
        n: StageClient(f"{n} stage", addr[n], max_message_mb=64, rpc_timeout=20) for n in ("cpu", "gpu")
    }
    busy = threading.Event()
    stop = threading.Event()

    def train() -> None:
        try:
            start_stages([clients["cpu"], clients["gpu"]], "run", settings, regret_address=addr["regret"])
            step = 0
            while not stop.is_set():
                calls = [clients[n].stub.RunStep.future(plans[n](step), timeout=30) for n in ("cpu", "gpu")]
                busy.set()
                for c in calls:
                    c.result()
                for c in clients.values():  # the stub, not StageClient.apply: no retries once the services go
                    c.stub.ApplyStep(
                        stage_pb2.ApplyRequest(
                            envelope=tensor_pb2.Envelope(run_id="run", step=step),
                            clip_coefficient=1.0,
                            learning_rate=1e-3,
                        ),
                        timeout=20,
                    )
                step += 1
        except (grpc.RpcError, ServiceError):
            pass  # the services are going away: that is the point

    driver = threading.Thread(target=train, daemon=True)
    driver.start()
    try:
        assert busy.wait(60), "no step started"
        time.sleep(0.05 + 0.3 * ((i * 7919) % 11) / 10)  # a different moment of the step each time
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        codes = {n: forker.exit_code(pid, GRACE + SLACK + 30) for n, pid in pids.items()}
    finally:
        stop.set()
        driver.join(timeout=30)
        for c in clients.values():
            c.close()
    for n, code in codes.items():
        if code != 0:
            codes[n] = f"{code}: {logs[n].read_text(errors='replace')[-1500:]}"
    return codes


def test_each_service_exits_0_on_50_sigterms_while_both_stages_are_busy(tmp_path, tiny_toml):
    """Acceptance of issue 11: each service stopped 50 times with SIGTERM mid-step, exit code 0 each time."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = load_config(tiny_toml)
    settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
    plans = {"cpu": lambda step: _step_plan(step, CPU_KEYS), "gpu": lambda step: _step_plan(step, GPU_KEYS)}
    forker = Forker()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            results = list(
                pool.map(
                    lambda i: _stop_three_while_busy(forker, tmp_path, tiny_toml, settings, plans, i),
                    range(STOPS),
                )
            )
    finally:
        forker.close()
    print(f"\n{STOPS} x 3 services stopped with SIGTERM mid-step in {time.monotonic() - start:.0f}s")
    failures = [(i, r) for i, r in enumerate(results) if any(code != 0 for code in r.values())]
    assert not failures, failures[:3]


_PLANS: dict[tuple, stage_pb2.StepPlan] = {}


def _step_plan(step: int, keys) -> stage_pb2.StepPlan:
    if keys not in _PLANS:  # built once: the client's CPU is the services' CPU on this machine
        _PLANS[keys] = _plan("run", keys, PEER_WAIT)
    plan = stage_pb2.StepPlan()
    plan.CopyFrom(_PLANS[keys])
    plan.envelope.step = step
    return plan
