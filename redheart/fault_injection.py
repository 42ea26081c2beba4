"""TEST-ONLY fault injection: SIGKILL a service at a chosen phase of a chosen step.

Inspired by TorchFT's ``FailureInjector``, but the kill is real (``SIGKILL``, no cleanup) and
happens inside the victim process at a precise moment, which a kill from outside cannot hit.
Nothing here runs unless the environment variable ``REDHEART_TEST_FAULTS`` names a plan file;
the services never set it themselves, so a production process pays nothing (no interceptor is
installed). The plan is JSON::

    {"faults": [
        {"service": "gpu_stage", "phase": "SaveState", "step": 3},
        {"service": "cpu_stage", "phase": "ApplyStep", "step": 5, "when": "after"},
        {"service": "cpu_stage", "phase": "LoadState", "step": "*"},
        {"service": "gpu_stage", "phase": "Startup",   "step": 1},
        {"service": "cpu_stage", "phase": "RunStep",   "step": 7, "action": "mark"}
    ]}

* ``service``: the process's ``REDHEART_SERVICE`` (the local launcher sets it on every child:
  ``cpu_stage``, ``gpu_stage``, ``regret``; tests that start services themselves set it too).
* ``phase``: a gRPC method of that service (``StartRun``, ``RunStep``, ``ApplyStep``,
  ``SaveState``, ``LoadState``, ``Score``, ...), ``Evaluate`` (a forward-only RunStep), or
  ``Startup`` (while the server is being built, before it reports ready).
* ``step``: the request's step (``envelope.step``, ``step`` or ``first_step``; the evaluation pass
  number for ``Evaluate``; for ``Startup`` how many times the launcher restarted the service
  before, so 0 is the first start), or ``"*"`` for any.
* ``when``: ``before`` (default: on entering the handler) or ``after`` (the handler has done its
  work, the answer is not sent yet: e.g. a step applied on this stage that the orchestrator never
  hears about).
* ``action``: ``kill`` (default, SIGKILL of this process) or ``mark`` (only record that the moment
  was reached, so a test can act on it from outside); ``delay_seconds`` waits before acting.

The orchestrator has one fault point of its own, ``RunStep cpu stage`` / ``RunStep gpu stage``
(service ``orchestrator``: just before it sends that stage its plan), so a test can kill the
orchestrator mid-step with one stage holding a plan and the other not.

Each fault fires once across every process of the run (a restarted service does not fire it
again): firing means creating ``<plan>.fired/<index>.json`` with O_EXCL, which also tells the test
which faults happened, when and in which pid.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc

PLAN_ENV = "REDHEART_TEST_FAULTS"
SERVICE_ENV = "REDHEART_SERVICE"
RESTART_ENV = "REDHEART_RESTART_COUNT"


def _plan() -> tuple[Path, list[dict[str, Any]]] | None:
    path = os.environ.get(PLAN_ENV)
    if not path or not os.environ.get(SERVICE_ENV):
        return None
    plan = json.loads(Path(path).read_text(encoding="utf-8"))
    return Path(path), list(plan.get("faults", []))


def fired_dir(plan_path: str | os.PathLike[str]) -> Path:
    return Path(f"{plan_path}.fired")


def fired(plan_path: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """The faults of a plan that fired so far: index -> what was recorded when it fired."""
    out = {}
    directory = fired_dir(plan_path)
    if directory.is_dir():
        for f in directory.glob("*.json"):
            try:
                out[int(f.stem)] = json.loads(f.read_text(encoding="utf-8") or "{}")
            except (ValueError, json.JSONDecodeError):
                out[int(f.stem)] = {}  # being written right now: it fired all the same
    return out


def point(phase: str, step: int, when: str = "before") -> None:
    """Fire the first matching, not yet fired fault of this process for (phase, step, when)."""
    loaded = _plan()
    if loaded is None:
        return
    path, faults = loaded
    service = os.environ[SERVICE_ENV]
    for index, fault in enumerate(faults):
        if fault.get("service") != service or fault.get("phase") != phase:
            continue
        if fault.get("when", "before") != when or fault.get("step", "*") not in ("*", step):
            continue
        directory = fired_dir(path)
        directory.mkdir(exist_ok=True)
        try:
            fd = os.open(directory / f"{index}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue  # fired already (maybe in an earlier incarnation of this service)
        record = {
            "pid": os.getpid(),
            "time": time.time(),
            "service": service,
            "phase": phase,
            "step": step,
            "when": when,
            "action": fault.get("action", "kill"),
        }
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        os.close(fd)
        time.sleep(float(fault.get("delay_seconds", 0.0)))  # e.g. let a concurrent call go out first
        if fault.get("action", "kill") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return


def _step_of(request: Any) -> int:
    envelope = getattr(request, "envelope", None)
    if envelope is not None:
        return int(envelope.step)
    for name in ("step", "first_step"):
        if hasattr(request, name):
            return int(getattr(request, name))
    return -1


def _request_class(full_method: str):
    """The request message type of "/package.Service/Method" (from the registered descriptors)."""
    from google.protobuf import descriptor_pool, message_factory

    service, _, method = full_method.lstrip("/").rpartition("/")
    try:
        desc = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except (KeyError, AttributeError):
        return None
    return None if desc is None else message_factory.GetMessageClass(desc.input_type)


def _parsed(request: Any, request_class) -> Any:
    # The services parse their requests inside the handler (redheart/guard.py), so an interceptor
    # sees the raw bytes: parse a copy to read its step (bytes that do not parse have none).
    if not isinstance(request, (bytes, bytearray)) or request_class is None:
        return request
    try:
        return request_class.FromString(bytes(request))
    except Exception:  # noqa: BLE001 - the handler answers malformed bytes itself
        return None


class _FaultInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        request_class = _request_class(handler_call_details.method)
        inner = handler.unary_unary

        def behaviour(request, context):
            message = _parsed(request, request_class)
            phase = "Evaluate" if method == "RunStep" and getattr(message, "forward_only", False) else method
            step = _step_of(message)
            point(phase, step, "before")
            response = inner(request, context)
            point(phase, step, "after")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behaviour, handler.request_deserializer, handler.response_serializer
        )


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """The fault interceptor when a plan is set for this process, else nothing.

    Also the ``Startup`` fault point: servers are built while the service starts."""
    if _plan() is None:
        return []
    point("Startup", int(os.environ.get(RESTART_ENV, "0") or 0))
    return [_FaultInterceptor()]
