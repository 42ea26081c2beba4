"""The sections of the processes and their links: [regret], [cpu_stage], [gpu_stage], [wire],
[orchestrator], [metrics] and [launch], each with its checks.

Every field has a docstring saying what it does (docs/config.md is generated from them). A
section's ``check(fail)`` holds the rules that need only that section; rules that combine sections
are in validation.py, and the endpoint fields' rules (host, port, address, metrics_port) in
endpoints.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redheart.config.errors import Fail


@dataclass
class RegretConfig:
    enabled: bool = True
    """Train the regret head toward the regret service's counterfactual regret."""
    regrets_per_step: int = 7
    """Counterfactual actions per scenario."""
    bentham_per_regret: int = 3
    """Perspectives each action is evaluated from (agent, affected, society)."""
    num_workers: int = 4
    """Worker processes of the regret service."""
    host: str = "127.0.0.1"
    """Interface the regret service binds."""
    port: int = 50053
    """Port the regret service listens on (0: any free port)."""
    address: str = ""
    """Where clients reach the service (empty: host:port). "inprocess" scores in the GPU stage itself."""
    metrics_port: int = 9103
    """Prometheus /metrics port of the regret service (0: disabled)."""
    max_batch: int = 4096
    """Largest batch one Score call may carry."""
    lookahead: int = 1
    """Extra forwards the last stage runs before the first backward, so regret calls overlap compute."""
    timeout_seconds: float = 30.0
    """Deadline of one Score call; the GPU stage retries within the step deadline."""
    cache_mb: int = 64
    """Memory (MiB, requests and responses) the regret service keeps to answer retried calls."""
    drain_seconds: float = 10.0
    """Seconds a stopping regret service gives the calls in flight; those still running are cancelled."""

    def check(self, fail: Fail) -> None:
        """This section's own rules (its ports are checked with the other endpoints)."""
        for key in ("regrets_per_step", "bentham_per_regret", "num_workers", "max_batch"):
            if getattr(self, key) < 1:
                fail("regret", key, f"regret.{key} = {getattr(self, key)} must be at least 1")
        if self.bentham_per_regret > 3:
            fail(
                "regret",
                "bentham_per_regret",
                f"regret.bentham_per_regret = {self.bentham_per_regret}: only 3 perspectives exist (agent, affected, society)",
            )
        if self.lookahead < 0:
            fail("regret", "lookahead", f"regret.lookahead = {self.lookahead} must be >= 0")
        if not self.drain_seconds >= 0:  # also refuses nan
            fail("regret", "drain_seconds", f"regret.drain_seconds = {self.drain_seconds} must be >= 0")
        if self.cache_mb < 0:
            fail("regret", "cache_mb", f"regret.cache_mb = {self.cache_mb} must be >= 0 (0: no cache)")


@dataclass
class CpuStageConfig:
    host: str = "127.0.0.1"
    """Interface the CPU stage binds."""
    port: int = 50051
    """Port of the CPU stage (0: any free port)."""
    address: str = ""
    """Where the orchestrator and the GPU stage reach it (empty: host:port)."""
    metrics_port: int = 9101
    """Prometheus /metrics port (0: disabled)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    cpu_memory_gb: float = 128.0
    """Host memory budget of this stage; the pre-flight check refuses a model that cannot fit."""
    addresses: list[str] = field(default_factory=list)
    """Remote mode with parallel.data_parallel > 1: where each replica's CPU stage is reached, replica by replica."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward instead of storing them."""

    def check(self, fail: Fail) -> None:
        """This section's own rules (its ports are checked with the other endpoints)."""
        if self.cpu_memory_gb <= 0:
            fail(
                "cpu_stage",
                "cpu_memory_gb",
                f"cpu_stage.cpu_memory_gb = {self.cpu_memory_gb} must be > 0",
            )


@dataclass
class GpuStageConfig:
    host: str = "127.0.0.1"
    """Interface the GPU stage binds."""
    port: int = 50052
    """Port of the GPU stage (0: any free port)."""
    address: str = ""
    """Where the orchestrator and the CPU stage reach it (empty: host:port)."""
    metrics_port: int = 9102
    """Prometheus /metrics port (0: disabled)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cuda, cuda:N or cpu."""
    threads: int = 0
    """torch intra-op threads when running on CPU (0: torch's default)."""
    gpu_memory_gb: float = 8.0
    """GPU memory budget; a split whose estimate exceeds it, or a card with less free memory, is refused."""
    enforce_memory_budget: bool = True
    """On CUDA, cap this process's allocator at gpu_memory_gb (torch.cuda.set_per_process_memory_fraction)."""
    empty_cache_every: int = 0
    """Free the CUDA caching allocator every N steps (0: never; freeing costs a device sync and re-allocation)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward instead of storing them."""
    rank: int = 0
    """Pipeline stage this process runs when model.stage_layers gives more than two (1 .. p-1; 0: the last)."""
    devices: list[str] = field(default_factory=list)
    """Device of each GPU stage process in pipeline order, e.g. ["cuda:0", "cuda:1"] (empty: device for all)."""
    addresses: list[str] = field(default_factory=list)
    """Remote mode with more than two stages or with replicas: where each GPU stage process is reached, replica by replica, each replica's in pipeline order (data_parallel x (stages - 1) entries)."""

    def device_for(self, rank: int) -> str:
        """The device of the GPU stage process at pipeline position ``rank`` (1 .. p-1)."""
        return self.devices[rank - 1] if self.devices else self.device

    def check(self, fail: Fail) -> None:
        """This section's own rules (its ports are checked with the other endpoints)."""
        for i, name in enumerate(self.devices):
            if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
                fail(
                    "gpu_stage",
                    "devices",
                    f'gpu_stage.devices[{i}] = {name!r} must be "auto", "cpu", "cuda" or "cuda:N"',
                )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            fail(
                "gpu_stage",
                "device",
                f'gpu_stage.device = {self.device!r} must be "auto", "cpu", "cuda" or "cuda:N"',
            )
        if self.gpu_memory_gb <= 0:
            fail("gpu_stage", "gpu_memory_gb", f"gpu_stage.gpu_memory_gb = {self.gpu_memory_gb} must be > 0")


@dataclass
class WireConfig:
    codec: str = "raw"
    """Encoding of activations and gradients between stages: raw, fp16, bf16 or int8 (blockwise)."""
    max_message_mb: int = 512
    """gRPC send/receive limit on every channel and server (MiB)."""
    max_rank: int = 8
    """Largest tensor rank a service accepts."""
    max_concurrent_rpcs: int = 64
    """Concurrent RPCs a server accepts before answering RESOURCE_EXHAUSTED."""
    max_deadline_seconds: float = 3600.0
    """Longest `deadline_seconds` a RunStep may ask for (how long a stage may wait on its peer);
    must be at least orchestrator.step_deadline_seconds."""
    max_plan_samples: int = 4096
    """Most samples (all micro-batches together) one RunStep plan may carry."""
    max_plan_tokens: int = 1048576
    """Most token positions (samples x positions, all micro-batches) one RunStep plan may carry."""
    max_early_pushes: int = 64
    """Tensors a stage keeps for a step or evaluation pass whose RunStep has not arrived yet."""
    max_error_chars: int = 200
    """Longest piece of a request (a name, a run id, a reason) echoed in an error message."""
    retry_max_attempts: int = 5
    """gRPC retry policy of idempotent calls: attempts in all, 1 to 5 (gRPC's cap; 1: no retries)."""
    retry_initial_backoff_seconds: float = 0.05
    """Backoff before the first retry (gRPC draws each delay at random up to the current backoff)."""
    retry_max_backoff_seconds: float = 2.0
    """Largest backoff between retries."""
    retry_backoff_multiplier: float = 2.0
    """Growth of the backoff from one retry to the next."""
    retry_status_codes: str = "UNAVAILABLE"
    """Comma-separated gRPC status codes to retry idempotent calls on, e.g. "UNAVAILABLE,RESOURCE_EXHAUSTED"."""

    def check(self, fail: Fail) -> None:
        """This section's own rules: message and plan limits, deadlines, the retry policy."""
        if self.max_message_mb < 1:
            fail("wire", "max_message_mb", f"wire.max_message_mb = {self.max_message_mb} must be >= 1")
        if self.max_rank < 1:
            fail("wire", "max_rank", f"wire.max_rank = {self.max_rank} must be >= 1")
        if self.max_concurrent_rpcs < 1:
            fail(
                "wire",
                "max_concurrent_rpcs",
                f"wire.max_concurrent_rpcs = {self.max_concurrent_rpcs} must be >= 1",
            )
        self.check_retry(fail)
        if not self.max_deadline_seconds > 0:
            fail(
                "wire",
                "max_deadline_seconds",
                f"wire.max_deadline_seconds = {self.max_deadline_seconds} must be > 0",
            )
        for key in ("max_plan_samples", "max_plan_tokens", "max_early_pushes"):
            if getattr(self, key) < 1:
                fail("wire", key, f"wire.{key} = {getattr(self, key)} must be at least 1")
        if self.max_error_chars < 16:
            fail(
                "wire",
                "max_error_chars",
                f"wire.max_error_chars = {self.max_error_chars} must be at least 16",
            )

    def check_retry(self, fail: Fail) -> None:
        """The gRPC retry policy's rules: attempts within gRPC's cap, growing backoffs, known codes."""
        if not 1 <= self.retry_max_attempts <= 5:
            fail(
                "wire",
                "retry_max_attempts",
                f"wire.retry_max_attempts = {self.retry_max_attempts} must be in 1..5 "
                "(gRPC caps retry policies at 5 attempts; 1 turns retries off)",
            )
        for key in ("retry_initial_backoff_seconds", "retry_max_backoff_seconds", "retry_backoff_multiplier"):
            if not getattr(self, key) > 0:
                fail("wire", key, f"wire.{key} = {getattr(self, key)} must be > 0")
        if self.retry_max_backoff_seconds < self.retry_initial_backoff_seconds:
            fail(
                "wire",
                "retry_max_backoff_seconds",
                f"wire.retry_max_backoff_seconds = {self.retry_max_backoff_seconds} is below "
                f"wire.retry_initial_backoff_seconds = {self.retry_initial_backoff_seconds}",
            )
        # Imported when checked: redheart.rpc pulls in grpc, which a config alone does not need.
        from redheart.rpc import parse_status_codes

        try:
            parse_status_codes(self.retry_status_codes)
        except ValueError as exc:
            fail("wire", "retry_status_codes", f"wire.retry_status_codes: {exc}")


@dataclass
class OrchestratorConfig:
    output_dir: str = "runs/demo"
    """Where the run writes its report, tokenizer, checkpoints and logs."""
    metrics_port: int = 9100
    """Prometheus /metrics port of the orchestrator (0: disabled)."""
    connect_timeout_seconds: float = 60.0
    """How long to wait for every service to report SERVING."""
    step_deadline_seconds: float = 600.0
    """Deadline of one accumulation round on a stage (and of waiting on a peer)."""
    rpc_timeout_seconds: float = 60.0
    """Deadline of the short control calls (describe, apply, save, load)."""
    lease_seconds: float = 10.0
    """A stage aborts a round whose RunStep call from the orchestrator ended (the orchestrator died
    or gave up) and was not retried within this many seconds, and is then free for a new run."""
    verify_steps: int = 3
    """Optimizer steps --verify compares against single-process training."""
    verify_rtol: float = 1e-5
    """Relative tolerance of --verify (torch's pipelining tests use 1e-5)."""
    verify_atol: float = 4e-5
    """Absolute tolerance of --verify."""
    progress: str = "auto"
    """Progress display: auto (bar on a terminal), bar, or log."""

    def check(self, fail: Fail) -> None:
        """This section's own rules: --verify tolerances and steps, positive timeouts."""
        for key in ("verify_rtol", "verify_atol"):
            if getattr(self, key) < 0:
                fail("orchestrator", key, f"orchestrator.{key} = {getattr(self, key)} must be >= 0")
        if self.verify_steps < 1:
            fail(
                "orchestrator",
                "verify_steps",
                f"orchestrator.verify_steps = {self.verify_steps} must be >= 1",
            )
        for key in (
            "connect_timeout_seconds",
            "step_deadline_seconds",
            "rpc_timeout_seconds",
            "lease_seconds",
        ):
            if getattr(self, key) <= 0:
                fail("orchestrator", key, f"orchestrator.{key} = {getattr(self, key)} must be > 0")


@dataclass
class MetricsConfig:
    enabled: bool = True
    """Serve Prometheus /metrics from every process."""
    host: str = "127.0.0.1"
    """Interface the metrics endpoints bind (0.0.0.0 to let a remote Prometheus scrape)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <output_dir>/tensorboard/ (needs the `tensorboard` extra)."""


@dataclass
class LaunchConfig:
    mode: str = "local"
    """local: the orchestrator starts the services itself; remote: it connects to their addresses."""
    ports: str = "auto"
    """auto: local services get free loopback ports; fixed: use the configured ports."""
    startup_timeout_seconds: float = 120.0
    """How long a locally started service may take to become healthy."""
    log_dir: str = ""
    """Where local services write their logs (empty: <output_dir>/logs)."""
    max_restarts: int = 3
    """Recoveries per run after a service dies or stops answering, in any phase (local: restart it; remote: wait for it); each try counts, also one cut short by another death."""

    def check(self, fail: Fail) -> None:
        """This section's own rules."""
        if self.max_restarts < 0:
            fail("launch", "max_restarts", f"launch.max_restarts = {self.max_restarts} must be >= 0")
