"""Shared fixtures: tiny configs, synthetic batches, free ports, real stage servers on port 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# Helper modules that hold asserts moved out of test modules: pytest rewrites them as it did there.
pytest.register_assert_rewrite(
    "deploy_support", "fuzz_requests", "fuzz_stage_requests", "fuzz_support", "fuzz_values",
    "security_support", "sigterm_support",
)  # fmt: skip

# Two stage processes share 2 cores in the tests: one torch thread each keeps them from
# oversubscribing the machine (and keeps timings of the suite predictable).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA"))


_HANDED_OUT: set[int] = set()


def required_tool(name: str) -> str:
    """Path of a tool from Debian's `prometheus` package. Missing: the test fails under CI (which
    installs it, see scripts/test.sh) and is skipped elsewhere."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"`{name}` not found: install Debian's `prometheus` package (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message + " -- required under CI")
        pytest.skip(message)
    return path


def free_port() -> int:
    """A port nothing listens on now, never the same one twice in a session (the kernel may hand
    a just-closed port out again, and two services of one test must not collide)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


TINY_TOML = """
[model]
preset = "tiny"
[train]
batch_size = 8
micro_batch_size = 2
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_steps = 4
log_every_n_steps = 1
[data]
path = "{data}"
max_scenarios = 300
[regret]
num_workers = 2
[checkpoint]
save_checkpoint_every = 2
[orchestrator]
output_dir = "{out}"
progress = "log"
[metrics]
enabled = false
"""


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small generated corpus shared by the tests that run the data pipeline."""
    from redheart.data.generate import write_jsonl

    path = tmp_path_factory.mktemp("data") / "scenarios.jsonl"
    write_jsonl(path, 600, 0)
    return path


@pytest.fixture
def tiny_toml(tmp_path, corpus) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY_TOML.format(data=corpus, out=tmp_path / "run")))
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args: list[str], timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=cwd or ROOT,
    )


def start_service(module: str, config, *extra: str, env: dict[str, str] | None = None):
    """A service started by hand on a free loopback port, as on another host: (process, port).

    Its stderr (the log) goes to a temporary file, not a pipe nobody reads (a full pipe would stall
    the service); a service that exits before its ready line fails the test with that log."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--config", str(config), "--host", "127.0.0.1", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env or cli_env(),
        cwd=ROOT,
    )
    proc.log = log  # kept open as long as the process object lives
    line = proc.stdout.readline()
    if "REDHEART_READY" not in line:
        proc.wait(timeout=30)
        log.seek(0)
        raise AssertionError(
            f"{module} exited with {proc.returncode} before it was ready:\n{log.read()[-2000:]}"
        )
    return proc, int(line.split("port=")[1].split()[0])
