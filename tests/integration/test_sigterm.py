"""SIGTERM / SIGINT of real processes mid-work: every service drains and exits 0, nothing hangs.

(a) A CPU and a GPU stage (``python -m cpu_stage.cli`` / ``gpu_stage.cli``) each with a RunStep in
    flight that waits on its peer: on SIGTERM the health service goes NOT_SERVING (seen on a
    ``Health/Watch`` stream opened before the signal), the in-flight RunStep ends within the grace
    period with UNAVAILABLE / ABORTED / CANCELLED (or completes), and the process exits 0.
(b) The regret service with a Score on a large batch in flight: NOT_SERVING, the Score completes
    with the calculus' answer (or fails UNAVAILABLE / CANCELLED), exit 0 within the grace period.
(c) SIGTERM and SIGINT to ``python -m orchestrator.cli`` training locally: it finishes the current
    step, writes a final checkpoint at that step boundary (manifest + report.json agree), stops
    every child (none alive afterwards: the pids are collected with psutil before the signal),
    exits 0, and ``--resume`` continues from the saved step.

Every wait is bounded; a process still alive at the end of a test is killed by its own pid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, cli_env
from grpc_health.v1 import health_pb2, health_pb2_grpc
from synthetic import synthetic_batch

from orchestrator.stage_client import StageClient, micro_batch_message
from redheart import calculus, codec
from redheart.config import load_config
from redheart.rpc import ServiceError
from redheart.v1 import regret_pb2, regret_pb2_grpc, stage_pb2, tensor_pb2

GRACE = 10.0  # the services' drain period (redheart.service_main.ServiceSpec.grace, regret_service.cli.GRACE_SECONDS)
SLACK = 5.0  # process start-up of the interpreter's exit, a loaded 2-core CI machine
PEER_WAIT = 20.0  # deadline_seconds of the RunSteps in flight: longer than the grace period
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GPU_KEYS = (
    "attention_mask",
    "labels.emotions",
    "labels.emotions_mask",
    "labels.bentham",
    "labels.bentham_mask",
    "labels.judgment",
)
CPU_KEYS = ("input_ids", "attention_mask")
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


# ----------------------------------------------------------------------------- (a) the stages


@pytest.fixture(scope="module")
def stages_sigterm(tmp_path_factory, corpus):
    """Both stages, each with a RunStep waiting on its peer, SIGTERMed together: what happened.

    The GPU stage's regret service is a socket that accepts connections and never answers: the GPU
    stage waits for its first regret target and never sends a gradient, the CPU stage waits for
    that gradient, and only the shutdown can end the calls. (Different run ids, as before, made the
    GPU stage refuse the activations, and the CPU stage's RunStep then failed at once when its next
    send saw the refusal: a race with the assertion below.)"""
    tmp = tmp_path_factory.mktemp("stages-sigterm")
    from conftest import TINY_TOML

    config = tmp / "tiny.toml"
    config.write_text(TINY_TOML.format(data=corpus, out=tmp / "run"))
    cfg = load_config(config)
    settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    cpu = Service("cpu_stage.cli", config, tmp / "cpu.log")
    gpu = Service("gpu_stage.cli", config, tmp / "gpu.log")
    services = {"cpu": cpu, "gpu": gpu}
    clients = {
        n: StageClient(f"{n} stage", s.address, max_message_mb=64, rpc_timeout=10)
        for n, s in services.items()
    }
    watches: dict[str, HealthWatch] = {}
    try:
        clients["cpu"].start_run(
            "run",
            settings,
            next_address=gpu.address,
            prev_address="",
            regret_address="",
            first_step=0,
            reinitialize=True,
        )
        clients["gpu"].start_run(
            "run",
            settings,
            next_address="",
            prev_address=cpu.address,
            regret_address=silent_address,
            first_step=0,
            reinitialize=True,
        )
        watches = {n: HealthWatch(s.address) for n, s in services.items()}
        calls = {
            "cpu": InFlight(
                clients["cpu"].stub.RunStep, _plan("run", CPU_KEYS, PEER_WAIT), timeout=PEER_WAIT + 30
            ),
            "gpu": InFlight(
                clients["gpu"].stub.RunStep, _plan("run", GPU_KEYS, PEER_WAIT), timeout=PEER_WAIT + 30
            ),
        }
        time.sleep(1.0)  # both calls are now waiting on their peer
        assert all(c.outcome is None for c in calls.values()), {n: c.outcome for n, c in calls.items()}
        t0 = time.monotonic()
        for s in services.values():
            s.proc.send_signal(signal.SIGTERM)
        exits = {}
        for name, s in services.items():
            code, _ = wait_exit(s.proc, PEER_WAIT + GRACE + 30)
            exits[name] = (code, time.monotonic() - t0)
        for c in calls.values():
            c.thread.join(timeout=5)
        yield {
            "exits": exits,
            "calls": {n: (c.outcome, (c.ended - t0) if c.ended else None) for n, c in calls.items()},
            "not_serving": {n: w.not_serving_after(t0) for n, w in watches.items()},
            "logs": {n: s.log for n, s in services.items()},
        }
    finally:
        for w in watches.values():
            w.close()
        for c in clients.values():
            c.close()
        for s in services.values():
            s.kill()
        silent.close()


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_sigterm_of_a_stage_during_a_step_drains_and_exits_0(stages_sigterm, stage):
    seen = stages_sigterm
    print(
        f"\n{stage} stage after SIGTERM: NOT_SERVING at {seen['not_serving'][stage]}s, in-flight RunStep "
        f"{seen['calls'][stage]}, exit (code, seconds) {seen['exits'][stage]}"
    )
    log = seen["logs"][stage].read_text()[-3000:]
    assert seen["not_serving"][stage] is not None and seen["not_serving"][stage] < 2.0, (
        seen["not_serving"],
        log,
    )
    outcome, ended = seen["calls"][stage]
    assert outcome is not None, f"the in-flight RunStep never ended: {seen['calls']}"
    assert outcome[0] in STOPPED | {"OK"}, (outcome, log)
    assert ended < GRACE + SLACK, f"the in-flight RunStep ended {ended:.1f}s after SIGTERM (grace {GRACE}s)"
    code, after = seen["exits"][stage]
    assert code == 0, f"exit code {code} after {after:.1f}s:\n{log}"
    assert "received SIGTERM" in log


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_sigterm_of_a_stage_waiting_on_its_peer_exits_within_the_grace_period(stages_sigterm, stage):
    code, after = stages_sigterm["exits"][stage]
    assert code == 0 and after < GRACE + SLACK, (
        f"exit code {code} {after:.1f}s after SIGTERM (grace {GRACE}s)"
    )


# ----------------------------------------------------------------------------- (b) the regret service

SCORE_ROWS = 500_000


def test_sigterm_of_the_regret_service_with_a_large_score_in_flight(tmp_path, tiny_toml):
    svc = Service(
        "regret_service.cli",
        tiny_toml,
        tmp_path / "regret.log",
        "--metrics-port",
        "0",
        "--set",
        f"regret.max_batch={SCORE_ROWS}",
    )
    watch = None
    channel = grpc.insecure_channel(
        svc.address,
        options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)],
    )
    try:
        stub = regret_pb2_grpc.RegretServiceStub(channel)
        rng = np.random.default_rng(0)
        x = rng.random((SCORE_ROWS, 8), dtype=np.float32)
        x[:, 7] = x[:, 7] * 2 - 1
        request = regret_pb2.ScoreRequest(bentham=codec.encode(torch.from_numpy(x), name="bentham"))
        start = time.monotonic()
        stub.Score(request, timeout=60)  # how long one takes here, to signal in the middle of the next
        duration = time.monotonic() - start
        assert duration > 0.3, (
            f"a Score of {SCORE_ROWS} rows took only {duration:.2f}s: too short to signal it in flight"
        )
        watch = HealthWatch(svc.address)
        call = InFlight(stub.Score, request, timeout=60)
        time.sleep(duration / 3)
        assert call.outcome is None, "the Score finished before the signal"
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code, after = wait_exit(svc.proc, GRACE + SLACK + 30)
        call.thread.join(timeout=5)
        log = (tmp_path / "regret.log").read_text()[-3000:]
        assert watch.not_serving_after(t0) is not None and watch.not_serving_after(t0) < 2.0, (
            watch.seen,
            log,
        )
        assert call.outcome is not None and call.outcome[0] in STOPPED | {"OK"}, (call.outcome, log)
        if call.outcome[0] == "OK":  # it finished inside the grace period: with the calculus' answer
            np.testing.assert_array_equal(codec.decode(call.value.regret).numpy(), calculus.score(x).regret)
        assert call.ended - t0 < GRACE + SLACK
        assert code == 0 and after < GRACE + SLACK, f"exit code {code} {after:.1f}s after SIGTERM:\n{log}"
    finally:
        if watch is not None:
            watch.close()
        channel.close()
        svc.kill()


# ----------------------------------------------------------------------------- (c) the orchestrator


def _wait_for_step(log: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        done = [int(m) for m in re.findall(r"step (\d+)/\d+ epoch", text)]
        if done and max(done) >= step:
            return
        assert proc.poll() is None, f"the run exited early:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s:\n{text[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_orchestrator_checkpoints_stops_every_child_and_resumes(tmp_path, tiny_toml, signum):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "orchestrator.log"
    # No periodic checkpoint: the only one the run writes is the one the signal asks for.
    base = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "--config",
        str(tiny_toml),
        "--set",
        "checkpoint.save_checkpoint_every=1000",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            base + ["--set", "train.max_steps=100000"],
            cwd=ROOT,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    children: list[psutil.Process] = []
    try:
        _wait_for_step(log_path, proc, 3)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert all(m in names for m in ("cpu_stage.cli", "gpu_stage.cli", "regret_service.cli")), names
        proc.send_signal(signum)
        code, after = wait_exit(proc, 120)
        text = log_path.read_text(errors="replace")
        assert code == 0, f"exit code {code} after {after:.1f}s:\n{text[-3000:]}"
        assert f"received {signal.Signals(signum).name}" in text
        report = json.loads((run_dir / "report.json").read_text())
        step = report["steps"]
        assert report["stopped_early"] is True and 3 <= step < report["total_steps"]
        manifest = run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json"
        assert manifest.is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert json.loads(manifest.read_text())["step"] == step
        assert report["checkpoint"] == str(manifest.parent)
        assert (
            max(h["step"] for h in report["loss_history"]) == step
        )  # the step in flight was finished, not dropped
        deadline = time.monotonic() + 10
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, (
            f"children still alive after the orchestrator exited: {[(c.pid, c.cmdline()) for c in alive]}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass

    # --resume: continues from the saved step (a shorter max_steps changes the LR schedule; only
    # where it starts and that it ends cleanly are checked here).
    resumed = subprocess.run(
        base + ["--resume", "--set", f"train.max_steps={step + 2}"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resumed run \S+ at step {step} from ", resumed.stderr), resumed.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == step + 2 and report["stopped_early"] is False
    # The history before the signal comes back from the manifest; no step is lost or run twice.
    assert [h["step"] for h in report["loss_history"]] == list(range(1, step + 3))


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
            clients["cpu"].start_run(
                "run",
                settings,
                next_address=addr["gpu"],
                prev_address="",
                regret_address="",
                first_step=0,
                reinitialize=True,
            )
            clients["gpu"].start_run(
                "run",
                settings,
                next_address="",
                prev_address=addr["cpu"],
                regret_address=addr["regret"],
                first_step=0,
                reinitialize=True,
            )
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
