"""gRPC's retry policy (from [wire]) retries idempotent calls against a real server failing at first."""

from __future__ import annotations

import threading

import grpc
import pytest

from orchestrator.stage_client import StageClient
from redheart.config import ConfigError, HybridConfig
from redheart.rpc import RetryPolicy, ServiceError, bind, make_channel, make_server, set_serving
from redheart.v1 import stage_pb2, stage_pb2_grpc


class FlakyStage(stage_pb2_grpc.PipelineStageServicer):
    """Answers Describe with `code` for the first `failures` calls, then normally."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures = failures
        self.code = code
        self.calls = 0
        self.lock = threading.Lock()

    def Describe(self, request, context):
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            context.abort(self.code, f"not yet (call {self.calls})")
        return stage_pb2.DescribeResponse(stage_name="flaky", layer_range="layers 0-0", wall_clock=1.0)


@pytest.fixture
def serve():
    servers = []

    def start(servicer):
        server, health = make_server(max_message_mb=4)
        stage_pb2_grpc.add_PipelineStageServicer_to_server(servicer, server)
        port = bind(server, "127.0.0.1", 0)
        server.start()
        set_serving(health, True)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


FAST = dict(initial_backoff=0.01, max_backoff=0.05, multiplier=2.0)


def test_grpc_itself_retries_unavailable_by_the_channel_policy(serve):
    flaky = FlakyStage(failures=2)
    address = serve(flaky)
    with make_channel(address, 4, retry=RetryPolicy(max_attempts=3, **FAST)) as channel:
        reply = stage_pb2_grpc.PipelineStageStub(channel).Describe(stage_pb2.DescribeRequest(), timeout=10)
    assert reply.stage_name == "flaky" and flaky.calls == 3  # one Python call, three attempts on the wire
    flaky = FlakyStage(failures=1)
    address = serve(flaky)
    with make_channel(address, 4) as channel, pytest.raises(grpc.RpcError) as info:  # no policy: no retry
        stage_pb2_grpc.PipelineStageStub(channel).Describe(stage_pb2.DescribeRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 1


def test_the_stage_client_relies_on_the_policy_and_stops_at_its_attempts(serve):
    flaky = FlakyStage(failures=4)
    client = StageClient(
        "flaky stage",
        serve(flaky),
        max_message_mb=4,
        rpc_timeout=10,
        retry=RetryPolicy(max_attempts=5, **FAST),
    )
    assert client.describe().name == "flaky" and flaky.calls == 5
    flaky = FlakyStage(failures=10)
    client = StageClient(
        "flaky stage",
        serve(flaky),
        max_message_mb=4,
        rpc_timeout=10,
        retry=RetryPolicy(max_attempts=2, **FAST),
    )
    with pytest.raises(ServiceError, match="flaky stage at 127.0.0.1:.*Describe failed with UNAVAILABLE"):
        client.describe()
    assert flaky.calls == 2  # gRPC's two attempts, no hand-written retries on top


def test_status_codes_come_from_the_config(serve):
    wire = HybridConfig(
        wire={
            "retry_status_codes": "UNAVAILABLE, resource_exhausted",
            "retry_initial_backoff_seconds": 0.01,
            "retry_max_backoff_seconds": 0.05,
        }
    ).wire
    policy = RetryPolicy.from_wire(wire)
    assert policy.status_codes == ("UNAVAILABLE", "RESOURCE_EXHAUSTED") and policy.max_attempts == 5
    flaky = FlakyStage(failures=2, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert (
        StageClient("s", serve(flaky), max_message_mb=4, rpc_timeout=10, retry=policy).describe().name
        == "flaky"
    )
    assert flaky.calls == 3
    flaky = FlakyStage(failures=2, code=grpc.StatusCode.RESOURCE_EXHAUSTED)  # not retryable by default
    client = StageClient(
        "s", serve(flaky), max_message_mb=4, rpc_timeout=10, retry=RetryPolicy.from_wire(HybridConfig().wire)
    )
    with pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED"):
        client.describe()
    assert flaky.calls == 1
    one = RetryPolicy.from_wire(HybridConfig(wire={"retry_max_attempts": 1}).wire)
    assert one.service_config() is None  # 1 attempt: no policy at all (gRPC refuses maxAttempts < 2)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("retry_max_attempts", 6, "must be in 1..5"),
        ("retry_status_codes", "UNAVAILABL", "did you mean UNAVAILABLE"),
        ("retry_status_codes", "OK", "'OK' is not a gRPC status code"),
        ("retry_max_backoff_seconds", 0.01, "is below wire.retry_initial_backoff_seconds"),
        ("retry_backoff_multiplier", 0.0, "must be > 0"),
    ],
)
def test_bad_retry_settings_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        HybridConfig(wire={key: value})


def test_a_stage_that_comes_up_late_is_waited_for_within_the_deadline(serve):
    """What the recovery after a restart needs: connection refused at first, then the service."""
    import socket
    import time

    with socket.socket() as probe:  # a free port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = StageClient(
        "late stage",
        f"127.0.0.1:{port}",
        max_message_mb=4,
        rpc_timeout=30,
        retry=RetryPolicy(max_attempts=3, **FAST),
    )
    late = FlakyStage(failures=0)

    def start_later():
        time.sleep(1.0)
        server, health = make_server(max_message_mb=4)
        stage_pb2_grpc.add_PipelineStageServicer_to_server(late, server)
        bind(server, "127.0.0.1", port)
        server.start()
        started.append(server)

    started: list = []
    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        assert client.describe().name == "flaky" and late.calls == 1
    finally:
        thread.join()
        for server in started:
            server.stop(0)
    nobody = StageClient(
        "gone stage",
        f"127.0.0.1:{port}",
        max_message_mb=4,
        rpc_timeout=1.5,
        retry=RetryPolicy(max_attempts=3, **FAST),
    )
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="gone stage at 127.0.0.1"):
        nobody.describe()
    assert time.monotonic() - t0 >= 1.0  # it waited for the deadline, as the old loop retried until it
