"""Scrape every process's /metrics during a live tiny run: the required series exist and move."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, cli_env, free_port
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples):
    return {k[0] for k in samples}


# long: one live run of every process, checked in one test: a test per series would start it again
def test_every_process_exports_the_required_series_and_they_move(tmp_path, tiny_toml):
    ports = {k: free_port() for k in ("cpu", "gpu", "regret", "cpu_m", "gpu_m", "regret_m", "orch_m")}
    text = tiny_toml.read_text().replace("[metrics]\nenabled = false", "[metrics]\nenabled = true")
    text = text.replace("max_steps = 4", "max_steps = 5000")
    text += f"""
[launch]
ports = "fixed"
[cpu_stage]
port = {ports["cpu"]}
metrics_port = {ports["cpu_m"]}
[gpu_stage]
port = {ports["gpu"]}
metrics_port = {ports["gpu_m"]}
"""
    text = text.replace(
        "[regret]\nnum_workers = 2",
        f"[regret]\nnum_workers = 2\nport = {ports['regret']}\nmetrics_port = {ports['regret_m']}",
    )
    text = text.replace('progress = "log"', f'progress = "log"\nmetrics_port = {ports["orch_m"]}')
    config = tmp_path / "live.toml"
    config.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "--config", str(config)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "run.log", "w"),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            try:
                _, orch = scrape(ports["orch_m"])
                if value(orch, "redheart_train_steps_total") >= 3:
                    break
            except (OSError, KeyError):
                pass
            assert time.monotonic() < deadline, "the run made no steps"
            time.sleep(0.2)
        time.sleep(1.0)
        texts = {}
        first = {}
        for key in ("orch_m", "cpu_m", "gpu_m", "regret_m"):
            texts[key], first[key] = scrape(ports[key])
        time.sleep(1.5)
        later = {key: scrape(ports[key])[1] for key in ("orch_m", "cpu_m", "gpu_m", "regret_m")}
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: finish the step, checkpoint, stop the services
        code = proc.wait(120)
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]

    orch, cpu, gpu, regret = (first[k] for k in ("orch_m", "cpu_m", "gpu_m", "regret_m"))
    # the step counter moves
    assert value(later["orch_m"], "redheart_train_steps_total") > value(orch, "redheart_train_steps_total")
    assert (
        value(later["orch_m"], "redheart_last_step_timestamp_seconds")
        >= value(orch, "redheart_last_step_timestamp_seconds")
        > 0
    )
    for series in (
        "redheart_train_step_duration_seconds_count",
        "redheart_train_samples_per_second",
        "redheart_train_tokens_per_second",
        "redheart_train_grad_norm",
        "redheart_train_regret_mean",
        "redheart_checkpoint_seconds_count",
        "redheart_process_resident_memory_bytes",
        "redheart_process_cpu_seconds_total",
    ):
        assert series in names(orch), series
    for head in ("emotion", "bentham", "judgment", "regret", "total"):
        assert value(orch, "redheart_train_loss", head=head) > 0
    # bytes on the wire in both directions, per stage
    assert value(cpu, "redheart_wire_bytes_total", stage="cpu", direction="sent") > 0
    assert value(gpu, "redheart_wire_bytes_total", stage="gpu", direction="sent") > 0
    assert value(gpu, "redheart_wire_bytes_total", stage="gpu", direction="received") > 0
    assert value(later["cpu_m"], "redheart_stage_micro_batches_total", stage="cpu", op="forward") > value(
        cpu, "redheart_stage_micro_batches_total", stage="cpu", op="forward"
    )
    for stage, samples in (("cpu", cpu), ("gpu", gpu)):
        assert value(samples, "redheart_stage_forward_seconds_count", stage=stage) > 0
        assert value(samples, "redheart_stage_wait_seconds_total", stage=stage) >= 0
        assert 0 <= value(samples, "redheart_stage_bubble_ratio", stage=stage) <= 1
        assert (
            value(
                samples,
                "redheart_grpc_server_handled_total",
                service=f"{stage}_stage",
                method="RunStep",
                code="OK",
            )
            > 0
        )
        assert "redheart_gpu_memory_allocated_bytes" in names(samples)
    # regret computations = regrets_per_step x scenarios scored (7 per scenario), and the training side agrees
    scored = value(later["regret_m"], "redheart_regret_scored_scenarios_total")
    assert scored > 0
    assert value(later["regret_m"], "redheart_regret_computations_total") == 7 * scored
    assert value(later["regret_m"], "redheart_bentham_evaluations_total") == 21 * scored
    assert value(orch, "redheart_train_regret_computations_total") == 7 * value(
        orch, "redheart_train_samples_total"
    )
    assert value(regret, "redheart_regret_workers_alive") == 2
    # every endpoint is valid exposition format for promtool too
    if shutil.which("promtool"):
        for key, body in texts.items():
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=body, capture_output=True, text=True
            )
            assert check.returncode == 0, f"{key}: {check.stdout}{check.stderr}"
