"""Every command is a click command: shared options, environment defaults, --help, completion, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT, cli_env, run_cli

from cpu_stage.cli import cli as cpu_cli
from gpu_stage.cli import cli as gpu_cli
from orchestrator.cli import cli as orchestrate_cli
from redheart.data.generate import make_data
from redheart.tools.gen_protos import gen_protos
from regret_service.cli import cli as regret_cli

COMMANDS = {
    "redheart-orchestrate": orchestrate_cli,
    "redheart-cpu-stage": cpu_cli,
    "redheart-gpu-stage": gpu_cli,
    "redheart-regret": regret_cli,
    "redheart-make-data": make_data,
    "redheart-gen-protos": gen_protos,
}
CONFIG_COMMANDS = ["redheart-orchestrate", "redheart-cpu-stage", "redheart-gpu-stage", "redheart-regret"]


def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_examples_and_exit_codes(name):
    result = runner().invoke(COMMANDS[name], ["--help"], prog_name=name, env={"REDHEART_CONFIG": None})
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output and f"{name} " in result.output and "Exit codes" in result.output


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_config_commands_share_one_option_set(name):
    names = {opt for p in COMMANDS[name].params for opt in p.opts}
    assert {"--config", "--set", "--log-level"} <= names
    result = runner().invoke(COMMANDS[name], [], prog_name=name, env={"REDHEART_CONFIG": None})
    assert result.exit_code == 2 and "Missing option '--config'" in result.output


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_set_environment_and_file_keep_their_precedence(name, tmp_path):
    """flag > environment > file, seen through which source a refused value is blamed on."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nepochs = 0\n")  # refused when nothing overrides it
    cmd = COMMANDS[name]
    result = runner().invoke(cmd, ["--config", str(cfg)], env={"REDHEART_CONFIG": None})
    assert result.exit_code == 2 and f"{cfg}:2" in result.output and "train.epochs = 0" in result.output
    env = {"REDHEART_CONFIG": None, "REDHEART_TRAIN__EPOCHS": "-1"}
    result = runner().invoke(cmd, ["--config", str(cfg)], env=env)
    assert (
        result.exit_code == 2
        and "environment REDHEART_TRAIN__EPOCHS" in result.output
        and "= -1" in result.output
    )
    result = runner().invoke(
        cmd, ["--config", str(cfg), "--set", "train.epochs=-2", "--set", "train.epochs=-3"], env=env
    )
    assert result.exit_code == 2 and "--set train.epochs=-3" in result.output  # the last --set wins


def test_config_and_log_level_come_from_the_environment_and_the_flag_wins(tmp_path):
    env_file, flag_file = tmp_path / "env.toml", tmp_path / "flag.toml"
    env_file.write_text("[train]\nepoch = 3\n")
    flag_file.write_text("[train]\nbatchsize = 3\n")
    result = runner().invoke(regret_cli, [], env={"REDHEART_CONFIG": str(env_file)})
    assert (
        result.exit_code == 2
        and f"{env_file}:2" in result.output
        and "did you mean `epochs`" in result.output
    )
    result = runner().invoke(regret_cli, ["--config", str(flag_file)], env={"REDHEART_CONFIG": str(env_file)})
    assert (
        result.exit_code == 2
        and f"{flag_file}:2" in result.output
        and "did you mean `batch_size`" in result.output
    )
    result = runner().invoke(regret_cli, ["--config", str(flag_file)], env={"REDHEART_LOG_LEVEL": "LOUD"})
    assert result.exit_code == 2 and "Invalid value for '--log-level'" in result.output
    result = runner().invoke(
        regret_cli, ["--config", str(flag_file), "--log-level", "debug"], env={"REDHEART_LOG_LEVEL": "LOUD"}
    )
    assert (
        result.exit_code == 2 and "did you mean `batch_size`" in result.output
    )  # the flag's valid level won


def test_bad_arguments_exit_2_and_name_the_option(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("")
    cases = [
        (cpu_cli, ["--config", str(cfg), "--port", "70000"], "'--port'"),
        (regret_cli, ["--config", str(cfg), "--metrics-port", "-1"], "'--metrics-port'"),
        (orchestrate_cli, ["--config", str(cfg), "--verify", "--check"], "cannot be combined"),
        (orchestrate_cli, ["--config", str(cfg), "--trace", "5-2"], "'--trace'"),
        (orchestrate_cli, ["--config", str(cfg), "--nope"], "No such option"),
        (make_data, ["--out", str(tmp_path / "x.jsonl"), "--korean-fraction", "2"], "'--korean-fraction'"),
    ]
    for cmd, argv, expected in cases:
        result = runner().invoke(cmd, argv, env={"REDHEART_CONFIG": None})
        assert result.exit_code == 2 and expected in result.output, (argv, result.output)


def test_make_data_through_click_runner_writes_the_same_bytes(tmp_path):
    from redheart.data.generate import write_jsonl

    out = tmp_path / "s.jsonl"
    result = runner().invoke(make_data, ["--out", str(out), "--count", "12", "--seed", "3"])
    assert result.exit_code == 0 and f"wrote 12 scenarios to {out}" in result.output
    assert out.read_bytes() == write_jsonl(tmp_path / "b.jsonl", 12, 3).read_bytes()


# ---------------------------------------------------------------- as processes, the way users run them


@pytest.mark.parametrize(
    "module,prog",
    [
        ("orchestrator.cli", "redheart-orchestrate"),
        ("cpu_stage.cli", "redheart-cpu-stage"),
        ("regret_service.cli", "redheart-regret"),
        ("redheart.tools.gen_protos", "redheart-gen-protos"),
    ],
)
def test_processes_print_help_and_exit_2_on_a_missing_config(module, prog):
    result = run_cli([module, "--help"], timeout=60)
    assert result.returncode == 0 and f"Usage: {prog}" in result.stdout and "Examples:" in result.stdout
    if module != "redheart.tools.gen_protos":
        env = {k: v for k, v in cli_env().items() if k != "REDHEART_CONFIG"}
        missing = subprocess.run(
            [sys.executable, "-m", module], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
        )
        assert missing.returncode == 2 and "Missing option '--config'" in missing.stderr


def test_a_process_reads_config_and_overrides_from_environment_and_exits_2(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[regret]\nnum_workers = 2\n")
    env = dict(cli_env(), REDHEART_CONFIG=str(cfg), REDHEART_REGRET__NUM_WORKERS="0")
    result = subprocess.run(
        [sys.executable, "-m", "gpu_stage.cli"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "environment REDHEART_REGRET__NUM_WORKERS" in result.stderr
        and "regret.num_workers = 0" in result.stderr
    )


@pytest.mark.parametrize(
    "shell,marker", [("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete")]
)
def test_shell_completion_scripts_are_generated(shell, marker):
    env = dict(cli_env(), _REDHEART_ORCHESTRATE_COMPLETE=f"{shell}_source")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0 and marker in result.stdout and "redheart-orchestrate" in result.stdout


def test_completion_offers_the_options():
    env = dict(
        cli_env(),
        _REDHEART_REGRET_COMPLETE="bash_complete",
        COMP_WORDS="redheart-regret --met",
        COMP_CWORD="1",
    )
    result = subprocess.run(
        [sys.executable, "-m", "regret_service.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "--metrics-port" in result.stdout


def test_on_a_terminal_the_run_shows_the_rich_display_and_the_final_table(tmp_path, tiny_toml):
    """The real command under a pseudo-terminal, with progress = "auto" choosing the display itself."""
    import pty
    import select
    import time

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            'orchestrator.progress="auto"',
            "--set",
            "train.max_steps=3",
            "--set",
            'regret.address="inprocess"',
        ],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=cli_env(),
        cwd=ROOT,
    )
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(controller)
    assert proc.wait(30) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "steps" in out and "3/3" in out and "samples/s" in out and "ETA" in out
    assert "validation (final, step 3)" in out and "judgment_accuracy" in out and "done: 3 steps" in out


def test_resume_takes_an_optional_path_like_before():
    for argv, expected in (
        (["--resume"], "latest"),
        (["--resume", "--set", "train.max_steps=2"], "latest"),
        (["--resume", "runs/x/checkpoints"], "runs/x/checkpoints"),
        ([], None),
    ):
        ctx = orchestrate_cli.make_context("redheart-orchestrate", ["--config", "c.toml", *argv])
        assert ctx.params["resume"] == expected, argv
