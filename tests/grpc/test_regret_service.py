"""The regret service over real gRPC on port 0, with real worker processes (no mocks)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from faulty_workers import crashing_worker_main
from grpc_health.v1 import health_pb2, health_pb2_grpc

from redheart import calculus
from redheart.codec import encode
from redheart.config import HybridConfig
from redheart.regret_client import RegretClient, RegretReply
from redheart.rpc import ServiceError, make_channel
from redheart.v1 import regret_pb2, regret_pb2_grpc, tensor_pb2
from regret_service.logic import WorkerCrashed, WorkerPool, plan_chunks
from regret_service.server import SERVICE_FULL_NAME, create_server

MAX_BATCH = 256


def _batch(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((rows, 8), dtype=np.float32)
    x[:, 7] = x[:, 7] * 2 - 1
    return x


@pytest.fixture(scope="module")
def service():
    config = HybridConfig(**{"regret.num_workers": 2, "regret.max_batch": MAX_BATCH})
    server, port = create_server(config, host="127.0.0.1", port=0)
    channel = make_channel(f"127.0.0.1:{port}", 64)
    yield server, regret_pb2_grpc.RegretServiceStub(channel), channel
    channel.close()
    server.stop(grace=1.0)


def _request(
    bentham: tensor_pb2.Tensor | np.ndarray,
    *,
    run_id: str = "",
    step: int = 0,
    micro_batch: int = 0,
    explain: bool = False,
    ids=(),
) -> regret_pb2.ScoreRequest:
    if isinstance(bentham, np.ndarray):
        bentham = encode(torch.from_numpy(bentham), name="bentham")
    return regret_pb2.ScoreRequest(
        envelope=tensor_pb2.Envelope(run_id=run_id, step=step, micro_batch=micro_batch),
        bentham=bentham,
        scenario_ids=list(ids),
        explain=explain,
    )


def _score(stub, request) -> tuple[np.ndarray, np.ndarray, regret_pb2.ScoreResponse]:
    response = stub.Score(request, timeout=30)
    regret = np.frombuffer(response.regret.data, dtype=np.float32)
    best = np.frombuffer(response.best_counterfactual.data, dtype=np.int64)
    return regret, best, response


def _sample(server, name: str, labels: dict | None = None) -> float:
    value = server.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# ----------------------------------------------------------------------------- serving


def test_health_is_serving(service):
    server, _stub, channel = service
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_FULL_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.pool.alive_count() == 2


def test_score_equals_the_calculus_bit_for_bit(service):
    server, stub, _ = service
    x = _batch(MAX_BATCH, seed=1)  # 256 rows: cut into 2 chunks, one per worker
    assert len(plan_chunks(MAX_BATCH, server.pool.max_chunks)) == 2
    before = _sample(server, "redheart_regret_computations_total")
    regret, best, response = _score(stub, _request(x))
    expected = calculus.score(x)
    np.testing.assert_array_equal(regret, expected.regret)
    np.testing.assert_array_equal(best, expected.best_index)
    assert response.regret_computations == MAX_BATCH * 7
    assert response.bentham_evaluations == MAX_BATCH * 21
    assert _sample(server, "redheart_regret_computations_total") - before == MAX_BATCH * 7
    assert _sample(server, "redheart_regret_mean") == pytest.approx(
        float(expected.regret.mean(dtype=np.float64))
    )
    busy = [_sample(server, "redheart_regret_worker_busy_seconds_total", {"worker": w}) for w in ("0", "1")]
    assert all(b > 0 for b in busy)


def test_explanations(service):
    _server, stub, _ = service
    x = _batch(5, seed=2)
    ids = [f"s{i}" for i in range(5)]
    _regret, _best, response = _score(stub, _request(x, explain=True, ids=ids))
    expected = calculus.score(x)
    assert [e.scenario_id for e in response.explanations] == ids
    for i, e in enumerate(response.explanations):
        assert e.best_counterfactual == expected.best_index[i]
        assert e.best_counterfactual_name == expected.best_name[i]
        assert e.actual_utility == expected.actual_utility[i]
        assert list(e.counterfactual_utilities) == expected.counterfactual_utilities[i].tolist()
        assert list(e.actual_perspective_utilities) == expected.actual_perspectives[i].tolist()
        assert list(e.best_perspective_utilities) == expected.best_perspectives[i].tolist()


def _valid() -> np.ndarray:
    return _batch(4, seed=3)


def _raw(dtype: int, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data, name="bentham")


def _with(row: int, col: int, value: float) -> np.ndarray:
    x = _valid()
    x[row, col] = value
    return x


INVALID = {
    "int64": (
        encode(torch.zeros(4, 8, dtype=torch.int64), name="bentham"),
        "dtype is int64, expected float32",
    ),
    "shape_4x7": (encode(torch.zeros(4, 7), name="bentham"), "shape [B, 8]"),
    "rank_3": (encode(torch.zeros(2, 4, 8), name="bentham"), "rank is 3"),
    "nan": (_with(2, 4, np.nan), "row 2, column 4 (fecundity) is nan"),
    "inf": (_with(0, 1, np.inf), "row 0, column 1 (duration) is inf"),
    "out_of_range": (_with(3, 2, 1.75), "row 3, field certainty = 1.75 is outside [0, 1]"),
    "valence_out_of_range": (_with(1, 7, -2.0), "row 1, field valence = -2.0 is outside [-1, 1]"),
    "above_max_batch": (
        _batch(MAX_BATCH + 1),
        f"batch of {MAX_BATCH + 1} scenarios exceeds regret.max_batch = {MAX_BATCH}",
    ),
    "truncated_bytes": (
        _raw(tensor_pb2.FLOAT32, [4, 8], b"\x00" * 100),
        "byte length 100 does not match shape [4, 8]",
    ),
    "negative_dim": (_raw(tensor_pb2.FLOAT32, [-4, 8], b""), "dimension 0 is negative"),
    "missing": (None, "bentham is missing"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_requests_are_refused_and_the_service_keeps_serving(service, case):
    server, stub, _ = service
    bentham, fragment = INVALID[case]
    if bentham is None:
        request = regret_pb2.ScoreRequest(envelope=tensor_pb2.Envelope(run_id="bad"))
    else:
        request = _request(bentham, run_id="bad", step=1)
    before = _sample(server, "redheart_regret_requests_total", {"outcome": "invalid"})
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    assert _sample(server, "redheart_regret_requests_total", {"outcome": "invalid"}) == before + 1
    # The very next valid request is answered.
    x = _valid()
    regret, _best, _ = _score(stub, _request(x))
    np.testing.assert_array_equal(regret, calculus.score(x).regret)


def test_scenario_ids_must_match_the_batch(service):
    _server, stub, _ = service
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(_request(_valid(), ids=["a", "b"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scenario_ids holds 2 ids for a batch of 4" in info.value.details()


def test_idempotent_retry_returns_the_same_answer(service):
    server, stub, _ = service
    x = _batch(100, seed=4)
    request = _request(x, run_id="run-idem", step=3, micro_batch=1)
    scored = _sample(server, "redheart_regret_scored_scenarios_total")
    cached = _sample(server, "redheart_regret_requests_total", {"outcome": "cached"})
    first = stub.Score(request, timeout=10)
    second = stub.Score(request, timeout=10)
    assert first == second
    assert _sample(server, "redheart_regret_scored_scenarios_total") - scored == 100  # scored once
    assert _sample(server, "redheart_regret_requests_total", {"outcome": "cached"}) == cached + 1
    # Same envelope, other content: a new question, scored anew (never a stale answer).
    y = _batch(100, seed=5)
    regret, _best, _ = _score(stub, _request(y, run_id="run-idem", step=3, micro_batch=1))
    np.testing.assert_array_equal(regret, calculus.score(y).regret)


def test_client_future_and_concurrent_requests(service):
    server, _stub, _ = service
    sizes = [3, 200, 64, 129, 256, 1]
    batches = [_batch(n, seed=10 + i) for i, n in enumerate(sizes)]
    with RegretClient(server.address, max_message_mb=16, timeout_seconds=30) as client:
        futures = [
            client.submit(
                "run-c",
                0,
                i,
                torch.from_numpy(b),
                explain=(i == 0),
                scenario_ids=["a", "b", "c"] if i == 0 else (),
            )
            for i, b in enumerate(batches)
        ]
        replies = [f.result(timeout=60) for f in futures]
    for b, reply in zip(batches, replies):
        assert isinstance(reply, RegretReply)
        expected = calculus.score(b)
        assert reply.regret.dtype == torch.float32 and reply.best_index.dtype == torch.int64
        np.testing.assert_array_equal(reply.regret.numpy(), expected.regret)
        np.testing.assert_array_equal(reply.best_index.numpy(), expected.best_index)
        assert reply.regret_computations == len(b) * 7 and reply.bentham_evaluations == len(b) * 21
    e = replies[0].explanations[1]
    expected = calculus.score(batches[0])
    assert e["scenario_id"] == "b"
    assert e["best_counterfactual"] == expected.best_name[1]
    assert list(e["counterfactual_utilities"]) == list(calculus.COUNTERFACTUALS)
    assert e["counterfactual_utilities"]["reversal"] == expected.counterfactual_utilities[1, 6]
    assert e["actual_perspectives"] == dict(
        zip(calculus.PERSPECTIVES, expected.actual_perspectives[1].tolist())
    )


def test_client_raises_service_error_naming_the_address_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"  # nothing listens here any more
    with RegretClient(address, max_message_mb=4, timeout_seconds=1.0) as client:
        start = time.monotonic()
        future = client.submit("run", 0, 0, torch.from_numpy(_valid()))
        with pytest.raises(ServiceError) as info:
            future.result(timeout=10)
        elapsed = time.monotonic() - start
    assert address in str(info.value) and "regret service" in str(info.value)
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert elapsed < 3.0, f"retries must stop at the deadline, took {elapsed:.1f}s"


# ----------------------------------------------------------------------------- worker deaths


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_kill_9_of_an_idle_worker(service):
    server, stub, _ = service
    pids = server.pool.worker_pids()
    restarts = _sample(server, "redheart_regret_worker_restarts_total")
    os.kill(pids[0], signal.SIGKILL)
    x = _batch(MAX_BATCH, seed=6)
    regret, best, _ = _score(stub, _request(x))
    expected = calculus.score(x)
    np.testing.assert_array_equal(regret, expected.regret)
    np.testing.assert_array_equal(best, expected.best_index)
    assert _wait_for(
        lambda: server.pool.alive_count() == 2 and _sample(server, "redheart_regret_workers_alive") == 2
    )
    new_pids = server.pool.worker_pids()
    assert pids[0] not in new_pids and pids[1] in new_pids
    assert _sample(server, "redheart_regret_worker_restarts_total") == restarts + 1


def test_kill_9_of_workers_with_chunks_in_flight(service):
    server, stub, _ = service
    pids = server.pool.worker_pids()
    for pid in pids:  # freeze both so the chunks are surely in flight when they die
        os.kill(pid, signal.SIGSTOP)
    x = _batch(MAX_BATCH, seed=7)
    result: dict = {}

    def call() -> None:
        try:
            result["answer"] = _score(stub, _request(x))
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=call)
    try:
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive(), "the request must wait for the frozen workers"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    regret, best, _ = result["answer"]
    np.testing.assert_array_equal(regret, calculus.score(x).regret)
    np.testing.assert_array_equal(best, calculus.score(x).best_index)
    assert _wait_for(lambda: server.pool.alive_count() == 2)
    assert not set(pids) & set(server.pool.worker_pids())


def test_a_chunk_whose_worker_dies_twice_fails_cleanly():
    restarts: list[int] = []

    class Listener:
        def on_busy(self, worker, seconds):
            pass

        def on_restart(self, worker):
            restarts.append(worker)

        def on_alive(self, count):
            pass

    with WorkerPool(1, listener=Listener(), worker_target=crashing_worker_main) as pool:
        start = time.monotonic()
        with pytest.raises(WorkerCrashed, match=r"died twice while scoring rows 0\.\.9"):
            pool.score(_batch(10), timeout=30)
        assert time.monotonic() - start < 20
        assert len(restarts) == 2  # replaced after the first death, and again after the re-run's
        assert _wait_for(lambda: pool.alive_count() == 1, timeout=5)


def test_pool_deadline_is_enforced_and_the_pool_recovers():
    with WorkerPool(1) as pool:
        os.kill(pool.worker_pids()[0], signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                pool.score(_batch(10), timeout=0.3)
        finally:
            os.kill(pool.worker_pids()[0], signal.SIGCONT)
        x = _batch(50, seed=8)
        np.testing.assert_array_equal(pool.score(x, timeout=10).regret, calculus.score(x).regret)
