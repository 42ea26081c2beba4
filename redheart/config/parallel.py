"""The ``[parallel]`` section: data-parallel replicas of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from redheart.config.errors import Fail


@dataclass
class ParallelConfig:
    data_parallel: int = 1
    """Replicas of the whole pipeline; each trains on its share of every step's micro-batches and the replicas of a stage sum their gradients (torch.distributed)."""
    dp_backend: str = "auto"
    """Collective backend of the replicas of a stage: gloo, nccl (CUDA stages on distinct GPUs), or auto: nccl for remote replicas of a stage on CUDA, gloo otherwise (local replicas share this host's GPUs, and NCCL refuses two ranks on one)."""
    rendezvous_host: str = "127.0.0.1"
    """Where the orchestrator's rendezvous store listens; the stages connect to it (another host's address in remote mode)."""
    rendezvous_port: int = 0
    """Port of the rendezvous store (0: any free port)."""
    bucket_mb: int = 25
    """Gradients are summed in flat buckets of about this many MiB (one collective each)."""
    collective_timeout_seconds: float = 120.0
    """Longest a stage waits in a collective for the other replicas before it fails the step."""

    def check(self, fail: Fail) -> None:
        """This section's own rules."""
        if self.data_parallel < 1:
            fail(
                "parallel",
                "data_parallel",
                f"parallel.data_parallel = {self.data_parallel} must be at least 1",
            )
        if not 0 <= self.rendezvous_port <= 65535:
            fail(
                "parallel",
                "rendezvous_port",
                f"parallel.rendezvous_port = {self.rendezvous_port} must be in 0..65535",
            )
        if self.bucket_mb < 1:
            fail("parallel", "bucket_mb", f"parallel.bucket_mb = {self.bucket_mb} must be at least 1")
        if not self.collective_timeout_seconds > 0:
            fail(
                "parallel",
                "collective_timeout_seconds",
                f"parallel.collective_timeout_seconds = {self.collective_timeout_seconds} must be > 0",
            )
