"""A run's output directory and process surroundings: one run at a time (the lock file), the resolved
config.toml, the stop signals, the TensorBoard writer, the metrics endpoint, memory samples."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from orchestrator.service_set import RunError
from redheart.metrics_common import start_metrics_endpoint

log = logging.getLogger(__name__)


class OutputLock:
    """One run per output directory: a lock file holding the pid; stale when that process is gone."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self.held = False

    def holder(self) -> int | None:
        try:
            pid = int(self.path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if pid == os.getpid():
            return None
        return pid if psutil.pid_exists(pid) else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        other = self.holder()
        if other is not None:
            raise RunError(
                f"{self.path.parent} is in use by another run (pid {other}); "
                f"fix: wait for it, stop it, or pass another --output-dir"
            )
        self.path.write_text(f"{os.getpid()} {time.time():.0f}\n")
        self.held = True

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


def prepare_output(config, output_dir: Path, stack: ExitStack) -> OutputLock:
    """Create and lock the output directory (released when `stack` closes); write config.toml."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(output_dir)
    lock.acquire()
    stack.callback(lock.release)
    (output_dir / "config.toml").write_text(config.to_toml(), encoding="utf-8")
    return lock


def install_stop_handlers(stop_requested: threading.Event, stack: ExitStack) -> None:
    """SIGINT / SIGTERM: finish the step, checkpoint and stop; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        if stop_requested.is_set():
            raise KeyboardInterrupt
        log.warning(
            "received %s: finishing the current step, then checkpoint and stop (again to abort)",
            signal.Signals(signum).name,
        )
        stop_requested.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    stack.callback(lambda: [signal.signal(s, h) for s, h in previous.items()])


def open_tensorboard(config, output_dir: Path, stack: ExitStack):
    """The TensorBoard writer when metrics.tensorboard is on (closed with `stack`), else None."""
    from orchestrator.tensorboard import TensorBoardUnavailable, open_writer

    try:
        writer = open_writer(config, output_dir)
    except TensorBoardUnavailable as exc:
        raise RunError(str(exc)) from None
    if writer is not None:
        stack.callback(writer.close)
    return writer


def start_metrics(config, registry, stack: ExitStack) -> int:
    """Serve the orchestrator's /metrics until `stack` closes; the bound port, or 0 when it is off.

    Closed with the run: a Python caller that trains twice in one process must not keep the first
    run's port (and its thread) for the life of the interpreter."""
    cfg = config
    if not (cfg.metrics.enabled and cfg.orchestrator.metrics_port):
        return 0
    auto = cfg.launch.mode == "local" and cfg.launch.ports == "auto"
    port = 0 if auto else cfg.orchestrator.metrics_port
    try:
        server, bound = start_metrics_endpoint(registry, cfg.metrics.host, port)
    except OSError as exc:
        raise RunError(
            f"cannot serve orchestrator metrics on {cfg.metrics.host}:{port}: {exc} "
            f"(fix: another orchestrator.metrics_port, or 0 to disable)"
        ) from None
    stack.callback(server.server_close)
    stack.callback(server.shutdown)  # runs first: stop serve_forever, then release the socket
    log.info("orchestrator metrics on http://%s:%d/metrics", cfg.metrics.host, bound)
    return bound


def sample_memory(launcher, peak_rss: dict[str, int]) -> dict[str, int]:
    """Resident memory of this process and of the local services now; raises `peak_rss` in place."""
    procs = {"orchestrator": psutil.Process()}
    if launcher is not None:
        for name, svc in launcher.services.items():
            if svc.alive():
                try:
                    procs[name] = psutil.Process(svc.pid)
                except psutil.NoSuchProcess:
                    pass
    out = {}
    for name, proc in procs.items():
        try:
            rss = proc.memory_info().rss
            if name == "regret":  # its workers are child processes: count them too
                rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            continue
        out[name] = rss
        peak_rss[name] = max(peak_rss.get(name, 0), rss)
    return out
