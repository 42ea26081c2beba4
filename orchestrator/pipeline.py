"""One optimizer step across the pipeline, as the orchestrator drives it.

For each optimizer step the orchestrator sends every stage one plan at the same time, holding all
micro-batches of all accumulation rounds, each padded only to its longest sequence
(orchestrator/batching.py): the CPU stage gets token ids, the GPU stage the attention mask and
labels. The stages then exchange activations and gradients directly, on one 1F1B order with one
fill and one drain per step. Afterwards it combines the stages' squared gradient norms into the global norm, computes one clip coefficient, decides (fp16) whether the
step is skipped, and tells both stages to apply it. A failure on any stage aborts the step on all
of them: no stage ever updates its weights alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from orchestrator.batching import Batch, computed_tokens, split_micro_batches, step_micro_batches
from orchestrator.stage_client import StageClient, micro_batch_message
from orchestrator.stages import plan_inputs
from redheart import codec
from redheart.config import HybridConfig
from redheart.rpc import ServiceError
from redheart.v1 import stage_pb2, tensor_pb2

ABORT_GRACE_SECONDS = 30.0


class StepFailed(RuntimeError):
    """A step could not complete on some stage; it was aborted everywhere (no optimizer update)."""

    def __init__(self, step: int, stage: str, cause: BaseException) -> None:
        self.step = step
        self.stage = stage
        self.cause = cause
        super().__init__(f"step {step} failed on the {stage}: {cause}")


class NonFiniteError(RuntimeError):
    """A loss or gradient norm is inf/NaN in fp32 training: the run stops before the update."""


@dataclass
class StepOutcome:
    step: int
    losses: dict[str, float]
    total_loss: float
    micro_batch_losses: list[float]
    grad_norm: float
    clip_coefficient: float
    learning_rate: float
    skipped: bool
    loss_scale: float
    regret_mean: float
    regret_computations: int
    bentham_evaluations: int
    samples: int
    tokens: int  # real (non-pad) tokens
    seconds: float
    computed_tokens: int = 0  # token positions computed: real tokens + the padding left after trimming
    stage_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    spans: dict[str, list[tuple[str, int, float, float]]] = field(default_factory=dict)
    peak_gpu_memory_bytes: int = 0


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s coefficient: max_norm / (norm + 1e-6), at most 1."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


class DynamicLossScale:
    """fp16 loss scaling owned by the orchestrator, so the skip decision is global across stages."""

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        max_consecutive_skips: int = 0,
    ) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.max_consecutive_skips = max_consecutive_skips  # 0: no limit
        self._good_steps = 0
        self._skips = 0

    def update(self, found_inf: bool, step: int | None = None) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale / 2.0, 1.0)
            self._good_steps = 0
            self._skips += 1
            if self.max_consecutive_skips and self._skips >= self.max_consecutive_skips:
                # Floored at 1.0, the scale cannot fall further: a persistent overflow would
                # otherwise skip every remaining step in silence.
                raise NonFiniteError(
                    f"step {step}: {self._skips} consecutive steps overflowed in fp16 and were skipped "
                    f"(loss scale now {self.scale:g}); the model or the data produce inf/NaN "
                    f'(fix: lower train.learning_rate, set train.max_grad_norm, mixed_precision_dtype = "bf16" '
                    f"on a GPU with compute capability >= 8.0, or use_mixed_precision = false)"
                )
        else:
            self._skips = 0
            self._good_steps += 1
            if self._good_steps % self.growth_interval == 0:
                self.scale *= 2.0

    def state(self) -> dict[str, float]:
        return {
            "scale": self.scale,
            "good_steps": self._good_steps,
            "enabled": self.enabled,
            "skips": self._skips,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.scale = float(state.get("scale", self.scale))
        self._good_steps = int(state.get("good_steps", 0))
        self._skips = int(state.get("skips", 0))


class PipelineDriver:
    def __init__(
        self,
        stages: Sequence[StageClient],
        config: HybridConfig,
        run_id: str,
        *,
        fp16_loss_scaling: bool = False,
        lookahead: int = 0,
        dead_services: Callable[[], list[str]] | None = None,
    ) -> None:
        # Every stage process, replica by replica (orchestrator.stages.stage_specs), each replica's
        # in pipeline order: the first embeds, the last holds the heads.
        self.stages = tuple(stages)
        self.replicas = config.parallel.data_parallel
        self.depth = len(self.stages) // self.replicas  # stages per replica
        if self.depth < 2 or len(self.stages) % self.replicas:
            raise ValueError(
                f"{len(self.stages)} stage processes do not make {self.replicas} pipeline(s) of at least two stages"
            )
        self.config = config
        self.run_id = run_id
        self.scaler = DynamicLossScale(
            fp16_loss_scaling,
            init_scale=config.train.initial_loss_scale,
            max_consecutive_skips=config.train.max_consecutive_skips,
        )
        self.lookahead = lookahead
        self.pool = ThreadPoolExecutor(max_workers=len(self.stages), thread_name_prefix="stage-call")
        # Local launch: the processes we started. A dead one fails the step at once instead of
        # after the step deadline (the surviving stage would otherwise wait on it that long).
        self.dead_services = dead_services
        self.eval_passes = 0
        # Tries per step: a step run again after an abort (recovery) is a new attempt.
        self.attempts: dict[int, int] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- plans

    def step_plans(self, step: int, rounds: Sequence[Batch]) -> tuple[stage_pb2.StepPlan, ...]:
        """Every stage's plan of a training step over its accumulation rounds."""
        t = self.config.train
        return self._plans(step, step_micro_batches(rounds, t.micro_batch_size, t.pad_to_multiple_of))

    def _plans(
        self,
        step: int,
        parts: Sequence[Batch],
        *,
        forward_only: bool = False,
        eval_id: int = 0,
        replicas: int | None = None,
    ) -> tuple[stage_pb2.StepPlan, ...]:
        """One plan per stage for the whole optimizer step (or evaluation pass).

        All ``accumulation x micro-batches`` micro-batches go into one 1F1B order, so the pipe
        fills and drains once per optimizer step instead of once per accumulation round. The loss
        multiplier is still 1 / (micro-batches x accumulation steps): one plan changes when the
        micro-batches run, not what each one contributes to ``.grad``.
        """
        t = self.config.train
        header = stage_pb2.StepPlan(
            envelope=tensor_pb2.Envelope(run_id=self.run_id, step=eval_id if forward_only else step),
            accumulation_round=0,
            accumulation_steps=1,
            schedule=t.schedule,
            loss_multiplier=1.0 / len(parts),
            loss_scale=self.scaler.scale,
            deadline_seconds=self.config.orchestrator.step_deadline_seconds,
            forward_only=forward_only,
            lookahead=0 if forward_only else min(self.lookahead, len(parts)),
            attempt=0 if forward_only else self.attempts.get(step, 1),
        )
        plans = []
        # Same header for every stage; each gets only the inputs it uses (ids for the first, labels
        # for the last), and each replica every R-th micro-batch under its global index (dropout
        # seeds and the regret cache are keyed by it, so nothing depends on R).
        replicas = self.replicas if replicas is None else replicas
        for replica in range(replicas):
            mine = list(enumerate(parts))[replica::replicas]
            for rank in range(self.depth):
                keys = plan_inputs(rank, self.depth)
                plan = stage_pb2.StepPlan()
                plan.CopyFrom(header)
                plan.lookahead = min(plan.lookahead, len(mine))
                for i, part in mine:
                    plan.micro_batches.append(micro_batch_message(i, part.tensors, keys, part.ids))
                plans.append(plan)
        return tuple(plans)

    def _run_on_stages(self, step: int, plans: Sequence[stage_pb2.StepPlan]) -> list[stage_pb2.StepResult]:
        """RunStep on the first ``len(plans)`` stage processes side by side (every one for a step,
        replica 0's for an evaluation pass); the first failure aborts the step on all."""
        # A stage fails its round when nothing arrived for step_deadline_seconds, however long the
        # round is; this call timeout only catches a stage that stopped answering altogether.
        waits = 2 * max(len(p.micro_batches) for p in plans) + 2
        timeout = self.config.orchestrator.step_deadline_seconds * waits + 30.0
        futures = [self.pool.submit(stage.run_step, plan, timeout) for stage, plan in zip(self.stages, plans)]
        results: list[Any] = [None] * len(plans)
        errors: list[tuple[str, BaseException]] = []
        aborted = False
        pending = list(enumerate(futures))
        last_check = time.monotonic()
        aborted_at = 0.0
        while pending:
            if aborted and not aborted_at:
                aborted_at = time.monotonic()
            if aborted_at and time.monotonic() - aborted_at > ABORT_GRACE_SECONDS:
                # A stage that does not answer its abort: report the step as failed anyway.
                for i, _fut in pending:
                    errors.append(
                        (
                            self.stages[i].name,
                            RuntimeError(f"no answer {ABORT_GRACE_SECONDS:.0f}s after the step was aborted"),
                        )
                    )
                break
            if self.dead_services is not None and not aborted and time.monotonic() - last_check > 0.25:
                last_check = time.monotonic()
                dead = self.dead_services()
                if dead:
                    aborted = True
                    cause = RuntimeError(f"{', '.join(dead)} exited during step {step}")
                    errors.append((dead[0].replace("_", " "), cause))
                    self._abort_all(step, str(cause))
            still = []
            for i, fut in pending:
                if not fut.done():
                    still.append((i, fut))
                    continue
                try:
                    results[i] = fut.result()
                except BaseException as exc:  # noqa: BLE001 - any failure aborts the step everywhere
                    errors.append((self.stages[i].name, exc))
                    if not aborted:
                        aborted = True
                        self._abort_all(step, f"{self.stages[i].name} failed: {exc}")
            pending = still
            if pending:
                # Block until a stage answers (or 0.25 s pass, to look at process liveness again).
                wait([f for _i, f in pending], timeout=0.25, return_when=FIRST_COMPLETED)
        if errors:
            # Report the root cause, not the ABORTED answer of the stage we stopped because of it.
            errors.sort(
                key=lambda e: (
                    isinstance(e[1], ServiceError)
                    and e[1].code in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
                )
            )
            stage, exc = errors[0]
            raise StepFailed(step, stage, exc)
        return results

    def _abort_all(self, step: int, reason: str) -> None:
        for stage in self.stages:
            try:
                stage.abort(self.run_id, step, reason, self.attempts.get(step, 0))
            except ServiceError:
                pass  # a dead stage cannot be aborted; it restarts from a checkpoint

    # ---- a training step

    def run_step(self, step: int, rounds: Sequence[Batch], learning_rate: float) -> StepOutcome:
        t = self.config.train
        if len(rounds) != t.gradient_accumulation_steps:
            raise ValueError(
                f"step {step}: {len(rounds)} rounds given, gradient_accumulation_steps is "
                f"{t.gradient_accumulation_steps}"
            )
        self.attempts[step] = self.attempts.get(step, 0) + 1
        for old in [s for s in self.attempts if s < step - 16]:
            del self.attempts[old]
        self._check_batch_sizes(step, rounds)
        start = time.perf_counter()
        parts = step_micro_batches(rounds, t.micro_batch_size, t.pad_to_multiple_of)
        results = self._run_on_stages(step, self._plans(step, parts))
        gathered = self._gather(results)
        # The last stage of each replica holds the heads: its micro-batch results carry the losses.
        last = [results[k * self.depth + self.depth - 1] for k in range(self.replicas)]
        per_mb = sorted((m for r in last for m in r.micro_batches), key=lambda m: m.index)
        total_norm = self._total_norm(step, gathered.norms)
        skip = False
        if self.scaler.enabled:
            skip = gathered.found_inf or not math.isfinite(total_norm)
        else:
            self._fail_on_nonfinite(step, per_mb, gathered.norms)
        coef = clip_coefficient(total_norm, t.max_grad_norm) if not skip else 0.0
        scale = self.scaler.scale
        self._apply(step, coef, learning_rate, skip, scale)
        self.scaler.update(skip, step)
        mb_losses = [m.total_loss for m in per_mb]
        regret_values = [m.regret_mean for m in per_mb if m.regret_computations]
        return StepOutcome(
            step=step,
            losses=_mean_losses(per_mb),
            total_loss=sum(mb_losses) / len(mb_losses),
            micro_batch_losses=mb_losses,
            grad_norm=total_norm,
            clip_coefficient=coef,
            learning_rate=learning_rate,
            skipped=skip,
            loss_scale=scale,
            regret_mean=sum(regret_values) / len(regret_values) if regret_values else 0.0,
            regret_computations=sum(m.regret_computations for m in per_mb),
            bentham_evaluations=sum(m.bentham_evaluations for m in per_mb),
            samples=sum(len(p) for p in parts),
            tokens=sum(int(p.tensors["attention_mask"].sum()) for p in parts),
            computed_tokens=computed_tokens(parts),
            seconds=time.perf_counter() - start,
            stage_timings=gathered.timings,
            spans=gathered.spans,
            peak_gpu_memory_bytes=gathered.peak,
        )

    def _check_batch_sizes(self, step: int, rounds: Sequence[Batch]) -> None:
        t = self.config.train
        for r, batch in enumerate(rounds):
            if len(batch) != t.batch_size:
                raise ValueError(
                    f"step {step} round {r}: batch of {len(batch)} samples, train.batch_size is {t.batch_size}"
                )

    def _gather(self, results: Sequence[stage_pb2.StepResult]) -> _Gathered:
        """Every stage's timings, spans, squared gradient norm, overflow flag and peak memory."""
        g = _Gathered(
            timings={s.name: dict.fromkeys(_TIMING_KEYS, 0.0) for s in self.stages},
            spans={s.name: [] for s in self.stages},
        )
        for stage, res in zip(self.stages, results):
            tm = res.timings
            acc = g.timings[stage.name]
            acc["forward"] += tm.forward_seconds
            acc["backward"] += tm.backward_seconds
            acc["wait"] += tm.wait_seconds
            acc["serialize"] += tm.serialize_seconds
            acc["send"] += tm.send_seconds
            acc["bytes_sent"] += tm.bytes_sent
            acc["bytes_received"] += tm.bytes_received
            acc["total"] += tm.total_seconds
            acc["regret_wait"] += tm.regret_wait_seconds
            acc["allreduce"] += tm.allreduce_seconds
            acc["allreduce_bytes"] += tm.allreduce_bytes
            g.spans[stage.name].extend((s.action, s.micro_batch, s.start, s.end) for s in res.spans)
            if res.has_grad_norm:
                g.norms[stage.name] = res.grad_norm_sq
                g.found_inf |= res.found_inf
            g.peak = max(g.peak, res.peak_memory_bytes)
        return g

    def _total_norm(self, step: int, norms: dict[str, float]) -> float:
        """The global gradient norm from every stage's squared norm; inf when any is not finite.
        Replicas hold the summed gradients: each stage counts once, and all its replicas must agree."""
        if set(norms) != {s.name for s in self.stages}:
            raise StepFailed(
                step,
                "orchestrator",
                RuntimeError(
                    f"gradient norms missing from {sorted({s.name for s in self.stages} - set(norms))}"
                ),
            )
        names = [s.name for s in self.stages]
        for i, name in enumerate(names[self.depth :], start=self.depth):
            first = names[i % self.depth]
            if norms[name] != norms[first] and math.isfinite(norms[first]):
                raise StepFailed(
                    step,
                    name.replace("_", " "),
                    RuntimeError(f"gradient norm² {norms[name]!r} differs from {first}'s {norms[first]!r}"),
                )
        norms = {n: norms[n] for n in names[: self.depth]}
        return (
            math.sqrt(sum(norms.values())) if all(math.isfinite(v) for v in norms.values()) else float("inf")
        )

    def _fail_on_nonfinite(self, step: int, per_mb, norms: dict[str, float]) -> None:
        """fp32 training: a non-finite loss or gradient aborts the step, nothing is applied."""
        bad_mb = [m.index for m in per_mb if not math.isfinite(m.total_loss)]
        bad_stage = [name for name, v in norms.items() if not math.isfinite(v)]
        if not (bad_mb or bad_stage):
            return
        self._abort_all(step, "non-finite loss or gradient")
        where = []
        if bad_mb:
            where.append(f"loss of micro-batch(es) {bad_mb} on the {self.stages[-1].name}")
        if bad_stage:
            where.append(f"gradient norm on the {', '.join(bad_stage)}")
        raise NonFiniteError(
            f"step {step}: non-finite {' and '.join(where)} in fp32 training; the update was not applied "
            f"(fix: lower train.learning_rate, set train.max_grad_norm, or check the data)"
        )

    def _apply(self, step: int, coef: float, learning_rate: float, skip: bool, scale: float) -> None:
        """ApplyStep on every stage side by side; the first failure fails the step."""
        applied = [
            self.pool.submit(s.apply, self.run_id, step, coef, learning_rate, skip, scale)
            for s in self.stages
        ]
        errors = []
        for s, fut in zip(self.stages, applied):
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001
                errors.append((s.name, exc))
        if errors:
            raise StepFailed(step, errors[0][0], errors[0][1])

    # ---- evaluation

    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward-only pass of one batch through replica 0's stages; the head outputs [B, ...]."""
        self.eval_passes += 1
        eval_id = self.eval_passes
        parts = split_micro_batches(
            batch, self.config.train.micro_batch_size, self.config.train.pad_to_multiple_of
        )
        # Replica 0 alone evaluates: the other replicas' processes have nothing to do meanwhile.
        plans = self._plans(0, parts, forward_only=True, eval_id=eval_id, replicas=1)
        results = self._run_on_stages(eval_id, plans)
        outputs: dict[str, list[torch.Tensor]] = {}
        for mb in sorted(results[-1].micro_batches, key=lambda m: m.index):  # the last stage's heads
            for name, msg in mb.outputs.items():
                outputs.setdefault(name, []).append(codec.decode(msg))
        return {k: torch.cat(v) for k, v in outputs.items()}


_TIMING_KEYS = (
    "forward",
    "backward",
    "wait",
    "serialize",
    "send",
    "bytes_sent",
    "bytes_received",
    "total",
    "regret_wait",
    "allreduce",
    "allreduce_bytes",
)


@dataclass
class _Gathered:
    """What a step's StepResults say, summed per stage."""

    timings: dict[str, dict[str, float]]
    spans: dict[str, list]
    norms: dict[str, float] = field(default_factory=dict)
    found_inf: bool = False
    peak: int = 0


def _mean_losses(per_mb: Sequence[stage_pb2.MicroBatchResult]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for m in per_mb:
        for head, value in m.losses.items():
            sums.setdefault(head, []).append(value)
    return {head: sum(v) / len(v) for head, v in sums.items()}
