"""SIGTERM / SIGINT of real processes mid-work: every service drains and exits 0, nothing hangs.

(a) A CPU and a GPU stage (``python -m cpu_stage.cli`` / ``gpu_stage.cli``) each with a RunStep in
    flight that waits on its peer: on SIGTERM the health service goes NOT_SERVING (seen on a
    ``Health/Watch`` stream opened before the signal), the in-flight RunStep ends within the grace
    period with UNAVAILABLE / ABORTED / CANCELLED (or completes), and the process exits 0.
(b) The regret service with a Score on a large batch in flight: NOT_SERVING, the Score completes
    with the calculus' answer (or fails UNAVAILABLE / CANCELLED), exit 0 within the grace period.

(c) the orchestrator is in test_sigterm_orchestrator.py, (d) 50 stops of each service in
test_sigterm_stops.py; the helpers (Service, HealthWatch, InFlight, ...) in sigterm_support.py.

Every wait is bounded; a process still alive at the end of a test is killed by its own pid.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import time

import grpc
import numpy as np
import pytest
import torch
from sigterm_support import (
    CPU_KEYS,
    GPU_KEYS,
    GRACE,
    PEER_WAIT,
    SLACK,
    STOPPED,
    HealthWatch,
    InFlight,
    Service,
    _plan,
    wait_exit,
)

from orchestrator.stage_client import StageClient, start_stages
from redheart import calculus, codec
from redheart.config import load_config
from redheart.v1 import regret_pb2, regret_pb2_grpc

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
        start_stages([clients["cpu"], clients["gpu"]], "run", settings, regret_address=silent_address)
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
