"""Fuzz batches against RegretService.Score: random bytes, hostile fields, mutated valid requests (see fuzz_support.py)."""

from __future__ import annotations

import numpy as np
import torch
from fuzz_support import (
    CALL_TIMEOUT,
    FINISHED,
    FUZZ,
    MAX_BATCH,
    N_HOSTILE,
    N_MUTATED,
    N_RANDOM,
    REGRET_SERVICE,
    Batch,
    invoke,
    judge,
)
from fuzz_values import mutate, mutations, pick_aspects, random_payloads, tensors, texts
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from redheart import calculus, codec
from redheart.v1 import regret_pb2, tensor_pb2

pytest_plugins = ["fuzz_support"]  # its fixtures: sandbox, stages, regret

# ----------------------------------------------------------------------------- the regret fuzz tests


def _valid_bentham(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((rows, 8), dtype=np.float32)
    x[:, 7] = x[:, 7] * 2 - 1
    return x


def _score_request(x: np.ndarray, **kw) -> regret_pb2.ScoreRequest:
    return regret_pb2.ScoreRequest(bentham=codec.encode(torch.from_numpy(x), name="bentham"), **kw)


SCORE_ASPECTS = [
    "tensor",
    "tensor",
    "rows",
    "values",
    "values",
    "dtype",
    "shape",
    "ids",
    "ids",
    "envelope",
    "envelope",
    "explain",
    "missing",
    "none",
]


@st.composite
def hostile_scores(draw) -> bytes:
    """A valid request (1..256 rows, sometimes with ids and an envelope) with one or two hostile aspects."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.sampled_from([1, 4, 16, MAX_BATCH]))
    x = _valid_bentham(rows, int(rng.integers(2**31)))
    req = _score_request(x, explain=draw(st.booleans()))
    if draw(st.booleans()):
        req.scenario_ids.extend(f"s{i}" for i in range(rows))
    if draw(st.booleans()):
        # A few envelopes, reused: cache hits with other content must be scored anew, never answered stale.
        req.envelope.CopyFrom(
            tensor_pb2.Envelope(
                run_id="fz", step=draw(st.integers(0, 2)), micro_batch=draw(st.integers(0, 1))
            )
        )
    for aspect in pick_aspects(rng, SCORE_ASPECTS):
        if aspect == "tensor":
            req.bentham.CopyFrom(draw(tensors(tensor_pb2.FLOAT32, (rows, 8), "float", name="bentham")))
        elif aspect == "rows":
            n = draw(st.sampled_from([0, MAX_BATCH + 1, 2**31, 2**63 - 1, -1]))
            req.bentham.shape[:] = [n, 8]
            if 0 <= n <= MAX_BATCH + 1:
                req.bentham.data = _valid_bentham(n, 0).tobytes()
        elif aspect == "values":
            y = x.copy()
            y[int(rng.integers(rows)), int(rng.integers(8))] = rng.choice(
                [np.nan, np.inf, -np.inf, -0.5, 1.5, -2.0, 3e38, 1e-45]
            )
            req.bentham.data = y.tobytes()
        elif aspect == "dtype":
            dtype = draw(
                st.sampled_from(
                    [
                        torch.float64,
                        torch.float16,
                        torch.bfloat16,
                        torch.int64,
                        torch.int32,
                        torch.bool,
                        torch.uint8,
                    ]
                )
            )
            req.bentham.CopyFrom(codec.encode(torch.from_numpy(x).to(dtype), name="bentham"))
        elif aspect == "shape":
            shape = draw(
                st.sampled_from(
                    [(rows, 7), (rows, 9), (rows, 8, 1), (rows * 8,), (1, rows, 8), (8, rows), ()]
                )
            )
            req.bentham.CopyFrom(codec.encode(torch.zeros(shape), name="bentham"))
        elif aspect == "ids":
            req.scenario_ids[:] = draw(
                st.one_of(st.lists(texts, max_size=5), st.lists(texts, min_size=rows, max_size=rows))
            )
        elif aspect == "envelope":
            req.envelope.CopyFrom(
                tensor_pb2.Envelope(
                    run_id=draw(st.sampled_from(["fz", "fz", "", "x" * 1000, "\x00"])),
                    step=draw(st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)])),
                    micro_batch=draw(st.sampled_from([0, 1, -(2**31), 2**31 - 1])),
                    kind=draw(st.sampled_from([0, 1, 5, -1, 2**31 - 1])),
                )
            )
        elif aspect == "explain":
            req.explain = True
            req.scenario_ids[:] = [draw(texts) for _ in range(rows)]
        elif aspect == "missing":
            req.ClearField("bentham")
    return req.SerializeToString()


def _run_regret_batch(regret, strategy: str, strategy_obj, n: int) -> None:
    server, channel = regret
    batch = Batch(f"regret Score [{strategy}]")

    @settings(FUZZ, max_examples=n)
    @given(payload=strategy_obj)
    def run(payload: bytes) -> None:
        judge(batch, "regret", "Score", strategy, payload, invoke(channel, REGRET_SERVICE, "Score", payload))

    run()
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.pool.alive_count() == 2
    x = _valid_bentham(MAX_BATCH, seed=len(FINISHED))
    response = regret_pb2.ScoreResponse.FromString(
        channel.unary_unary(f"/{REGRET_SERVICE}/Score", request_serializer=None, response_deserializer=None)(
            _score_request(x, envelope=tensor_pb2.Envelope(run_id="fz", step=0)).SerializeToString(),
            timeout=CALL_TIMEOUT,
        )
    )
    expected = calculus.score(x)
    np.testing.assert_array_equal(codec.decode(response.regret).numpy(), expected.regret)
    np.testing.assert_array_equal(codec.decode(response.best_counterfactual).numpy(), expected.best_index)
    batch.report()


def test_fuzz_regret_random_bytes(regret):
    _run_regret_batch(regret, "random", random_payloads, 3 * N_RANDOM)


def test_fuzz_regret_hostile_fields(regret):
    _run_regret_batch(regret, "hostile", hostile_scores(), 3 * N_HOSTILE)


def test_fuzz_regret_mutated_valid_requests(regret):
    base = _score_request(
        _valid_bentham(16, 1),
        envelope=tensor_pb2.Envelope(run_id="fz", step=3, micro_batch=1),
        scenario_ids=[f"s{i}" for i in range(16)],
        explain=True,
    ).SerializeToString()
    _run_regret_batch(regret, "mutated", mutations().map(lambda how: mutate(base, how)), 3 * N_MUTATED)
