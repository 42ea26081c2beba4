"""The services of one run, as one object: launch (local) or reach (remote), connect, handshake,
start the run, restore a checkpoint, take over from a dead orchestrator.

Both the training run (:class:`orchestrator.trainer.HybridDistributedTrainer`) and ``--verify``
(:mod:`orchestrator.verify`) bring the services up through it, so they check the same things
(model fingerprints, pipeline ranks) and link the stages the same way. Recovery
(:mod:`orchestrator.recovery`) shares its ``launcher``, ``addresses`` and ``clients``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from orchestrator import checkpoint as ckpt
from orchestrator.launcher import LaunchError, LocalLauncher
from orchestrator.stage_client import StageClient
from orchestrator.stages import StageSpec, stage_links, stage_specs
from redheart.config import HybridConfig, diff_settings
from redheart.rpc import RetryPolicy, ServiceError, wait_for_serving
from redheart.stage.errors import ErrorReason

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def settings_for_stages(config: HybridConfig) -> dict[str, Any]:
    """The run settings every stage receives in StartRun."""
    return {
        "train": dataclasses.asdict(config.train),
        "regret": dataclasses.asdict(config.regret),
        "empty_cache_every": config.gpu_stage.empty_cache_every,
    }


class ServiceSet:
    """The stages (and the regret service) of a run; `open` brings them up, the rest drives them."""

    def __init__(self, config: HybridConfig, output_dir: Path, stop_requested: threading.Event) -> None:
        self.config = config
        self.output_dir = output_dir
        self.stop_requested = stop_requested
        self.stages: tuple[StageSpec, ...] = stage_specs(config)
        self.launcher: LocalLauncher | None = None
        self.clients: dict[str, StageClient] = {}
        self.addresses: dict[str, str] = {}
        self.stage_info: dict[str, Any] = {}
        self.trace = None  # the TraceRecorder under --trace; the clients get it at every StartRun
        self.rendezvous = None  # parallel.data_parallel > 1: the TCPStore the replicas' groups meet at
        self.generation = 0  # StartRuns so far: each gives the replica groups a fresh store prefix

    @property
    def regret_needed(self) -> bool:
        """A regret service process to start or reach (not off, not computed in the GPU stage)."""
        return self.config.regret.enabled and self.config.regret.address != "inprocess"

    @property
    def regret_address(self) -> str:
        return self.addresses.get("regret", "")

    def regret_lookahead(self) -> int:
        """Regret batches prefetched ahead of the step: only with a separate regret service."""
        cfg = self.config
        if cfg.regret.enabled and self.regret_address not in ("", "inprocess"):
            return cfg.regret.lookahead
        return 0

    def dead_services(self):
        """The driver's probe of dead local processes; None in remote mode."""
        return self.launcher.dead if self.launcher is not None else None

    # ------------------------------------------------------------------ launch and connect

    def open(self, stack: ExitStack) -> None:
        """Launch (local) or locate (remote) the services, wait until they serve, connect the stages."""
        self._host_rendezvous()
        self._locate(stack)
        timeout = self.config.orchestrator.connect_timeout_seconds
        names = [s.name for s in self.stages] + (["regret"] if self.regret_needed else [])
        for name in names:
            self._wait_serving(name, timeout)
        for spec in self.stages:
            self.clients[spec.name] = self._client(spec)
            stack.callback(self.clients[spec.name].close)

    def _host_rendezvous(self) -> None:
        """The store the replicas of each stage meet at to form their group (the orchestrator hosts it)."""
        p = self.config.parallel
        if p.data_parallel == 1:
            return
        import datetime

        import torch.distributed as dist

        try:
            self.rendezvous = dist.TCPStore(
                p.rendezvous_host,
                p.rendezvous_port,
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=p.collective_timeout_seconds),
            )
        except (RuntimeError, OSError) as exc:
            raise RunError(
                f"cannot host the replicas' rendezvous store on {p.rendezvous_host}:{p.rendezvous_port}: {exc} "
                f"(fix: parallel.rendezvous_port = 0 for any free port)"
            ) from None
        log.info("replica rendezvous on %s:%d", p.rendezvous_host, self.rendezvous.port)

    def _replica_settings(self, spec: StageSpec, run_id: str) -> dict[str, Any]:
        """StartRun's ``data_parallel`` settings of one stage process (empty without replicas)."""
        p = self.config.parallel
        if self.rendezvous is None:
            return {}
        return {
            "rank": spec.replica,
            "size": p.data_parallel,
            "store": f"{p.rendezvous_host}:{self.rendezvous.port}",
            "prefix": f"{run_id}/{spec.base_name}/{self.generation}",
            "backend": self._backend(spec),
            "bucket_mb": p.bucket_mb,
            "timeout_seconds": p.collective_timeout_seconds,
        }

    def _backend(self, spec: StageSpec) -> str:
        """The collective backend of a stage's replicas: parallel.dp_backend, or for "auto" NCCL for
        remote stages on CUDA and gloo otherwise (local replicas share this host's GPUs, and NCCL
        refuses two ranks on one)."""
        backend = self.config.parallel.dp_backend
        if backend != "auto":
            return backend
        info = self.stage_info.get(spec.name)
        on_cuda = info is not None and info.device.startswith("cuda")
        return "nccl" if on_cuda and self.config.launch.mode == "remote" else "gloo"

    def _locate(self, stack: ExitStack) -> None:
        cfg = self.config
        if cfg.launch.mode == "local":
            log_dir = Path(cfg.launch.log_dir) if cfg.launch.log_dir else self.output_dir / "logs"
            resolved = self.output_dir / "config.toml"
            self.launcher = LocalLauncher(cfg, resolved, log_dir)
            stack.callback(self.launcher.stop_all)
            names = [s.name for s in self.stages] + (["regret"] if self.regret_needed else [])
            try:
                self.launcher.start(names)
            except LaunchError as exc:
                raise RunError(str(exc)) from None
            self.addresses = {n: self.launcher.services[n].address for n in names}
        else:
            self.addresses = {s.name: s.address(cfg) for s in self.stages}
            if self.regret_needed:
                self.addresses["regret"] = cfg.regret_address()
        self.addresses.setdefault("regret", "inprocess" if cfg.regret.enabled else "")

    def _wait_serving(self, name: str, timeout: float) -> None:
        try:
            wait_for_serving(
                self.addresses[name],
                timeout=timeout,
                service_name=name.replace("_", " "),
                alive=self.alive_check(name),
                security=self.config.security,
            )
        except ServiceError as exc:
            raise RunError(
                f"{exc} (fix: start it with `redheart-{name.replace('_', '-')} --config ...` "
                f"or check {name}.address)"
            ) from None

    def _client(self, spec: StageSpec) -> StageClient:
        cfg = self.config
        return StageClient(
            spec.label,
            self.addresses[spec.name],
            max_message_mb=cfg.wire.max_message_mb,
            rpc_timeout=cfg.orchestrator.rpc_timeout_seconds,
            security=cfg.security,
            retry=RetryPolicy.from_wire(cfg.wire),
            alive=self.alive_check(spec.name),
        )

    def alive_check(self, name: str):
        if self.launcher is None or name not in self.launcher.services:
            return None
        return self.launcher.services[name].alive

    def handshake(self) -> None:
        """Every stage is the pipeline stage it should be and was built with this model's settings."""
        mine = self.config.model_settings()
        fp = self.config.model_fingerprint()
        for spec in self.stages:
            name, expected_rank = spec.name, spec.rank
            info = self.clients[name].describe()
            if info.rank != expected_rank:
                raise RunError(
                    f"{name} at {self.addresses[name]} is pipeline stage {info.rank} ({info.name}), "
                    f"expected stage {expected_rank}; are cpu_stage.address and gpu_stage.address swapped?"
                )
            if info.fingerprint != fp:
                diffs = diff_settings(mine, info.settings)
                raise RunError(
                    f"{name} at {self.addresses[name]} was started with different model settings: "
                    f"{'; '.join(diffs)} (fix: start every service with the same [model] section)"
                )
            self.stage_info[name] = info

    # ------------------------------------------------------------------ run control

    def _links(self) -> dict[str, dict[str, str]]:
        """Each stage's peers in its own replica: the next stage's address, the previous one's; the
        last talks to regret."""
        links: dict[str, dict[str, str]] = {}
        for replica in sorted({s.replica for s in self.stages}):
            chain = [s for s in self.stages if s.replica == replica]
            addresses = [self.addresses[s.name] for s in chain]
            links.update(zip((s.name for s in chain), stage_links(addresses, self.regret_address)))
        return links

    @property
    def first_replica(self) -> tuple[StageSpec, ...]:
        """Replica 0's stages: they write the checkpoint shards and answer for the parameters."""
        return tuple(s for s in self.stages if s.replica == 0)

    def start_run(self, run_id: str, first_step: int, init_spec: dict[str, str] | None = None) -> None:
        settings = settings_for_stages(self.config)
        if init_spec is not None:
            settings["init_from"] = init_spec  # each stage loads its own part when it (re)builds
        self.generation += 1
        links = self._links()
        for spec in self.stages:
            own = dict(settings, data_parallel=self._replica_settings(spec, run_id))
            self._retry_while_running(
                lambda name=spec.name, own=own: self.clients[name].start_run(
                    run_id, own, first_step=first_step, reinitialize=True, **links[name]
                )
            )
        if self.trace is not None:  # measured at every StartRun: a restarted stage has a new clock
            self.trace.measure_clocks(self.clients)
            for client in self.clients.values():
                client.trace = self.trace

    def _retry_while_running(self, call):
        """A stage still inside a round (its orchestrator died mid-step, or the round is being
        aborted) refuses control calls with FAILED_PRECONDITION, reason ROUND_RUNNING, until it leaves
        the round: its lease ends it. Retry for at most orchestrator.connect_timeout_seconds."""
        give_up = time.monotonic() + self.config.orchestrator.connect_timeout_seconds
        delay = 0.2
        while True:
            try:
                return call()
            except ServiceError as exc:
                running = exc.reason == ErrorReason.ROUND_RUNNING  # a typed trailer, not the message
                if not running or time.monotonic() + delay > give_up or self.stop_requested.is_set():
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def take_over(self, run_id: str) -> None:
        """Remote --resume: a stage may still be inside a round of this run that its previous
        orchestrator (now dead: it held the output directory's lock) never finished. Abort that
        round so StartRun does not wait for the round's deadline."""
        for name, client in self.clients.items():
            info = self.stage_info.get(name)
            if info is not None and info.run_id == run_id:
                try:
                    client.abort(run_id, info.next_step, "a new orchestrator resumes this run")
                except ServiceError as exc:
                    log.info(
                        "%s: abort of the previous orchestrator's step %d: %s", name, info.next_step, exc
                    )

    def restore(
        self, run_id: str, info: ckpt.CheckpointInfo | None, init_spec: dict[str, str] | None = None
    ) -> int:
        """Put every stage at a checkpoint (or at the initial weights when there is none)."""
        step = info.step if info is not None else 0
        self.start_run(run_id, step, init_spec)
        if info is not None:
            with ThreadPoolExecutor(len(self.stages)) as pool:
                futures = [
                    pool.submit(self.clients[s.name].load, run_id, step, str(info.path / s.shard))
                    for s in self.stages
                ]
                for f in futures:
                    f.result()
        return step

    def save(self, run_id: str, step: int, directory: Path) -> dict[str, Any]:
        """Every stage writes its shard into `directory`; returns the shards by stage name."""
        with ThreadPoolExecutor(len(self.first_replica)) as pool:  # the replicas hold the same state
            futures = {
                s.name: pool.submit(self.clients[s.name].save, run_id, step, str(directory / s.shard))
                for s in self.first_replica
            }
            return {n: f.result() for n, f in futures.items()}

    def precisions_fp16(self) -> bool:
        """Each stage chose its precision from its own device at StartRun; fp16 on any needs the scale."""
        return any(self.clients[s.name].precision == "fp16" for s in self.stages)

    def parameters(self) -> dict[str, Any]:
        """Every stage's parameters by their single-process names (for --verify)."""
        out: dict[str, Any] = {}
        for spec in self.first_replica:
            out.update(self.clients[spec.name].parameters())
        return out

    def replica_differences(self, first: dict[str, Any]) -> list[str]:
        """What of replicas 1.. is not bit-identical to ``first`` (replica 0's parameters, as
        :meth:`parameters` gave them; for --verify): missing, extra or different parameters."""
        differ = []
        for replica in sorted({s.replica for s in self.stages} - {0}):
            theirs: dict[str, Any] = {}
            for spec in (s for s in self.stages if s.replica == replica):
                theirs.update(self.clients[spec.name].parameters())
            differ += [f"replica {replica}: {n} missing" for n in first if n not in theirs]
            differ += [
                f"replica {replica}: {n}"
                for n, t in theirs.items()
                if n not in first or not t.equal(first[n])
            ]
        return differ
