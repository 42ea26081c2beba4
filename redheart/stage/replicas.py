"""The data-parallel replicas of one pipeline stage: a torch.distributed group that sums gradients.

With ``parallel.data_parallel = R`` the orchestrator runs R copies of the pipeline, each on its share
of every step's micro-batches, and hands every stage process at StartRun where the rendezvous store
is (the orchestrator hosts it), the group's prefix, this replica's index and R. The loss multiplier
is the global one (1 / all micro-batches of the step), so the *sum* of the replicas' gradients is
the gradient of the whole batch: after its last backward of the step each replica sums its
gradients with the others' (gloo on the CPU, NCCL on CUDA) and from then on every replica holds the
same gradients, norm and update.

The group is created at the first sum after StartRun (all replicas arrive there together; StartRun
itself is called on one stage after another, so creating it there would deadlock) under a prefix
of its own per StartRun: a group broken by a dead replica is never reused, the recovery's StartRun
brings a fresh one. Every collective is bounded by ``parallel.collective_timeout_seconds``.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from redheart.stage.errors import ErrorKind, StageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSettings:
    rank: int
    size: int
    store: str  # host:port of the orchestrator's TCPStore
    prefix: str  # unique per stage and StartRun
    backend: str  # "auto", "gloo" or "nccl"
    bucket_bytes: int
    timeout_seconds: float

    @classmethod
    def parse(cls, raw: Any) -> ReplicaSettings | None:
        """StartRun's ``data_parallel`` settings; None without replicas. Refuses malformed ones."""
        if raw is None or raw == {}:
            return None
        if not isinstance(raw, Mapping):
            raise StageError(ErrorKind.INVALID, "settings.data_parallel must be an object")
        try:
            settings = cls(
                rank=int(raw["rank"]),
                size=int(raw["size"]),
                store=str(raw["store"]),
                prefix=str(raw["prefix"]),
                backend=str(raw.get("backend", "auto")),
                bucket_bytes=int(raw.get("bucket_mb", 25)) << 20,
                timeout_seconds=float(raw.get("timeout_seconds", 120.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StageError(ErrorKind.INVALID, f"settings.data_parallel is malformed: {exc!r}") from None
        host, _, port = settings.store.rpartition(":")
        if not (0 <= settings.rank < settings.size and host and port.isdigit()):
            raise StageError(
                ErrorKind.INVALID,
                f"settings.data_parallel: replica {settings.rank} of {settings.size} at store {settings.store!r}",
            )
        if settings.backend not in ("auto", "gloo", "nccl") or not settings.timeout_seconds > 0:
            raise StageError(ErrorKind.INVALID, f"settings.data_parallel: backend {settings.backend!r}")
        return settings if settings.size > 1 else None


class ReplicaGroup:
    """This stage's replicas; :meth:`sum_gradients` after the step's last backward."""

    def __init__(self, settings: ReplicaSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        backend = settings.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        self.backend = backend
        self._ready = False
        self._broken: str | None = None
        self._summed = False  # this round reached its gradient sum (release then has nothing to tell)

    def _join(self) -> None:
        s = self.settings
        host, _, port = s.store.rpartition(":")
        timeout = datetime.timedelta(seconds=s.timeout_seconds)
        store = dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timeout)
        if dist.is_initialized():  # the group of an earlier StartRun
            dist.destroy_process_group()
        dist.init_process_group(
            self.backend,
            store=dist.PrefixStore(s.prefix, store),
            rank=s.rank,
            world_size=s.size,
            timeout=timeout,
        )
        self._ready = True
        log.info("replica %d of %d joined group %s (%s)", s.rank, s.size, s.prefix, self.backend)

    @torch.no_grad()
    def sum_gradients(self, module: torch.nn.Module) -> tuple[float, int]:
        """Sum every parameter's gradient over the replicas, in flat buckets; (seconds, bytes sent)."""
        if self._broken is not None:
            raise StageError(
                ErrorKind.UNAVAILABLE,
                f"the replica group is broken ({self._broken}); a new StartRun rebuilds it",
            )
        start = time.perf_counter()
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this replica's micro-batches never reached: zeros
                p.grad = torch.zeros_like(p)
        sent = 0
        try:
            if not self._ready:
                self._join()
            # First one flag: a replica whose round failed sends 1 instead of its gradients
            # (release), so the others give up the step now instead of at the timeout.
            flag = torch.zeros(1, dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.SUM)
            self._summed = True
            if int(flag.item()):
                raise StageError(
                    ErrorKind.ABORTED, f"{int(flag.item())} other replica(s) of this stage failed the step"
                )
            for bucket in _buckets([p.grad for p in params], self.settings.bucket_bytes):
                flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum of numels]
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                sent += flat.numel() * flat.element_size()
                offset = 0
                for g in bucket:  # back into each gradient's own storage
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        except StageError:
            raise
        except Exception as exc:  # a replica died or timed out: this group is done for
            self._broken = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise StageError(
                ErrorKind.UNAVAILABLE,
                f"summing gradients with the other replicas failed: {self._broken}",
            ) from None
        return time.perf_counter() - start, sent

    def release(self, wait_seconds: float = 10.0) -> None:
        """This replica's round failed before its gradient sum: tell the replicas waiting in it
        (the flag of :meth:`sum_gradients`, set). Waits at most ``wait_seconds`` for them; a replica
        that never comes (dead, or failed too) leaves the group broken, as its peers will see."""
        if self._summed or self._broken is not None or not self._ready:
            self._summed = False
            return
        try:
            flag = torch.ones(1, dtype=torch.int32, device=self.device)
            work = dist.all_reduce(flag, op=dist.ReduceOp.SUM, async_op=True)
            work.wait(datetime.timedelta(seconds=wait_seconds))
        except Exception as exc:  # noqa: BLE001 - the failure being reported matters, not this one
            self._broken = f"release: {type(exc).__name__}: {str(exc)[:200]}"

    def begin_step(self) -> None:
        """A new round: its gradient sum has not started."""
        self._summed = False

    def close(self) -> None:
        if self._ready and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may refuse; the process goes on
                log.warning("destroying the replica group failed", exc_info=True)
        self._ready = False


def _buckets(grads: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients grouped into buckets of at most ``limit`` bytes (one larger alone),
    each of one dtype and device, as torch.cat needs."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        same = out and out[-1][0].dtype == g.dtype and out[-1][0].device == g.device
        if not out or not same or size + nbytes > limit:
            out.append([g])
            size = nbytes
        else:
            out[-1].append(g)
            size += nbytes
    return out
