"""The recovery policy on its own: what counts as a fault, the restart budget, a restore that fails
and is retried, and a stop request while a service is awaited."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from conftest import free_port

from orchestrator.pipeline import StepFailed
from orchestrator.recovery import PhaseFailed, Recovery, RecoveryStopped, phase
from orchestrator.trainer import RunError
from redheart.config import HybridConfig
from redheart.rpc import ServiceError
from redheart.stage.errors import ErrorReason


def _error(code, details="boom", method="RunStep", service="gpu stage"):
    return ServiceError(service, "127.0.0.1:1", method, code, details)


def _recovery(restore, *, max_restarts=5, addresses=None, stop=None):
    cfg = HybridConfig(
        model={"preset": "tiny"},
        launch={"max_restarts": max_restarts},
        orchestrator={"step_deadline_seconds": 600.0},
    )
    return Recovery(
        cfg,
        None,
        addresses or {},
        {},
        {"cpu_stage": 0, "gpu_stage": 0, "regret": 0},
        [],
        stop or threading.Event(),
        restore=restore,
    )


def _failed(name, cause, step=3):
    try:
        with phase(name, step):
            raise cause
    except PhaseFailed as exc:
        return exc
    raise AssertionError("phase() did not wrap the failure")


@pytest.mark.parametrize(
    "code, details, reason, fault",
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", None, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", None, True),
        (grpc.StatusCode.ABORTED, "step 3 was aborted", None, True),
        (grpc.StatusCode.FAILED_PRECONDITION, "no run started on this stage", ErrorReason.NO_RUN, True),
        (grpc.StatusCode.FAILED_PRECONDITION, "run 'q' is not the current run", ErrorReason.OTHER_RUN, True),
        (grpc.StatusCode.FAILED_PRECONDITION, "a step is running", ErrorReason.ROUND_RUNNING, True),
        # Recovery reads the typed reason, never the text: the same words without it are not a fault.
        (grpc.StatusCode.FAILED_PRECONDITION, "no run started on this stage", None, False),
        (grpc.StatusCode.FAILED_PRECONDITION, "checkpoint x was written by a different model", None, False),
        (grpc.StatusCode.INVALID_ARGUMENT, "unknown schedule", None, False),
        (grpc.StatusCode.INTERNAL, "a bug", None, False),
    ],
)
def test_what_counts_as_a_fault(code, details, reason, fault):
    recovery = _recovery(lambda: 0)
    save = ServiceError("gpu stage", "127.0.0.1:1", "SaveState", code, details, reason=reason)
    step = ServiceError("gpu stage", "127.0.0.1:1", "RunStep", code, details, reason=reason)
    assert recovery.is_fault(_failed("SaveState", save)) is fault
    assert recovery.is_fault(_failed("RunStep", StepFailed(3, "gpu stage", step))) is fault


@pytest.mark.parametrize(
    "cause, blamed",
    [
        # The GPU stage answered, but names its regret service as what failed (a trailer, not text).
        (
            StepFailed(
                3,
                "gpu stage",
                ServiceError(
                    "gpu stage", "a:1", "RunStep", grpc.StatusCode.UNAVAILABLE, "x", culprit="regret service"
                ),
            ),
            "regret",
        ),
        # The message mentions the regret service, the culprit does not: the stage is blamed.
        (
            StepFailed(
                3,
                "gpu stage",
                ServiceError("gpu stage", "a:1", "RunStep", grpc.StatusCode.UNAVAILABLE, "regret x"),
            ),
            "gpu_stage",
        ),
        (ServiceError("regret service", "a:1", "Score", grpc.StatusCode.UNAVAILABLE, "gone"), "regret"),
        (ServiceError("cpu stage", "a:1", "SaveState", grpc.StatusCode.UNAVAILABLE, "gone"), "cpu_stage"),
    ],
)
def test_a_recovery_in_which_nothing_died_is_counted_against_the_culprit(cause, blamed):
    recovery = _recovery(lambda: 0, addresses={"regret": "inprocess"})
    recovery.recover(_failed("RunStep", cause))
    assert recovery.restarts == {**{"cpu_stage": 0, "gpu_stage": 0, "regret": 0}, blamed: 1}


def test_any_apply_failure_is_a_fault_so_no_stage_stays_a_step_ahead():
    # The CPU stage may have applied the step when the GPU stage refused it: both go back.
    refused = _error(grpc.StatusCode.INVALID_ARGUMENT, "bad clip", method="ApplyStep")
    cause = StepFailed(4, "gpu stage", refused)
    failure = _failed("RunStep", cause)
    assert failure.phase == "ApplyStep"
    assert _recovery(lambda: 0).is_fault(failure)


def test_bugs_pass_through_the_phase_unchanged():
    with pytest.raises(KeyError):
        with phase("Evaluate", 2):
            raise KeyError("regret")


def test_a_restore_that_fails_is_retried_and_each_round_costs_a_restart():
    calls = []

    def restore():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise _error(
                grpc.StatusCode.UNAVAILABLE, "killed while loading", method="LoadState", service="cpu stage"
            )
        return 7

    recovery = _recovery(restore)
    assert recovery.recover(_failed("SaveState", _error(grpc.StatusCode.UNAVAILABLE), step=8)) == 7
    assert len(calls) == 3
    assert sum(recovery.restarts.values()) == 3
    assert [r["phase"] for r in recovery.recoveries] == ["SaveState", "restore", "restore"]
    assert [r["resumed_from_step"] for r in recovery.recoveries] == [None, None, 7]


def test_the_restart_budget_ends_a_run_that_keeps_failing():
    def restore():
        raise _error(grpc.StatusCode.UNAVAILABLE, "still dead", method="StartRun")

    recovery = _recovery(restore, max_restarts=3)
    with pytest.raises(RunError, match="giving up after 3 recoveries"):
        recovery.recover(_failed("RunStep", StepFailed(1, "cpu stage", _error(grpc.StatusCode.UNAVAILABLE))))


def test_not_a_fault_is_not_recovered():
    recovery = _recovery(lambda: pytest.fail("must not restore"))
    with pytest.raises(RunError, match="unknown schedule"):
        bad_plan = _error(grpc.StatusCode.INVALID_ARGUMENT, "unknown schedule")
        recovery.recover(_failed("RunStep", StepFailed(1, "cpu stage", bad_plan)))
    assert recovery.recoveries == []


def test_a_stop_request_ends_the_wait_for_a_service_that_does_not_come_back():
    stop = threading.Event()
    nobody = {"cpu_stage": f"127.0.0.1:{free_port()}"}  # never comes back
    recovery = _recovery(lambda: pytest.fail("must not restore"), addresses=nobody, stop=stop)
    threading.Timer(0.5, stop.set).start()
    start = time.monotonic()
    with pytest.raises(RecoveryStopped, match="during a recovery"):
        recovery.recover(_failed("RunStep", StepFailed(1, "cpu stage", _error(grpc.StatusCode.UNAVAILABLE))))
    assert time.monotonic() - start < 120  # not the 600 s step deadline
