"""Building blocks for the per-process metrics modules (cpu_stage/metrics.py, ...).

Conventions (Prometheus practice): ``redheart_`` prefix, base units (seconds, bytes), counters end
in ``_total``, labels only from small fixed sets, every labelled child created up front so series
exist from the first scrape. Each process builds its metrics on a registry it is given, so tests
can use a fresh ``CollectorRegistry``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server

# Training time scales: micro-batch compute of milliseconds up to multi-minute steps of big models.
TRAINING_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
RPC_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


def add_process_metrics(registry: CollectorRegistry) -> None:
    """redheart_process_resident_memory_bytes, redheart_process_cpu_seconds_total, ... for this process."""
    ProcessCollector(namespace="redheart", registry=registry)


def start_metrics_endpoint(registry: CollectorRegistry, host: str, port: int):
    """Serve /metrics; port 0 picks a free one. Returns (server, bound_port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


class GrpcServerMetrics(grpc.ServerInterceptor):
    """redheart_grpc_server_handled_total{service,method,code} and handling seconds per method.

    ``methods`` is the fixed list of full method names this server exposes (created up front).
    """

    def __init__(self, registry: CollectorRegistry, service: str, methods: Iterable[str]) -> None:
        self.service = service
        self.handled = Counter(
            "redheart_grpc_server_handled_total",
            "RPCs completed by the server, by method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "redheart_grpc_server_handling_seconds",
            "Time the server spent handling an RPC.",
            ["service", "method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.methods = set(methods)
        for m in self.methods:
            self.seconds.labels(service, m)
            for code in ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAVAILABLE", "INTERNAL"):
                self.handled.labels(service, m, code)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if method not in self.methods:
            method = "other"  # keeps label cardinality fixed against arbitrary method names
        service, handled, seconds = self.service, self.handled, self.seconds

        def record(context, started: float, failed: bool) -> None:
            code = _code_of(context, default="UNKNOWN" if failed else "OK")
            handled.labels(service, method, code).inc()
            seconds.labels(service, method).observe(time.perf_counter() - started)

        def wrap_unary(behavior):
            def wrapped(request, context):
                started, failed = time.perf_counter(), True
                try:
                    result = behavior(request, context)
                    failed = False
                    return result
                finally:
                    record(context, started, failed)

            return wrapped

        def wrap_stream(behavior):
            def wrapped(request, context):
                started, failed = time.perf_counter(), True
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    record(context, started, failed)

            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


def _code_of(context, default: str) -> str:
    try:
        code = context.code()
    except Exception:  # pragma: no cover - older grpc without ServicerContext.code()
        return default
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class StageMetrics:
    """Series of a pipeline stage process (the same names in the CPU and GPU stage; label `stage`)."""

    # long: one flat declaration per metric reads (and greps) best, as in OrchestratorMetrics.
    def __init__(self, registry: CollectorRegistry, *, stage: str, methods: Iterable[str]) -> None:
        from prometheus_client import Gauge

        self.stage = stage
        r = registry
        self.forward_seconds = Histogram(
            "redheart_stage_forward_seconds",
            "Forward compute time of one micro-batch.",
            ["stage"],
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.backward_seconds = Histogram(
            "redheart_stage_backward_seconds",
            "Backward compute time of one micro-batch (includes waiting for its gradient on the first stage).",
            ["stage"],
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.round_seconds = Histogram(
            "redheart_stage_round_seconds",
            "Wall time of one accumulation round on this stage.",
            ["stage"],
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.wait_seconds = Counter(
            "redheart_stage_wait_seconds_total",
            "Time blocked waiting on the peer stage (the pipeline bubble).",
            ["stage"],
            registry=r,
        )
        self.compute_seconds = Counter(
            "redheart_stage_compute_seconds_total", "Forward + backward compute time.", ["stage"], registry=r
        )
        self.bubble_ratio = Gauge(
            "redheart_stage_bubble_ratio",
            "Share of the last round spent waiting on the peer.",
            ["stage"],
            registry=r,
        )
        self.micro_batches = Counter(
            "redheart_stage_micro_batches_total", "Micro-batch actions executed.", ["stage", "op"], registry=r
        )
        self.steps_applied = Counter(
            "redheart_stage_steps_applied_total",
            "Optimizer steps applied (or skipped together).",
            ["stage"],
            registry=r,
        )
        self.next_step = Gauge(
            "redheart_stage_next_step", "The optimizer step this stage expects next.", ["stage"], registry=r
        )
        self.parameters = Gauge(
            "redheart_stage_parameters", "Parameters held by this stage.", ["stage"], registry=r
        )
        self.wire_bytes = Counter(
            "redheart_wire_bytes_total",
            "Tensor payload bytes between stages.",
            ["stage", "direction"],
            registry=r,
        )
        self.serialize_seconds = Counter(
            "redheart_wire_serialize_seconds_total",
            "Time encoding / decoding tensors.",
            ["stage", "op"],
            registry=r,
        )
        self.regret_wait_seconds = Counter(
            "redheart_stage_regret_wait_seconds_total",
            "Time the last stage waited for regret targets.",
            ["stage"],
            registry=r,
        )
        self.stale_tensors = Counter(
            "redheart_stale_tensors_dropped_total",
            "Pushed tensors dropped because they belong to an older attempt of their step.",
            ["stage"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "redheart_stage_checkpoint_seconds",
            "Time writing this stage's checkpoint shard.",
            ["stage"],
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.gpu_allocated = Gauge(
            "redheart_gpu_memory_allocated_bytes",
            "CUDA memory allocated by tensors (0 on CPU).",
            ["stage"],
            registry=r,
        )
        self.gpu_reserved = Gauge(
            "redheart_gpu_memory_reserved_bytes",
            "CUDA memory reserved by the caching allocator (0 on CPU).",
            ["stage"],
            registry=r,
        )
        self.gpu_peak = Gauge(
            "redheart_gpu_memory_peak_bytes",
            "Peak CUDA memory allocated during the last round (0 on CPU).",
            ["stage"],
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "redheart_gpu_utilization_ratio",
            "GPU busy share from NVML (0 on CPU or without NVML).",
            ["stage"],
            registry=r,
        )
        for metric in (
            self.forward_seconds,
            self.backward_seconds,
            self.round_seconds,
            self.wait_seconds,
            self.compute_seconds,
            self.bubble_ratio,
            self.steps_applied,
            self.next_step,
            self.parameters,
            self.regret_wait_seconds,
            self.checkpoint_seconds,
            self.stale_tensors,
            self.gpu_allocated,
            self.gpu_reserved,
            self.gpu_peak,
            self.gpu_utilization,
        ):
            metric.labels(stage)
        for op in ("forward", "backward"):
            self.micro_batches.labels(stage, op)
        for direction in ("sent", "received"):
            self.wire_bytes.labels(stage, direction)
        for op in ("encode", "decode"):
            self.serialize_seconds.labels(stage, op)
        add_process_metrics(r)
        self.grpc = GrpcServerMetrics(r, f"{stage}_stage", methods)

    def observe_round(self, result) -> None:
        """Record one accumulation round (a redheart.stage.contracts.RoundResult)."""
        s = self.stage
        for action, _mb, start, end in result.spans:
            if action == "F":
                self.forward_seconds.labels(s).observe(end - start)
                self.micro_batches.labels(s, "forward").inc()
            elif action == "B":
                self.backward_seconds.labels(s).observe(end - start)
                self.micro_batches.labels(s, "backward").inc()
        t = result.timings
        total = t.get("total", 0.0)
        self.round_seconds.labels(s).observe(total)
        self.wait_seconds.labels(s).inc(t.get("wait", 0.0))
        self.compute_seconds.labels(s).inc(
            max(0.0, t.get("forward", 0.0) + t.get("backward", 0.0) - t.get("wait", 0.0))
        )
        self.regret_wait_seconds.labels(s).inc(t.get("regret_wait", 0.0))
        self.bubble_ratio.labels(s).set(t.get("wait", 0.0) / total if total > 0 else 0.0)
        if result.peak_memory_bytes:
            self.gpu_peak.labels(s).set(result.peak_memory_bytes)

    def bind_device(self, device) -> None:
        """Read the GPU gauges of this stage's own device (``cuda:N``) when Prometheus scrapes, off
        the training path: allocated / reserved from torch's allocator, utilization from NVML
        (the optional extra ``gpu``, nvidia-ml-py), initialised once. Nothing to do on CPU."""
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        s = self.stage
        self.gpu_allocated.labels(s).set_function(_safe(lambda: torch.cuda.memory_allocated(index)))
        self.gpu_reserved.labels(s).set_function(_safe(lambda: torch.cuda.memory_reserved(index)))
        handle = nvml_handle(index)
        if handle is not None:
            import pynvml

            self.gpu_utilization.labels(s).set_function(
                _safe(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            )


def _safe(read):
    """A gauge callback that never breaks a scrape: 0 when the device cannot be read."""

    def value() -> float:
        try:
            return float(read())
        except Exception:  # metrics must never break the endpoint or training
            return 0.0

    return value


def nvml_handle(cuda_index: int):
    """The NVML handle of CUDA device ``cuda_index`` (None without nvidia-ml-py or a driver).

    Matched by UUID: under CUDA_VISIBLE_DEVICES, CUDA's index N is not NVML's index N."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()  # once per stage process; NVML counts nested inits, nothing to undo
        uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    except Exception:
        return None
