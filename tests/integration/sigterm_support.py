"""Helpers of the SIGTERM / SIGINT tests (test_sigterm*.py): service processes, a health watch,
an in-flight RunStep, bounded waits and step plans."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from conftest import ROOT, cli_env
from grpc_health.v1 import health_pb2, health_pb2_grpc
from synthetic import synthetic_batch

from orchestrator.stage_client import micro_batch_message
from orchestrator.stages import plan_inputs
from redheart.v1 import stage_pb2, tensor_pb2

GRACE = 10.0  # the services' drain period (redheart.service_main.ServiceSpec.grace, regret.drain_seconds)
SLACK = 5.0  # process start-up of the interpreter's exit, a loaded 2-core CI machine
PEER_WAIT = 20.0  # deadline_seconds of the RunSteps in flight: longer than the grace period
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CPU_KEYS, GPU_KEYS = plan_inputs(0, 2), plan_inputs(1, 2)  # what each stage's plan carries
STOPPED = {"UNAVAILABLE", "ABORTED", "CANCELLED"}


# ----------------------------------------------------------------------------- helpers


class Service:
    """A service started as its own process; its READY line gives the port."""

    def __init__(self, module: str, config: Path, log: Path, *extra: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config), "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),
            text=True,
            env=cli_env(),
            cwd=ROOT,
        )
        self.port = 0
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                match = re.search(r"REDHEART_READY service=\S+ port=(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60):
            self.kill()
            raise AssertionError(f"{module} did not report ready within 60 s:\n{log.read_text()[-2000:]}")
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class HealthWatch:
    """A Health/Watch stream opened now: records every status (and the stream's end) with a time."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )
        self.seen: list[tuple[float, object]] = []
        self.serving = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.serving.wait(10), f"{address} never reported SERVING: {self.seen}"

    def _run(self) -> None:
        try:
            for reply in self.stream:
                self.seen.append((time.monotonic(), reply.status))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    self.serving.set()
        except grpc.RpcError as exc:
            self.seen.append((time.monotonic(), exc.code().name))

    def not_serving_after(self, t0: float) -> float | None:
        return next((t - t0 for t, status in self.seen if t >= t0 and status == NOT_SERVING), None)

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


class InFlight:
    """A unary call running on its own thread; records its outcome and when it ended."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.outcome: tuple[str, str] | None = None
        self.value = None
        self.ended = 0.0
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.value = fn(*args, **kwargs)
            self.outcome = ("OK", "")
        except grpc.RpcError as exc:
            self.outcome = (exc.code().name, exc.details() or "")
        self.ended = time.monotonic()


def wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    start = time.monotonic()
    try:
        return proc.wait(timeout), time.monotonic() - start
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start


def _plan(run_id: str, keys, deadline: float) -> stage_pb2.StepPlan:
    batch = synthetic_batch(0)
    plan = stage_pb2.StepPlan(
        envelope=tensor_pb2.Envelope(run_id=run_id, step=0),
        accumulation_round=0,
        accumulation_steps=1,
        schedule="1f1b",
        loss_multiplier=0.25,
        loss_scale=1.0,
        deadline_seconds=deadline,
    )
    for i in range(4):
        plan.micro_batches.append(
            micro_batch_message(i, batch.slice(2 * i, 2 * i + 2).tensors, keys, batch.ids[2 * i : 2 * i + 2])
        )
    return plan
