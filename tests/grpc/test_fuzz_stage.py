"""Fuzz batches against every PipelineStage RPC of both stages: random bytes, hostile fields, mutated valid requests (see fuzz_support.py)."""

from __future__ import annotations

import pytest
from fuzz_requests import hostile_requests, send_stage, valid_request
from fuzz_support import (
    FUZZ,
    N_HOSTILE,
    N_HOSTILE_BY_METHOD,
    N_MUTATED,
    N_RANDOM,
    STAGE_METHODS,
    Batch,
    Stages,
)
from fuzz_values import mutate, mutations, random_payloads
from hypothesis import given, settings

pytest_plugins = ["fuzz_support"]  # its fixtures: sandbox, stages, regret

# ----------------------------------------------------------------------------- the stage fuzz tests


def _run_stage_batch(stages: Stages, stage: str, method: str, strategy: str, strategy_obj, n: int) -> None:
    batch = Batch(f"{stage} stage {method} [{strategy}]")
    stages.restore()

    @settings(FUZZ, max_examples=n)
    @given(payload=strategy_obj)
    def run(payload: bytes) -> None:
        send_stage(stages, batch, stage, method, strategy, payload)

    run()
    stages.check_valid_step()  # both SERVING, and a real step still equals single-process training
    batch.report()


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
@pytest.mark.parametrize("method", STAGE_METHODS)
def test_fuzz_stage_random_bytes(stages, stage, method):
    _run_stage_batch(stages, stage, method, "random", random_payloads, N_RANDOM)


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
@pytest.mark.parametrize("method", STAGE_METHODS)
def test_fuzz_stage_hostile_fields(stages, stage, method):
    _run_stage_batch(
        stages,
        stage,
        method,
        "hostile",
        hostile_requests(method, stage, stages),
        N_HOSTILE_BY_METHOD.get(method, N_HOSTILE),
    )


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
@pytest.mark.parametrize("method", STAGE_METHODS)
def test_fuzz_stage_mutated_valid_requests(stages, stage, method):
    base = valid_request(method, stage, stages)
    _run_stage_batch(
        stages, stage, method, "mutated", mutations().map(lambda how: mutate(base, how)), N_MUTATED
    )
