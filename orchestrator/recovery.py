"""Recovery from a dead or unreachable service, in every phase of a run.

The trainer runs each phase (start, a step, its apply, evaluation, a checkpoint save) inside
:func:`phase`, which turns a service failure into :class:`PhaseFailed`. One loop in the trainer
catches it and calls :meth:`Recovery.recover`, which

1. decides whether the failure is a *fault* (a process died or went away, a call timed out or was
   aborted because of another failure) or a bug / bad input that a retry would only repeat;
2. restarts the dead local services (same ports, so the peers keep their addresses);
3. waits until every service is SERVING, watching the processes (a dead one is restarted instead
   of being waited on for the step deadline) and the stop request (SIGTERM ends the wait);
4. puts every stage back at the last complete checkpoint (the trainer's ``restore``).

A failure inside steps 2-4 (a service killed again while the run recovers) goes round the loop
again; every round costs one restart of ``launch.max_restarts``, so nothing loops for ever.

A step is applied on every stage or on none: when an ApplyStep fails, some stages may have stepped
their optimizer and others not, so any ApplyStep failure counts as a fault and every stage goes back
to the last checkpoint, which predates the step on all of them. Re-running from there is exact:
data order, RNG and loss scale are all restored with the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator.launcher import LaunchError, LocalLauncher
from orchestrator.pipeline import StepFailed
from orchestrator.service_set import RunError
from orchestrator.stage_client import StageClient
from orchestrator.stages import stage_specs
from redheart.config import HybridConfig
from redheart.regret_client import SERVICE as REGRET_SERVICE
from redheart.rpc import ServiceError, wait_for_serving
from redheart.stage.errors import TRANSIENT_REASONS

log = logging.getLogger(__name__)

# Statuses a restart or a retry from the last checkpoint can cure: the service went away,
# timed out, or the step was aborted because another one did.
FAULT_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "UNKNOWN"}


class PhaseFailed(RuntimeError):
    """A phase of the run failed because a call to a service (or a restart) failed."""

    def __init__(self, phase: str, step: int, cause: BaseException) -> None:
        inner = cause.cause if isinstance(cause, StepFailed) else None
        if isinstance(inner, ServiceError) and inner.method == "ApplyStep":
            phase = "ApplyStep"  # the driver's run_step covers RunStep and ApplyStep
        self.phase = phase
        self.step = step
        self.cause = cause
        super().__init__(f"{phase} of step {step} failed: {cause}")


class RecoveryStopped(RuntimeError):
    """SIGTERM / SIGINT arrived while the run was recovering."""


def _run_error(message: str, failure: PhaseFailed) -> Exception:
    error = RunError(message)
    error.__cause__ = failure
    return error


@contextmanager
def phase(name: str, step: int) -> Iterator[None]:
    """Run a phase; a failed call to a service or a failed restart becomes PhaseFailed.

    Anything else (a bug in the orchestrator, NonFiniteError, KeyboardInterrupt) passes through
    unchanged: recovering from it would only repeat it."""
    try:
        yield
    except (StepFailed, ServiceError, LaunchError) as exc:
        raise PhaseFailed(name, step, exc) from exc


def service_fault(error: ServiceError) -> bool:
    if error.code is None:
        return True
    if error.code.name == "FAILED_PRECONDITION":
        # "This stage lost or is still finishing our run", not "your request is wrong": a stage
        # restarted on its own (remote mode: a pod rescheduled) knows no run; one still inside a
        # round that was aborted refuses control calls until it leaves it. Told by the stage's
        # typed reason (trailing metadata), never by its message.
        return error.reason in TRANSIENT_REASONS
    return error.code.name in FAULT_CODES


@dataclass
class Recovery:
    config: HybridConfig
    launcher: LocalLauncher | None
    addresses: dict[str, str]
    clients: dict[str, StageClient]
    restarts: dict[str, int]  # shared with the trainer (report, checkpoints)
    recoveries: list[dict[str, Any]]  # shared with the trainer (report)
    stop_requested: Any  # threading.Event
    restore: Callable[[], int]  # puts every stage at the last complete checkpoint; returns its step
    on_restart: Callable[[str], None] = lambda name: None  # metrics

    def is_fault(self, failure: PhaseFailed) -> bool:
        if self.launcher is not None and self.launcher.dead():
            return True
        if failure.phase == "ApplyStep":
            return True  # maybe applied on some stages only: recover all of them (module docstring)
        cause = failure.cause
        if isinstance(cause, LaunchError):
            return True  # a restart that failed (e.g. the port still held): try again
        if isinstance(cause, StepFailed):
            cause = cause.cause
            if not isinstance(cause, ServiceError):
                return isinstance(cause, RuntimeError)  # a process died, or a stage never answered its abort
        return isinstance(cause, ServiceError) and service_fault(cause)

    def recover(self, failure: PhaseFailed) -> int:
        """Bring the services back and restore the last checkpoint; return the step to run next."""
        while True:
            if not self.is_fault(failure):
                raise _run_error(str(failure.cause), failure)  # a bug or bad input: recovering would loop
            log.warning("%s -- recovering from the last complete checkpoint", failure)
            restarted: list[str] = []
            try:
                self._restart_dead(failure, restarted)
                self._wait_until_serving()
                step = self.restore()
            except (StepFailed, ServiceError, LaunchError) as exc:
                self._record(failure, restarted, None)
                failure = PhaseFailed("restore", failure.step, exc)  # killed again while recovering
                continue
            self._record(failure, restarted, step)
            log.warning("recovered: continuing from step %d", step)
            return step

    # ---- the parts of one recovery round

    def _restart_dead(self, failure: PhaseFailed, restarted: list[str]) -> None:
        """Spend one restart of the budget and start the dead local services again."""
        if self.launcher is not None:
            time.sleep(0.5)  # let a dying process finish dying before we look
        used = sum(self.restarts.values())
        limit = self.config.launch.max_restarts
        if used >= limit:
            raise _run_error(
                f"{failure}; giving up after {used} recoveries (launch.max_restarts = {limit})", failure
            )
        dead = self.launcher.dead() if self.launcher is not None else []
        if not dead:
            # Nothing died (a dropped connection, a deadline, a half-applied step): count it all the same.
            key = self._blame(failure)
            self.restarts[key] += 1
            self.on_restart(key)
        if dead:
            self._check_stop("before restarting " + ", ".join(dead))
            for name in dead:
                log.warning(
                    "restarting %s (it exited with code %s)",
                    name,
                    self.launcher.services[name].proc.returncode,
                )
                self.restarts[name] += 1
                self.on_restart(name)
            # Side by side: a restart is mostly the interpreter importing torch, seconds each.
            with ThreadPoolExecutor(len(dead)) as pool:
                started = {name: pool.submit(self.launcher.restart, name) for name in dead}
            for name, future in started.items():
                svc = future.result()  # LaunchError: another round (costs a restart)
                self.addresses[name] = svc.address
                restarted.append(name)
            # A channel that saw its server die backs off before reconnecting (up to minutes after
            # repeated failures): give the restarted services fresh ones.
            for client in self.clients.values():
                client.reconnect()

    def _blame(self, failure: PhaseFailed) -> str:
        """The service a recovery in which nothing died is counted against: the one that failed,
        or the one its answer names as the culprit (a stage whose regret service went away)."""
        cause = failure.cause
        inner = cause.cause if isinstance(cause, StepFailed) else cause
        where = cause.stage if isinstance(cause, StepFailed) else getattr(cause, "service", "")
        culprit = getattr(inner, "culprit", None) or getattr(inner, "service", None)
        if culprit == REGRET_SERVICE and "regret" in self.addresses:
            return "regret"
        names = [s.name for s in stage_specs(self.config)]
        named = where.replace(" ", "_")  # a StageClient's name: "gpu stage 1" -> "gpu_stage_1"
        return named if named in names else ("gpu_stage" if "gpu" in where else "cpu_stage")

    def _wait_until_serving(self) -> None:
        for name in (*(s.name for s in stage_specs(self.config)), "regret"):
            address = self.addresses.get(name, "")
            if not address or address == "inprocess":
                continue
            wait_for_serving(
                address,
                timeout=self.config.orchestrator.step_deadline_seconds,
                service_name=name.replace("_", " "),
                alive=self._alive(name),
                security=self.config.security,
            )

    def _alive(self, name: str) -> Callable[[], bool]:
        svc = self.launcher.services.get(name) if self.launcher is not None else None

        def alive() -> bool:
            self._check_stop(f"while waiting for the {name.replace('_', ' ')}")
            return svc is None or svc.alive()  # remote: no process to watch, only its health

        return alive

    def _check_stop(self, where: str) -> None:
        if self.stop_requested.is_set():
            raise RecoveryStopped(
                f"stopped by a signal {where}, during a recovery; the last complete "
                f"checkpoint is kept (continue with --resume)"
            )

    def _record(self, failure: PhaseFailed, restarted: list[str], resumed_from: int | None) -> None:
        cause = failure.cause
        stage = cause.stage if isinstance(cause, StepFailed) else getattr(cause, "service", "")
        self.recoveries.append(
            {
                "failed_step": failure.step,
                "phase": failure.phase,
                "stage": stage,
                "error": str(cause)[:500],
                "restarted": restarted,
                "resumed_from_step": resumed_from,
                "time": time.time(),
            }
        )
