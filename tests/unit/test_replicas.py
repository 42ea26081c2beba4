"""redheart.stage.replicas: the replicas of a stage sum their gradients over a real gloo group
(processes of their own, the store hosted here as the orchestrator hosts it), a replica that failed
its round releases the others at once, and malformed StartRun settings are refused."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import time

import pytest
import torch
import torch.distributed as dist

from redheart.stage.errors import ErrorKind, StageError
from redheart.stage.replicas import ReplicaGroup, ReplicaSettings, _buckets


def _settings(rank: int, port: int, prefix: str = "run/cpu_stage/1") -> dict:
    return {"rank": rank, "size": 2, "store": f"127.0.0.1:{port}", "prefix": prefix, "timeout_seconds": 30}


def _replica(rank: int, port: int, fail: bool, out) -> None:
    torch.manual_seed(rank)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    module(torch.randn(4, 5)).sum().backward()
    module[1].bias.grad = None  # a parameter this replica's micro-batches never reached
    # numpy copies: torch tensors would cross the queue as shared memory of a process that exits.
    before = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy() for p in module.parameters()
    ]
    group = ReplicaGroup(ReplicaSettings.parse(_settings(rank, port)), torch.device("cpu"))
    # A one-byte bucket limit: one collective per tensor, so the bucket copy-back is exercised.
    group.settings = ReplicaSettings(**{**group.settings.__dict__, "bucket_bytes": 1})
    group.begin_step()
    group._join()
    if fail:
        group.release()
        out.put((rank, "released", before, None))
    else:
        try:
            group.sum_gradients(module)
            out.put((rank, "summed", before, [p.grad.numpy().copy() for p in module.parameters()]))
        except StageError as exc:
            out.put((rank, exc.kind.value, before, str(exc)))
    group.close()
    out.close()
    out.join_thread()  # the result is in the pipe before the process ends


def _run(fail_rank: int | None) -> dict:
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(r, store.port, r == fail_rank, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, *rest = out.get(timeout=60)
        results[rank] = rest
    for p in procs:
        p.join(30)
    return results


@pytest.mark.slow
def test_two_replicas_hold_the_sum_of_their_gradients():
    results = _run(None)
    (s0, b0, g0), (s1, b1, g1) = results[0], results[1]
    assert s0 == s1 == "summed"
    for want_a, want_b, got_a, got_b in zip(b0, b1, g0, g1):
        assert (got_a == got_b).all(), "both replicas hold the same bits"
        assert (got_a == want_a + want_b).all()


@pytest.mark.slow
def test_a_released_replica_ends_the_others_step_at_once():
    start = time.monotonic()
    results = _run(fail_rank=1)
    assert results[1][0] == "released"
    kind, message = results[0][0], results[0][2]
    assert kind == ErrorKind.ABORTED.value and "1 other replica(s) of this stage failed the step" in message
    assert time.monotonic() - start < 25, "released long before the 30 s collective timeout"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("x", "must be an object"),
        ({"rank": 0, "size": 2}, "malformed"),
        ({**_settings(2, 1)}, "replica 2 of 2"),
        ({**_settings(0, 1), "store": "nohost"}, "store 'nohost'"),
        ({**_settings(0, 1), "backend": "mpi"}, "backend 'mpi'"),
    ],
)
def test_malformed_settings_are_refused(raw, words):
    with pytest.raises(StageError) as err:
        ReplicaSettings.parse(raw)
    assert err.value.kind is ErrorKind.INVALID and words in str(err.value)


def test_no_replicas_without_settings_or_with_one():
    assert ReplicaSettings.parse(None) is None and ReplicaSettings.parse({}) is None
    assert ReplicaSettings.parse({**_settings(0, 1), "size": 1}) is None


def test_buckets_keep_order_and_split_at_the_limit():
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(10), torch.zeros(1, dtype=torch.float64)]
    buckets = _buckets(grads, limit=32)
    assert [[g.numel() for g in b] for b in buckets] == [[4, 4], [10], [1]]
