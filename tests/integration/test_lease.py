"""The lease (issue 11, Build 4): stages started on their own (remote mode) whose orchestrator is
SIGKILLed while a step runs abort that round within orchestrator.lease_seconds, and a new
orchestrator's StartRun is accepted (measured before: only after the step deadline)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time

from conftest import ROOT, cli_env
from sigterm_support import Service

from orchestrator.stage_client import StageClient
from redheart.config import load_config
from redheart.rpc import ServiceError

LEASE = 2.0
STEP_DEADLINE = 300.0  # far longer than the test: only the lease can free the stage

# The orchestrator stand-in: starts the run on both stages, then a step on the GPU stage only, so
# the GPU stage waits on its peer for the whole step deadline; it is killed while it waits.
ORCHESTRATOR = textwrap.dedent("""
    import json, sys, time
    sys.path[:0] = ["tests", "tests/grpc"]
    from orchestrator.stage_client import StageClient
    from test_adversarial import gpu_plan
    cpu, gpu, settings, deadline = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
    c = StageClient("cpu stage", cpu, max_message_mb=64, rpc_timeout=20)
    g = StageClient("gpu stage", gpu, max_message_mb=64, rpc_timeout=20)
    c.start_run("first", settings, next_address=gpu, prev_address="", regret_address="", first_step=0, reinitialize=True)
    g.start_run("first", settings, next_address="", prev_address=cpu, regret_address="inprocess", first_step=0,
                reinitialize=True)
    call = g.stub.RunStep.future(gpu_plan("first", 0, deadline), timeout=deadline + 60)
    print("RUNNING", flush=True)
    call.result()
""")


def test_an_orchestrator_killed_mid_step_frees_the_stages_for_a_new_one(tmp_path, tiny_toml):
    overrides = ["--set", f"orchestrator.lease_seconds={LEASE}"]
    cfg = load_config(tiny_toml)
    settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
    cpu = Service("cpu_stage.cli", tiny_toml, tmp_path / "cpu.log", *overrides)
    gpu = Service("gpu_stage.cli", tiny_toml, tmp_path / "gpu.log", *overrides)
    orchestrator = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ORCHESTRATOR,
            cpu.address,
            gpu.address,
            json.dumps(settings),
            str(STEP_DEADLINE),
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "orchestrator.log", "w"),
        text=True,
        env=cli_env(),
        cwd=ROOT,
    )
    client = StageClient("gpu stage", gpu.address, max_message_mb=64, rpc_timeout=10)
    try:
        assert orchestrator.stdout.readline().strip() == "RUNNING", (
            tmp_path / "orchestrator.log"
        ).read_text()[-2000:]
        time.sleep(0.5)  # the RunStep is now waiting on the peer
        refusal = _start_run_refusal(client, settings, cpu.address)
        # Typed, so the orchestrator retries it without reading the text (ErrorReason.ROUND_RUNNING).
        assert refusal is not None and refusal.reason == "round_running" and "is running" in refusal.details
        orchestrator.kill()
        orchestrator.wait(10)
        killed = time.monotonic()
        while True:  # a new orchestrator starts its run: accepted once the lease expired
            refusal = _start_run_refusal(client, settings, cpu.address)
            if refusal is None:
                break
            assert time.monotonic() - killed < 30, f"StartRun still refused 30 s after the kill: {refusal}"
            time.sleep(0.2)
        freed = time.monotonic() - killed
        print(
            f"\nStartRun of a new orchestrator accepted {freed:.1f}s after the old one was killed (lease {LEASE}s)"
        )
        assert "lease expired" in (tmp_path / "gpu.log").read_text() or freed < LEASE + 5
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        client.close()
        cpu.kill()
        gpu.kill()


def _start_run_refusal(client: StageClient, settings, cpu_address: str) -> ServiceError | None:
    try:
        client.start_run(
            "second",
            settings,
            next_address="",
            prev_address=cpu_address,
            regret_address="inprocess",
            first_step=0,
            reinitialize=True,
        )
        return None
    except ServiceError as exc:
        return exc
