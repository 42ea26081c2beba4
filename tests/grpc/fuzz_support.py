"""Shared core of the property-based fuzz tests of every RPC of every service (tests/grpc/test_fuzz_*.py).

The tests are in test_fuzz_stage.py, test_fuzz_regret.py, test_fuzz_regressions.py and
test_fuzz_zz_count.py (the count, last by name); the request strategies in fuzz_values.py,
fuzz_stage_requests.py and fuzz_requests.py; the servers' fixtures at the end of this module
(test modules load them with ``pytest_plugins``).
This module holds the constants, the bookkeeping shared by every batch and the stage servers.

Fuzzing runs over real gRPC on loopback (no mocks).

Targets: PipelineStage (Describe, StartRun, RunStep, ApplyStep, AbortStep, PushTensor, SaveState,
LoadState, GetParameters) on the CPU and on the GPU stage server, and RegretService.Score.

Three kinds of bad request per RPC, each a separate hypothesis batch (``derandomize=True``: CI
draws the same requests every time):

* ``random``  - random bytes as the raw request payload, sent through a generic channel method
  (``request_serializer=None``), so even unparsable protobuf reaches the server;
* ``hostile`` - structurally valid protobufs with hostile fields (unknown dtype codes, negative /
  huge / too many dimensions, data of the wrong length, NaN / Inf, huge batches, unknown runs,
  negative / huge steps and micro-batch indices, absurd multipliers, empty plans, duplicate
  indices, path traversal and device paths in SaveState / LoadState, corrupt checkpoint shards);
* ``mutated`` - a valid serialized request with bytes flipped, replaced, inserted or deleted.

Every call has a deadline (5 s). The verdict on each answer:

* any status but OK is fine for garbage; OK is fine where the request happens to be valid;
* a client-side DEADLINE_EXCEEDED is a HANG, except for a RunStep whose plan asks the stage to wait
  for its peer longer than the call's deadline (it legitimately waits): the test then does what the
  orchestrator does, AbortStep, and requires the stage to be idle again within 3 s;
* INTERNAL / UNKNOWN are bugs, with one exception: grpc itself answers INTERNAL "Exception
  deserializing request!" to a payload that is not a valid protobuf of the request type (checked
  by parsing the same bytes here). A known bug in a file this test does not own can be listed in
  KNOWN_BUGS (with a strict-xfail test reproducing it) so it fails only that test; none at present;
* after each batch both servers still answer health SERVING, and a valid request is served
  correctly: a real pipelined step gives the losses of single-process training; Score of a valid
  batch equals ``redheart.calculus.score`` bit for bit.

The bugs this fuzzer found have regression tests in test_fuzz_regressions.py. ``REDHEART_FUZZ_LOG=path``
writes one line per request (target, method, strategy, status, seconds, details) for triage.

SaveState writes where it is told (the orchestrator owns the layout) and the tests run as whatever
user CI uses, possibly root: a request that would actually write is only sent when its directory
lies inside the fuzz tests' sandbox (or is one of the device paths where every write fails), and the
servers run with the sandbox as working directory, so relative traversal ("../../etc") stays inside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from synthetic import synthetic_batch

from cpu_stage.server import create_server as cpu_server
from gpu_stage.server import create_server as gpu_server
from orchestrator.pipeline import PipelineDriver
from orchestrator.reference import SingleProcessTrainer
from orchestrator.stage_client import StageClient
from orchestrator.stages import plan_inputs
from redheart.config import HybridConfig
from redheart.v1 import regret_pb2, stage_pb2
from regret_service.server import create_server as regret_server

RUN_ID = "fuzz-run"
CALL_TIMEOUT = 5.0  # every call's deadline
WAIT_TIMEOUT = 1.5  # the deadline of a RunStep that legitimately waits on its peer
MIN_BAD_REQUESTS = 1000
MAX_BATCH = 256
HIDDEN = 64  # the tiny preset
VOCAB = 2048
STAGE_SERVICE = "redheart.v1.PipelineStage"
REGRET_SERVICE = "redheart.v1.RegretService"
UNPARSABLE = "Exception deserializing request!"  # grpc's own answer to bytes that are not the request type

N_RANDOM, N_HOSTILE, N_MUTATED = 20, 30, 30  # per RPC and stage; Score gets 3x as many
N_HOSTILE_BY_METHOD = {"RunStep": 80, "PushTensor": 40, "LoadState": 40, "ApplyStep": 40}
FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
    derandomize=True,
    database=None,
    print_blob=False,
)

REQUEST_TYPES = {
    "Describe": stage_pb2.DescribeRequest,
    "StartRun": stage_pb2.StartRunRequest,
    "RunStep": stage_pb2.StepPlan,
    "ApplyStep": stage_pb2.ApplyRequest,
    "AbortStep": stage_pb2.AbortRequest,
    "PushTensor": stage_pb2.TensorTransfer,
    "SaveState": stage_pb2.SaveStateRequest,
    "LoadState": stage_pb2.LoadStateRequest,
    "GetParameters": stage_pb2.GetParametersRequest,
    "Score": regret_pb2.ScoreRequest,
}
STAGE_METHODS = [m for m in REQUEST_TYPES if m != "Score"]
CPU_KEYS, GPU_KEYS = plan_inputs(0, 2), plan_inputs(1, 2)  # what each stage's plan carries
LABEL_KEYS = GPU_KEYS[1:]

# Bugs in files these tests do not own, each reproduced by a strict-xfail test in
# test_fuzz_regressions.py: INTERNAL/UNKNOWN answers matching an entry are counted as known instead of
# failing every fuzz batch that meets them.
KNOWN_BUGS: list[tuple[str, str, str, str]] = [
    # (name, stage or "*", method, regex on the details), e.g. the label checks of the GPU stage before
    # commit b5c691a: ("gpu-labels", "gpu", "RunStep", r"^RunStep: IndexError: Target -?\d+ is out of bounds")
]

# ----------------------------------------------------------------------------- bookkeeping

STATS: Counter = Counter()  # (service, method, strategy) -> requests sent
OUTCOMES: Counter = Counter()  # status code name -> count, over every fuzz request
DETAIL: Counter = Counter()  # (target, method, strategy, status code name) -> count
FINISHED: set[str] = set()  # fuzz batches that ran to the end
SKIPPED: Counter = Counter()  # SaveState requests not sent because they would write outside the sandbox
KNOWN_SEEN: Counter = Counter()  # KNOWN_BUGS name -> answers that matched it
LOG = (
    open(os.environ["REDHEART_FUZZ_LOG"], "w", encoding="utf-8")
    if os.environ.get("REDHEART_FUZZ_LOG")
    else None
)  # noqa: SIM115


@dataclass
class Outcome:
    code: str
    details: str
    elapsed: float


@dataclass
class Batch:
    """The verdicts of one hypothesis batch; problems fail the test once the batch is done."""

    label: str
    problems: list[str] = field(default_factory=list)

    def report(self) -> None:
        FINISHED.add(self.label)
        if self.problems:
            shown = "\n  ".join(self.problems[:25])
            more = f"\n  ... and {len(self.problems) - 25} more" if len(self.problems) > 25 else ""
            pytest.fail(f"{self.label}: {len(self.problems)} problem(s):\n  {shown}{more}", pytrace=False)


def _parses(method: str, payload: bytes):
    try:
        return REQUEST_TYPES[method].FromString(payload)
    except (DecodeError, ValueError, RuntimeError):
        return None


def _short(payload: bytes, limit: int = 160) -> str:
    text = payload.hex()
    return text if len(text) <= limit else f"{text[:limit]}... ({len(payload)} bytes)"


def invoke(
    channel: grpc.Channel, service: str, method: str, payload: bytes, timeout: float = CALL_TIMEOUT
) -> Outcome:
    """Send raw bytes as the request of service/method; consume a streamed answer fully."""
    path = f"/{service}/{method}"
    start = time.monotonic()
    try:
        if method == "GetParameters":
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            for _item in call(payload, timeout=timeout):
                pass
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                payload, timeout=timeout
            )
        return Outcome("OK", "", time.monotonic() - start)
    except grpc.RpcError as exc:
        return Outcome(exc.code().name, exc.details() or "", time.monotonic() - start)


def judge(
    batch: Batch,
    target: str,
    method: str,
    strategy: str,
    payload: bytes,
    out: Outcome,
    *,
    legit_wait: bool = False,
) -> None:
    STATS[(target, method, strategy)] += 1
    OUTCOMES[out.code] += 1
    DETAIL[(target, method, strategy, out.code)] += 1
    if LOG is not None:
        LOG.write(f"{target}\t{method}\t{strategy}\t{out.code}\t{out.elapsed:.3f}\t{out.details[:150]!r}\n")
    where = f"{target} {method} [{strategy}] payload {_short(payload)}"
    if out.code == "DEADLINE_EXCEEDED" and out.details == "Deadline Exceeded" and not legit_wait:
        batch.problems.append(f"HANG after {out.elapsed:.1f}s: {where}")
        return
    if out.code not in ("INTERNAL", "UNKNOWN"):
        return
    if out.code == "INTERNAL" and out.details == UNPARSABLE:
        if _parses(method, payload) is None:
            return  # grpc's own answer to bytes that are not a protobuf of the request type
        batch.problems.append(f"INTERNAL '{UNPARSABLE}' for a payload that parses: {where}")
        return
    stage = target.split(":")[-1]
    for name, bug_stage, bug_method, pattern in KNOWN_BUGS:
        if bug_stage in ("*", stage) and bug_method == method and re.search(pattern, out.details):
            KNOWN_SEEN[name] += 1
            return
    batch.problems.append(f"{out.code} {out.details[:400]!r}: {where}")


# ----------------------------------------------------------------------------- servers


def tiny_config() -> HybridConfig:
    t = {"batch_size": 8, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3}
    return HybridConfig(model={"preset": "tiny"}, train=t, regret={"enabled": True, "address": "inprocess"})


class Stages:
    """Both stage servers in this process (the pattern of tests/grpc/test_stage_service.py)."""

    def __init__(self, cfg: HybridConfig, sandbox: Path) -> None:
        self.cfg = cfg
        self.sandbox = sandbox
        self.cpu_srv, p1 = cpu_server(cfg, host="127.0.0.1", port=0)
        self.gpu_srv, p2 = gpu_server(cfg, host="127.0.0.1", port=0)
        self.address = {"cpu": f"127.0.0.1:{p1}", "gpu": f"127.0.0.1:{p2}"}
        self.servers = {"cpu": self.cpu_srv, "gpu": self.gpu_srv}
        self.clients = {
            s: StageClient(f"{s} stage", a, max_message_mb=64, rpc_timeout=20)
            for s, a in self.address.items()
        }
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channels = {s: grpc.insecure_channel(a, options=options) for s, a in self.address.items()}
        self.settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
        self.driver = PipelineDriver((self.clients["cpu"], self.clients["gpu"]), cfg, RUN_ID)
        self.restore()
        batch = synthetic_batch(0)
        self.reference = SingleProcessTrainer(cfg).step(0, [batch], 1e-3)["micro_batch_losses"]
        self.shards = {}
        for stage in ("cpu", "gpu"):  # real shards of step 0: the base of the LoadState requests
            self.shards[stage] = sandbox / "shards" / stage
            self.clients[stage].save(RUN_ID, 0, str(self.shards[stage]))

    def start_request(self, stage: str) -> stage_pb2.StartRunRequest:
        return stage_pb2.StartRunRequest(
            run_id=RUN_ID,
            train_settings_json=json.dumps(self.settings),
            next_stage_address=self.address["gpu"] if stage == "cpu" else "",
            prev_stage_address=self.address["cpu"] if stage == "gpu" else "",
            regret_address="inprocess" if stage == "gpu" else "",
            first_step=0,
            reinitialize=True,
        )

    def runtime(self, stage: str):
        return self.servers[stage].servicer.runtime

    def restore(self) -> None:
        """Both stages at step 0 of RUN_ID with fresh weights (whatever the fuzz did to them)."""
        for stage in ("cpu", "gpu"):
            deadline = time.monotonic() + 10
            while self.runtime(stage).running.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.clients[stage]._call("StartRun", self.start_request(stage))

    def prime(self) -> None:
        """Restore, then run one accumulation round on both stages: ApplyStep has something to apply."""
        self.restore()
        plans = self.driver.step_plans(0, [synthetic_batch(1)])
        self.driver._run_on_stages(0, plans)

    def abort_all(self, step: int) -> None:
        for stage in ("cpu", "gpu"):
            self.clients[stage].abort(RUN_ID, step, "fuzz: clean up")

    def wait_idle(self, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.runtime(s).running.is_set() for s in ("cpu", "gpu")):
                return True
            time.sleep(0.01)
        return False

    def check_serving(self) -> None:
        for stage, channel in self.channels.items():
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (
                f"{stage} stage is not SERVING after the fuzz batch"
            )

    def check_valid_step(self) -> None:
        """A valid request after the batch: a real pipelined step equals single-process training."""
        self.check_serving()
        assert self.wait_idle(), "a stage is still running a step after the fuzz batch"
        self.restore()
        out = self.driver.run_step(0, [synthetic_batch(0)], 1e-3)
        torch.testing.assert_close(
            torch.tensor(out.micro_batch_losses), torch.tensor(self.reference), rtol=1e-5, atol=4e-5
        )
        assert all(math.isfinite(v) for v in out.micro_batch_losses)
        self.restore()

    def close(self) -> None:
        self.driver.close()
        for c in self.clients.values():
            c.close()
        for ch in self.channels.values():
            ch.close()
        self.cpu_srv.stop(0)
        self.gpu_srv.stop(0)


# ----------------------------------------------------------------------------- fixtures
# Test modules load them with `pytest_plugins = ["fuzz_support"]`.


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The servers' working directory, deep enough that relative traversal ("../../..") stays inside."""
    root = tmp_path_factory.mktemp("fuzz-sandbox")
    cwd = root.joinpath(*"abcdefgh", "cwd")
    cwd.mkdir(parents=True)
    previous = os.getcwd()
    os.chdir(cwd)
    yield root
    os.chdir(previous)


@pytest.fixture(scope="module")
def stages(sandbox):
    s = Stages(tiny_config(), sandbox)
    yield s
    s.close()


@pytest.fixture(scope="module")
def regret():
    config = HybridConfig(**{"regret.num_workers": 2, "regret.max_batch": MAX_BATCH})
    server, port = regret_server(config, host="127.0.0.1", port=0)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    yield server, channel
    channel.close()
    server.stop(grace=1.0)
