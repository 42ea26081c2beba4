"""Metrics of the orchestrator process: the run as a whole (steps, throughput, losses, validation,
regret, checkpoints, restarts). Built on a registry the caller gives, so tests can use a fresh one."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.stages import STAGE_NAMES, STAGE_SHORT_NAMES, StageSpec, short_name
from orchestrator.stages import STAGES as STAGE_SPECS
from redheart import heads as head_registry
from redheart.metrics_common import TRAINING_BUCKETS, add_process_metrics

# The built-in heads' names at import, kept for old imports; the metrics read the registry.
HEADS = (*head_registry.head_names(), "total")
VALIDATION_METRICS = head_registry.validation_metric_names()
STAGES = STAGE_SHORT_NAMES
SERVICES = (*STAGE_NAMES, "regret")


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry, stages: Sequence[StageSpec] = STAGE_SPECS) -> None:
        """``stages``: the run's stages (orchestrator.stages.stage_specs), whose series exist from the start."""
        self.stage_labels = tuple(s.metric_label for s in stages)
        # long: one flat declaration per metric reads (and greps) best.
        r = registry
        self.steps = Counter(
            "redheart_train_steps_total",
            "Optimizer steps completed (applied or skipped together).",
            registry=r,
        )
        self.skipped_steps = Counter(
            "redheart_train_skipped_steps_total",
            "Steps skipped because fp16 gradients overflowed.",
            registry=r,
        )
        self.step_seconds = Histogram(
            "redheart_train_step_duration_seconds",
            "Wall time of one optimizer step.",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.samples = Counter("redheart_train_samples_total", "Training samples processed.", registry=r)
        self.tokens = Counter(
            "redheart_train_tokens_total", "Training tokens processed (non-padding).", registry=r
        )
        self.samples_per_second = Gauge(
            "redheart_train_samples_per_second", "Samples per second of the last step.", registry=r
        )
        self.tokens_per_second = Gauge(
            "redheart_train_tokens_per_second", "Tokens per second of the last step.", registry=r
        )
        self.loss = Gauge(
            "redheart_train_loss", "Training loss of the last step, per head.", ["head"], registry=r
        )
        self.grad_norm = Gauge(
            "redheart_train_grad_norm", "Global gradient norm before clipping.", registry=r
        )
        self.learning_rate = Gauge(
            "redheart_train_learning_rate", "Learning rate of the last step.", registry=r
        )
        self.loss_scale = Gauge("redheart_train_loss_scale", "fp16 loss scale (1 without fp16).", registry=r)
        self.nonfinite = Counter(
            "redheart_train_nonfinite_total", "Steps whose loss or gradient norm was inf/NaN.", registry=r
        )
        self.regret_mean = Gauge(
            "redheart_train_regret_mean", "Mean counterfactual regret target of the last step.", registry=r
        )
        self.regret_computations = Counter(
            "redheart_train_regret_computations_total",
            "Counterfactual regrets computed for training.",
            registry=r,
        )
        self.bentham_evaluations = Counter(
            "redheart_train_bentham_evaluations_total",
            "Bentham hedonic evaluations for training.",
            registry=r,
        )
        self.validation = Gauge(
            "redheart_validation_metric", "Validation metric of the last evaluation.", ["metric"], registry=r
        )
        self.validation_baseline = Gauge(
            "redheart_validation_baseline",
            "The trivial baseline's value of each validation metric.",
            ["metric"],
            registry=r,
        )
        self.bubble_ratio = Gauge(
            "redheart_pipeline_bubble_ratio",
            "Share of the last step each stage waited on its peer.",
            ["stage"],
            registry=r,
        )
        self.stage_seconds = Counter(
            "redheart_pipeline_stage_seconds_total",
            "Forward / backward / wait seconds per stage.",
            ["stage", "phase"],
            registry=r,
        )
        self.wire_bytes = Counter(
            "redheart_pipeline_wire_bytes_total",
            "Bytes between the stages, by sending stage.",
            ["stage"],
            registry=r,
        )
        self.allreduce_seconds = Counter(
            "redheart_pipeline_allreduce_seconds_total",
            "Seconds each stage process spent summing gradients with its data-parallel replicas.",
            ["stage"],
            registry=r,
        )
        self.allreduce_bytes = Counter(
            "redheart_pipeline_allreduce_bytes_total",
            "Bytes each stage process's gradient sums with its replicas moved (its buckets' sizes).",
            ["stage"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "redheart_checkpoint_seconds",
            "Wall time of a coordinated checkpoint.",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.checkpoints = Counter(
            "redheart_checkpoints_total", "Complete checkpoints written (manifest included).", registry=r
        )
        self.last_step_timestamp = Gauge(
            "redheart_last_step_timestamp_seconds", "Unix time the last step finished.", registry=r
        )
        self.epoch = Gauge("redheart_train_epoch", "Current epoch (0-based).", registry=r)
        self.step = Gauge("redheart_train_step", "Optimizer steps completed in this run.", registry=r)
        self.restarts = Counter(
            "redheart_restarts_total",
            "Service restarts / recoveries during the run.",
            ["service"],
            registry=r,
        )
        self.peak_gpu_memory = Gauge(
            "redheart_train_peak_gpu_memory_bytes",
            "Peak GPU memory of the GPU stage in the last step.",
            registry=r,
        )
        for head in (*head_registry.head_names(), "total"):
            self.loss.labels(head)
        for metric in head_registry.validation_metric_names():
            self.validation.labels(metric)
            self.validation_baseline.labels(metric)
        for stage in self.stage_labels:
            self.bubble_ratio.labels(stage)
            self.wire_bytes.labels(stage)
            self.allreduce_seconds.labels(stage)
            self.allreduce_bytes.labels(stage)
            for phase in ("forward", "backward", "wait"):
                self.stage_seconds.labels(stage, phase)
        for service in (*(s.name for s in stages), "regret"):
            self.restarts.labels(service)
        add_process_metrics(r)

    def observe_step(self, outcome) -> None:
        """Record one orchestrator.pipeline.StepOutcome."""
        import time

        self.steps.inc()
        if outcome.skipped:
            self.skipped_steps.inc()
        self.step_seconds.observe(outcome.seconds)
        self.samples.inc(outcome.samples)
        self.tokens.inc(outcome.tokens)
        if outcome.seconds > 0:
            self.samples_per_second.set(outcome.samples / outcome.seconds)
            self.tokens_per_second.set(outcome.tokens / outcome.seconds)
        for head, value in outcome.losses.items():
            self.loss.labels(head).set(value)
        self.loss.labels("total").set(outcome.total_loss)
        self.grad_norm.set(outcome.grad_norm)
        self.learning_rate.set(outcome.learning_rate)
        self.loss_scale.set(outcome.loss_scale)
        self.regret_mean.set(outcome.regret_mean)
        self.regret_computations.inc(outcome.regret_computations)
        self.bentham_evaluations.inc(outcome.bentham_evaluations)
        for name, timing in outcome.stage_timings.items():
            stage = short_name(name)
            if stage not in self.stage_labels:
                continue
            total = timing.get("total", 0.0)
            self.bubble_ratio.labels(stage).set(timing.get("wait", 0.0) / total if total > 0 else 0.0)
            for phase in ("forward", "backward", "wait"):
                self.stage_seconds.labels(stage, phase).inc(timing.get(phase, 0.0))
            self.wire_bytes.labels(stage).inc(timing.get("bytes_sent", 0.0))
            self.allreduce_seconds.labels(stage).inc(timing.get("allreduce", 0.0))
            self.allreduce_bytes.labels(stage).inc(timing.get("allreduce_bytes", 0.0))
        self.peak_gpu_memory.set(outcome.peak_gpu_memory_bytes)
        self.last_step_timestamp.set(time.time())
