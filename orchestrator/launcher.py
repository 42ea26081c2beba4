"""Local launch: the orchestrator starts the services as child processes on loopback.

Each child runs ``python -m <package>.cli --config <resolved config>``; with ``launch.ports =
"auto"`` it binds port 0 and reports the port it got on one stdout line::

    REDHEART_READY service=cpu_stage port=43121 metrics_port=40117

Children run in their own process group so a Ctrl-C at the terminal reaches the orchestrator
first, which then stops them in order (SIGTERM, a grace period, SIGKILL). They are stopped on
every exit path: normal end, errors, signals, and interpreter exit (atexit).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.stages import StageSpec, stage_specs
from redheart.config import HybridConfig

log = logging.getLogger(__name__)

_READY = re.compile(r"REDHEART_READY service=(\S+) port=(\d+) metrics_port=(\d+)")

SERVICE_MODULES = {
    "cpu_stage": "cpu_stage.cli",
    "gpu_stage": "gpu_stage.cli",
    "regret": "regret_service.cli",
}


class LaunchError(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    name: str  # cpu_stage | gpu_stage | regret
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    port: int = 0
    metrics_port: int = 0
    restarts: int = 0
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self._ready.clear()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab", buffering=0)
        log_file.write(f"\n--- starting {' '.join(self.argv)} ---\n".encode())
        # Who it is and how often it was restarted: read only by the test-only fault injection
        # (redheart/fault_injection.py), which is inert unless REDHEART_TEST_FAULTS is set.
        env = dict(self.env, REDHEART_SERVICE=self.name, REDHEART_RESTART_COUNT=str(self.restarts))
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log_file.close()
        self._reader = threading.Thread(
            target=self._read_stdout, args=(self.proc,), name=f"{self.name}-stdout", daemon=True
        )
        self._reader.start()

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab", buffering=0) as out:
            for raw in proc.stdout:
                out.write(raw)
                match = _READY.search(raw.decode(errors="replace"))
                if match:
                    self.port = int(match.group(2))
                    self.metrics_port = int(match.group(3))
                    self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.2):
                return
            if not self.alive():
                raise LaunchError(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} before it was ready; "
                    f"its log {self.log_path} ends with:\n{tail(self.log_path)}"
                )
        raise LaunchError(
            f"{self.name} did not report ready within {timeout:.0f}s; see {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs of SIGTERM; killing it", self.name, grace)
                self.kill()
            except ProcessLookupError:
                pass
        if self._reader is not None:
            self._reader.join(timeout=2)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait(10)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def gpu_stage_on_cuda(config: HybridConfig) -> bool:
    device = config.gpu_stage.device
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def stage_threads(config: HybridConfig, cores: int) -> tuple[int, ...]:
    """torch intra-op threads of each stage, in pipeline order, on a machine of `cores` cores.

    With the GPU stages on CUDA, their host threads only launch kernels and copies: one or two
    threads do, and every other core goes to the CPU stage, which then sets the pace of the
    pipeline. With every stage on the CPU, the cores are shared in proportion to each stage's layers
    (the embedding lookup is cheap; its gradient and AdamW update count as about one layer; the
    heads and losses as half of one), so no stage waits on another for lack of threads.
    """
    from redheart.model import stage_layer_ranges

    ranges = stage_layer_ranges(config.model)
    p = len(ranges)
    if cores <= 1:
        return (1,) * p
    if gpu_stage_on_cuda(config):
        gpu = 1 if cores < 8 else 2
        return (max(1, cores - gpu * (p - 1)), *(gpu,) * (p - 1))
    work = [len(r) + (1.0 if i == 0 else 0.0) + (0.5 if i == p - 1 else 0.0) for i, r in enumerate(ranges)]
    threads: list[int] = []
    for i, w in enumerate(work[:-1]):
        left_for_rest = p - 1 - i  # each later stage keeps at least one core while cores last
        share = round(cores * w / sum(work))
        threads.append(min(max(1, cores - sum(threads) - left_for_rest), max(1, share)))
    threads.append(max(1, cores - sum(threads)))
    return tuple(threads)


class LocalLauncher:
    """Starts, watches, restarts and stops the local services of one run."""

    def __init__(self, config: HybridConfig, config_path: Path, log_dir: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.log_dir = log_dir
        self.services: dict[str, ServiceProcess] = {}
        self.stages: dict[str, StageSpec] = {s.name: s for s in stage_specs(config)}
        self._closed = False
        atexit.register(self.stop_all)

    def _argv(self, name: str) -> list[str]:
        cfg = self.config
        spec = self.stages.get(name)
        section_name = spec.config_section if spec is not None else name
        argv = [sys.executable, "-m", SERVICE_MODULES[section_name], "--config", str(self.config_path)]
        section = getattr(cfg, section_name)
        auto = cfg.launch.ports == "auto"
        argv += ["--host", "127.0.0.1", "--port", "0" if auto else str(section.port)]
        if cfg.metrics.enabled:
            argv += ["--metrics-port", "0" if auto else str(section.metrics_port)]
        if spec is None:
            return argv
        for override in spec.overrides():
            argv += ["--set", override]
        if section.threads == 0:
            # The replicas of the pipeline share this host's cores.
            cores = max(1, (os.cpu_count() or 1) // cfg.parallel.data_parallel)
            threads = stage_threads(cfg, cores)[spec.rank]
            argv += ["--set", f"{section_name}.threads={threads}"]
        return argv

    def start(self, names: list[str]) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["REDHEART_PARENT_PID"] = str(os.getpid())  # services stop by themselves if we are killed
        if self.config.security.token:
            # The resolved config.toml the children read says token = "<redacted>" (secrets are not
            # written to the run directory); the environment, which wins over the file, carries it.
            env["REDHEART_SECURITY__TOKEN"] = self.config.security.token
        for name in names:
            svc = ServiceProcess(name, self._argv(name), self.log_dir / f"{name}.log", env)
            self.services[name] = svc
            svc.start()
        for name in names:
            self.services[name].wait_ready(self.config.launch.startup_timeout_seconds)
            log.info(
                "started %s (pid %d) on %s, metrics port %s",
                name,
                self.services[name].pid,
                self.services[name].address,
                self.services[name].metrics_port or "off",
            )

    def restart(self, name: str) -> ServiceProcess:
        """Start a dead service again on the same port (peers keep their addresses)."""
        svc = self.services[name]
        svc.stop(grace=5.0)
        argv = list(svc.argv)
        if "--port" in argv:
            argv[argv.index("--port") + 1] = str(svc.port)
        if "--metrics-port" in argv and svc.metrics_port:
            argv[argv.index("--metrics-port") + 1] = str(svc.metrics_port)
        svc.argv = argv
        svc.restarts += 1
        deadline = time.monotonic() + self.config.launch.startup_timeout_seconds
        while True:
            svc.start()
            try:
                svc.wait_ready(self.config.launch.startup_timeout_seconds)
                return svc
            except LaunchError:
                # The old socket can linger for a moment after a kill -9; try again until the deadline.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def dead(self) -> list[str]:
        return [name for name, svc in self.services.items() if not svc.alive()]

    def stop_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Stages first (they hold the run's state), the regret service last.
        for name in (*self.stages, "regret"):
            svc = self.services.get(name)
            if svc is not None:
                code = svc.stop()
                log.info("stopped %s (exit code %s)", name, code)
        atexit.unregister(self.stop_all)
