"""The redheart-orchestrate command end to end: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import free_port, run_cli, start_service


def test_tiny_training_run_writes_report_checkpoint_plot_and_explanations(tmp_path, tiny_toml):
    out = tmp_path / "run"
    result = run_cli(["orchestrator.cli", "--config", str(tiny_toml), "--set", "train.max_steps=6"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 6 steps" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["parameters"]["total"] > 0
    assert set(report["parameters"]) == {"cpu_stage", "gpu_stage", "total"}
    assert len(report["loss_history"]) == 6 and set(report["loss_history"][0]["losses"]) == {
        "emotion",
        "bentham",
        "judgment",
        "regret",
    }
    # 7 counterfactual regrets and 21 Bentham evaluations per scenario, as the original design counts them.
    assert report["regret"]["computations"] == 6 * 8 * 7
    assert report["regret"]["bentham_evaluations"] == 6 * 8 * 21
    assert report["final_validation"]["metrics"]["judgment_accuracy"] >= 0
    assert set(report["peak_rss_bytes"]) >= {"orchestrator", "cpu_stage", "gpu_stage", "regret"}
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "tokenizer.json").exists()
    lines = (out / "explanations.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"scenario_id", "regret", "best_counterfactual", "actual_perspective_utilities"} <= set(first)
    assert report["checkpoint"].endswith("step-00000006")
    assert (out / "checkpoints" / "step-00000006" / "manifest.json").exists()
    assert not (out / ".lock").exists()  # released at exit


def test_verify_passes_and_prints_the_differences(tiny_toml):
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--verify",
            "--set",
            "orchestrator.verify_steps=2",
            "--set",
            "train.gradient_accumulation_steps=2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VERIFY OK" in result.stdout
    assert "largest loss difference" in result.stdout and "largest parameter difference" in result.stdout


def test_config_error_exits_2_with_file_and_line(tmp_path, tiny_toml):
    text = tiny_toml.read_text().replace("max_steps = 4", "max_step = 4")
    tiny_toml.write_text(text)
    result = run_cli(["orchestrator.cli", "--config", str(tiny_toml)])
    assert result.returncode == 2
    assert f"{tiny_toml}:" in result.stderr and "did you mean `max_steps`" in result.stderr


def test_check_reports_a_held_output_directory_and_a_budget_that_cannot_fit(tmp_path, tiny_toml):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / ".lock").write_text(f"{holder.pid} 0\n")
        result = run_cli(
            [
                "orchestrator.cli",
                "--config",
                str(tiny_toml),
                "--check",
                "--set",
                "cpu_stage.cpu_memory_gb=0.0001",
            ]
        )
        assert result.returncode == 1
        assert f"held by running process {holder.pid}" in result.stdout
        assert "host memory estimate" in result.stdout and "vs cpu_memory_gb = 0.0001" in result.stdout
        assert "fix:" in result.stdout
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: the lock is stale and the check passes.
    result = run_cli(["orchestrator.cli", "--config", str(tiny_toml), "--check"])
    assert result.returncode == 0, result.stdout
    assert "estimate:" in result.stdout and "steps per epoch" in result.stdout


def test_unreachable_remote_stage_is_named(tiny_toml):
    port = free_port()
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            'launch.mode="remote"',
            "--set",
            f'cpu_stage.address="127.0.0.1:{port}"',
            "--set",
            f'gpu_stage.address="127.0.0.1:{free_port()}"',
            "--set",
            'regret.address="inprocess"',
            "--set",
            "orchestrator.connect_timeout_seconds=3",
        ],
        timeout=60,
    )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr + result.stdout


def _remote_run(toml, cpu_port: int, gpu_port: int, regret: str, *more: str) -> list[str]:
    """The orchestrator command for services started by hand on these ports (`regret`: a TOML value)."""
    overrides = [
        'launch.mode="remote"',
        f'cpu_stage.address="127.0.0.1:{cpu_port}"',
        f'gpu_stage.address="127.0.0.1:{gpu_port}"',
        f"regret.address={regret}",
        *more,
    ]
    return ["orchestrator.cli", "--config", str(toml)] + [a for o in overrides for a in ("--set", o)]


def test_remote_stages_with_different_model_settings_are_refused_naming_the_keys(tiny_toml):
    cpu, cpu_port = start_service("cpu_stage.cli", tiny_toml)
    gpu, gpu_port = start_service("gpu_stage.cli", tiny_toml, "--set", "model.num_layers=6")
    try:
        result = run_cli(_remote_run(tiny_toml, cpu_port, gpu_port, '"inprocess"'), timeout=120)
        assert result.returncode == 1
        assert "different model settings" in result.stderr and "num_layers: 4 here, 6 there" in result.stderr
    finally:
        for p in (cpu, gpu):
            p.terminate()
            assert p.wait(20) == 0  # SIGTERM: drain and exit 0


def test_stage_cli_rejects_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cpu_stage]\nprot = 1\n")
    result = run_cli(["cpu_stage.cli", "--config", str(bad)], timeout=60)
    assert result.returncode == 2 and f"{bad}:2" in result.stderr and "did you mean `port`" in result.stderr


def test_a_diverging_fp32_run_stops_before_the_update_naming_step_and_stage(tiny_toml):
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            "train.learning_rate=1e25",
            "--set",
            "train.max_grad_norm=0.0",
            "--set",
            "train.max_steps=30",
            "--set",
            'regret.address="inprocess"',
        ]
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "non-finite" in result.stderr and "in fp32 training; the update was not applied" in result.stderr
    assert "step " in result.stderr and ("gpu stage" in result.stderr or "micro-batch" in result.stderr)


def test_services_started_separately_train_with_a_remote_orchestrator(tmp_path, tiny_toml):
    cpu, cpu_port = start_service("cpu_stage.cli", tiny_toml)
    gpu, gpu_port = start_service("gpu_stage.cli", tiny_toml)
    regret, regret_port = start_service("regret_service.cli", tiny_toml, "--metrics-port", "0")
    try:
        result = run_cli(
            _remote_run(tiny_toml, cpu_port, gpu_port, f'"127.0.0.1:{regret_port}"', "train.max_steps=4"),
            timeout=180,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert report["steps"] == 4 and report["stages"]["cpu_stage"]["address"] == f"127.0.0.1:{cpu_port}"
        assert report["regret"]["computations"] == 4 * 8 * 7
        # the same services take a second run (a new run id) without a restart
        result = run_cli(
            [
                "orchestrator.cli",
                "--config",
                str(tiny_toml),
                "--set",
                'launch.mode="remote"',
                "--set",
                f'cpu_stage.address="127.0.0.1:{cpu_port}"',
                "--set",
                f'gpu_stage.address="127.0.0.1:{gpu_port}"',
                "--set",
                f'regret.address="127.0.0.1:{regret_port}"',
                "--verify",
                "--set",
                "orchestrator.verify_steps=1",
            ],
            timeout=180,
        )
        assert result.returncode == 0 and "VERIFY OK" in result.stdout, result.stderr[-3000:]
    finally:
        for p in (cpu, gpu, regret):
            p.terminate()
            assert p.wait(30) == 0


def test_automatic_split_trains_and_reports_why(tmp_path, tiny_toml):
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            'model.gpu_layers_ratio="auto"',
            "--set",
            "train.max_steps=2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "automatic split: one layer fwd+bwd" in result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["split"]["automatic"] and 0 <= report["split"]["cpu_layers"] <= 4
    assert "Chose" in report["split"]["reason"]
    resolved = (tmp_path / "run" / "config.toml").read_text()
    assert f"cpu_layers = {report['split']['cpu_layers']}" in resolved  # the services were started with it
