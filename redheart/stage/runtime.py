"""Torch-only logic of a pipeline stage: the part of the model it holds, its optimizer, and the
state machine that starts a run, runs rounds, applies, aborts, saves and loads. No gRPC here:
tensors arrive through a :class:`~redheart.stage.mailbox.Mailbox` and leave through a
:class:`~redheart.stage.contracts.PeerLink` that the service layer provides.

The same class runs the CPU stage (first) and the GPU stage (last); what differs is the
:class:`~redheart.stage.contracts.StagePart` (cpu_stage/logic.py, gpu_stage/logic.py) that knows
how to run a forward and a backward of its modules. Running rounds is in redheart/stage/rounds.py,
saving and loading in redheart/stage/state_io.py (mixins of :class:`StageRuntime`).

Invariants kept here (docs/architecture.md, "One optimizer step"):

* each micro-batch loss is multiplied by ``loss_multiplier = 1 / (micro-batches x accumulation
  steps)`` before backward; ``.grad`` is never rescaled afterwards;
* the gradient-norm² of this stage is reported after the last accumulation round; the optimizer
  only steps when the orchestrator sends the global clip coefficient (both stages or neither);
* every action is keyed by (run, step, micro-batch, kind): retries are idempotent, steps out of
  order are refused with a message naming step and micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from redheart.config import TrainConfig, fingerprint
from redheart.model import ModelShape
from redheart.precision import (
    Precision,
    PrecisionError,
    apply_tf32,
    autocast,
    choose_precision,
    device_capability,
    held_weight_casts,
)
from redheart.stage.checks import MAX_LEARNING_RATE, MAX_STEP, check_settings, short
from redheart.stage.contracts import EVAL_ACTIVATION, RoundPlan, RoundResult, StagePart
from redheart.stage.errors import ErrorKind, ErrorReason, StageError
from redheart.stage.mailbox import Mailbox
from redheart.stage.optimizer import build_optimizer
from redheart.stage.replicas import ReplicaGroup, ReplicaSettings
from redheart.stage.rounds import Rounds
from redheart.stage.state_io import StateIO, load_init_weights

# The name the stage's log lines have always carried (before the stage code became a package).
log = logging.getLogger("redheart.stage_runtime")

CONTROL_WAIT_SECONDS = 2.0
"""How long StartRun / SaveState / LoadState / ApplyStep wait for another short control call to
finish before answering FAILED_PRECONDITION (while a round runs they answer at once)."""


class StageRuntime(Rounds, StateIO):
    """One stage's state machine: start a run, run rounds, apply, abort, save, load."""

    def __init__(self, part_factory: Callable[[], StagePart], shape: ModelShape) -> None:
        self._part_factory = part_factory
        self.shape = shape
        self.part: StagePart = part_factory()
        self.mailbox = Mailbox()
        self.lock = threading.RLock()  # one control operation at a time
        self.run_id = ""
        self.train = TrainConfig()
        self.settings: dict[str, Any] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.next_step = 0
        self.rounds_done = 0  # accumulation rounds completed for next_step
        self.current_plan: RoundPlan | None = None
        self.results: dict[tuple[str, int, int], RoundResult] = {}
        self.applied: dict[tuple[str, int], dict[str, Any]] = {}
        # (run, step) -> highest aborted attempt: an abort that overtakes its RunStep still wins.
        self.aborted_attempts: dict[tuple[str, int], tuple[int, str]] = {}
        self.seen_attempts: dict[tuple[str, int], int] = {}  # highest attempt a RunStep of the step carried
        self.running = threading.Event()
        self.mixed_precision = False
        self.max_early_pushes = 64  # tensors kept for a step or pass whose RunStep has not arrived ([wire])
        self.precision: Precision = choose_precision(False, "auto", False, "cpu")
        self._apply_peak = (
            0  # CUDA peak of the last ApplyStep (AdamW state), folded into the next step's peak
        )
        self.replicas: ReplicaGroup | None = None  # parallel.data_parallel > 1: this stage's copies

    # ---- description

    @property
    def name(self) -> str:
        return self.part.name

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.part.module.parameters())

    def model_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.shape)

    def fingerprint(self) -> str:
        return fingerprint(self.model_settings())

    def autocast(self):
        return autocast(self.precision, self.part.device.type)

    def held_weight_casts(self):
        """Around a round: one 16-bit copy of the weights per round, not per micro-batch."""
        return held_weight_casts(self.precision, self.part.device.type, self.part.module)

    def wire_dtype(self) -> torch.dtype | None:
        """The dtype activations and gradients leave this stage in: the compute dtype under mixed
        precision (half the bytes of fp32), None (as computed) otherwise, so fp32 runs stay exact."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.train_precision())

    def train_precision(self) -> str:
        """What this stage computes in for the current run: fp32, tf32, bf16 or fp16 (redheart/precision.py)."""
        return self.precision.name

    # ---- lifecycle

    @contextlib.contextmanager
    def _control(self, what: str):
        """The lock for a control call that cannot run during a round: FAILED_PRECONDITION at
        once while one runs (instead of blocking a server thread behind it for the whole round)."""
        if self.running.is_set():
            raise StageError(
                ErrorKind.PRECONDITION,
                f"{what}: a step is running on this stage (abort it first)",
                reason=ErrorReason.ROUND_RUNNING,
            )
        if not self.lock.acquire(timeout=CONTROL_WAIT_SECONDS):
            raise StageError(
                ErrorKind.PRECONDITION,
                f"{what}: the stage is busy with another call (a step is starting or "
                f"running); retry or abort it",
            )
        try:
            yield
        finally:
            self.lock.release()

    def start_run(
        self,
        run_id: str,
        settings: Mapping[str, Any],
        *,
        reinitialize: bool,
        first_step: int,
        regret_address: str,
    ) -> int:
        with self._control(f"cannot start run {short(run_id)}"):
            check_settings(settings)  # before anything changes: a refused StartRun leaves the stage as it was
            replicas = ReplicaSettings.parse(settings.get("data_parallel"))
            if not 0 <= first_step <= MAX_STEP:
                raise StageError(
                    ErrorKind.INVALID,
                    f"cannot start run {run_id!r} at step {first_step}: steps go from 0 to {MAX_STEP}",
                )
            train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
            train = TrainConfig(
                **{k: v for k, v in dict(settings.get("train", {})).items() if k in train_fields}
            )
            device = self.part.device
            try:
                precision = choose_precision(
                    bool(train.use_mixed_precision),
                    train.mixed_precision_dtype,
                    bool(train.allow_tf32),
                    device.type,
                    device_capability(device),
                )
            except PrecisionError as exc:
                raise StageError(
                    ErrorKind.PRECONDITION, f"cannot start run {run_id!r} on {device}: {exc}"
                ) from None
            if reinitialize or self.optimizer is None:
                part = self._part_factory()
                if settings.get("init_from"):
                    load_init_weights(
                        part, settings["init_from"]
                    )  # before self.part: a refusal changes nothing
                self.part = part
            self.train = train
            self.settings = dict(settings)
            self.mixed_precision = bool(train.use_mixed_precision)
            self.precision = precision
            apply_tf32(precision, self.part.device)
            self.optimizer = (
                build_optimizer(self.part.module, train)
                if reinitialize or self.optimizer is None or self.run_id != run_id
                else self.optimizer
            )
            self.run_id = run_id
            self._restart_at(first_step)
            self.close_replicas()
            self.replicas = ReplicaGroup(replicas, self.part.device) if replicas is not None else None
            self.part.module.train()
            if hasattr(self.part, "configure"):
                self.part.configure(settings, regret_address)
            log.info(
                "%s stage: run %s starts at step %d (%d parameters, precision %s: %s)",
                self.name,
                run_id,
                first_step,
                self.num_parameters(),
                precision.name,
                precision.reason,
            )
            if precision.warning:
                log.warning("%s stage: %s", self.name, precision.warning)
            return self.num_parameters()

    def close_replicas(self) -> None:
        """Leave the replica group of the last StartRun (a new one, or the process's end)."""
        if self.replicas is not None:
            self.replicas.close()
            self.replicas = None

    def _restart_at(self, step: int) -> None:
        """The stage's state for a run (re)started at ``step``, by StartRun or LoadState: nothing of
        the step done, no cached answers, no tensors held."""
        self.next_step = step
        self.rounds_done = 0
        self.results.clear()
        self.applied.clear()
        self.mailbox.reset()
        # Abort marks belong to the run (or attempt) they were given for: a new start forgets them.
        self.aborted_attempts.clear()
        self.seen_attempts.clear()
        self.current_plan = None

    def _check_run(self, run_id: str) -> None:
        if not self.run_id:
            raise StageError(
                ErrorKind.PRECONDITION,
                "no run started on this stage (the orchestrator must call StartRun first)",
                reason=ErrorReason.NO_RUN,
            )
        if run_id != self.run_id:
            raise StageError(
                ErrorKind.PRECONDITION,
                f"run {short(run_id)} is not the current run {short(self.run_id)} of this stage",
                reason=ErrorReason.OTHER_RUN,
            )

    def check_push(self, run_id: str, step: int, micro_batch: int, kind: str) -> None:
        """Refuse tensors this stage cannot use, naming step and micro-batch."""
        self._check_run(run_id)
        expected = self.part.receives
        if kind not in expected:
            raise StageError(
                ErrorKind.INVALID,
                f"the {self.name} stage does not accept {kind} tensors (it receives {', '.join(sorted(expected))})",
            )
        if micro_batch < 0:
            raise StageError(ErrorKind.INVALID, f"micro-batch {micro_batch} is negative")
        plan = self.current_plan
        if kind == EVAL_ACTIVATION:
            # Only for the evaluation pass running now (its micro-batches), or a few ahead of its
            # RunStep: each is freed when its pass ends, so pushes for passes that never run cannot
            # grow the stage's memory.
            if plan is not None and plan.forward_only and plan.step == step and self.running.is_set():
                if micro_batch not in {mb.index for mb in plan.micro_batches}:
                    raise StageError(
                        ErrorKind.PRECONDITION, f"evaluation pass {step} has no micro-batch {micro_batch}"
                    )
                return
            self._check_early(step, micro_batch, kind, "evaluation pass")
            return
        if step < self.next_step:
            raise StageError(
                ErrorKind.PRECONDITION,
                f"step {step} micro-batch {micro_batch}: step {step} is already applied on this stage (next step is {self.next_step})",
            )
        if step > self.next_step:
            raise StageError(
                ErrorKind.PRECONDITION,
                f"step {step} micro-batch {micro_batch}: this stage is at step {self.next_step}; step {step} is unknown",
            )
        if plan is None or plan.forward_only or plan.step != step:
            self._check_early(step, micro_batch, kind, "step")
            return
        # A replica's plan holds every R-th micro-batch under its global index.
        if micro_batch not in {mb.index for mb in plan.micro_batches}:
            raise StageError(
                ErrorKind.PRECONDITION,
                f"step {step} micro-batch {micro_batch}: unknown micro-batch (this stage's plan has "
                f"{len(plan.micro_batches)}: {', '.join(str(mb.index) for mb in plan.micro_batches[:8])}"
                f"{', ...' if len(plan.micro_batches) > 8 else ''})",
            )

    def _check_early(self, step: int, micro_batch: int, kind: str, what: str) -> None:
        """A tensor for a step or pass whose RunStep has not arrived here yet: kept, up to a bound."""
        held = self.mailbox.count(self.run_id, step, (kind,))
        if held >= self.max_early_pushes:
            raise StageError(
                ErrorKind.EXHAUSTED,
                f"{what} {step} micro-batch {micro_batch}: {held} {kind} tensors already wait "
                f"for a RunStep of it (wire.max_early_pushes); retry once it started",
            )

    def apply(
        self,
        run_id: str,
        step: int,
        clip_coefficient: float,
        learning_rate: float,
        skip: bool,
        loss_scale: float = 1.0,
    ) -> dict[str, Any]:
        with self._control(f"ApplyStep for step {step}"):
            self._check_run(run_id)
            if (run_id, step) in self.applied:
                return self.applied[(run_id, step)]  # retried ApplyStep: already done
            if step != self.next_step:
                raise StageError(
                    ErrorKind.PRECONDITION,
                    f"ApplyStep for step {step}, but this stage is at step {self.next_step}",
                )
            plan = self.current_plan
            needed = plan.accumulation_steps if plan is not None and plan.step == step else None
            if needed is None or self.rounds_done != needed:
                raise StageError(
                    ErrorKind.PRECONDITION,
                    f"ApplyStep for step {step}: {self.rounds_done} of {needed or '?'} accumulation round(s) ran on this stage",
                )
            if not (math.isfinite(clip_coefficient) and clip_coefficient >= 0):
                raise StageError(
                    ErrorKind.INVALID,
                    f"ApplyStep for step {step}: clip coefficient {clip_coefficient} is not a finite number >= 0",
                )
            if not (math.isfinite(learning_rate) and 0 <= learning_rate <= MAX_LEARNING_RATE):
                raise StageError(
                    ErrorKind.INVALID,
                    f"ApplyStep for step {step}: learning rate {learning_rate} is not a number in [0, {MAX_LEARNING_RATE:g}]",
                )
            if not skip and not (loss_scale > 0 and math.isfinite(clip_coefficient / loss_scale)):
                raise StageError(
                    ErrorKind.INVALID,
                    f"ApplyStep for step {step}: clip coefficient {clip_coefficient} / loss scale {loss_scale} is not finite",
                )
            start, started_unix = time.perf_counter(), time.time()
            assert self.optimizer is not None
            if not skip:
                factor = clip_coefficient / loss_scale
                if factor != 1.0:
                    with torch.no_grad():
                        for p in self.part.module.parameters():
                            if p.grad is not None:
                                p.grad.mul_(factor)
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.part.device.type == "cuda":
                # AdamW allocates its state here, after the step's last RunStep reported its peak.
                self._apply_peak = torch.cuda.max_memory_allocated(self.part.device)
                torch.cuda.reset_peak_memory_stats(self.part.device)
            self.next_step = step + 1
            self.rounds_done = 0
            self.results = {k: v for k, v in self.results.items() if k[1] > step}
            self.mailbox.clear_step(run_id, step)
            self.current_plan = None
            out = {
                "next_step": self.next_step,
                "seconds": time.perf_counter() - start,
                "applied": not skip,
                "started_unix": started_unix,
            }
            self.applied = {k: v for k, v in self.applied.items() if k[1] > step - 4}
            self.applied[(run_id, step)] = out
            if self.part.device.type == "cuda" and self.settings.get("empty_cache_every", 0):
                if self.next_step % int(self.settings["empty_cache_every"]) == 0:
                    torch.cuda.empty_cache()
            return out

    def abort(self, run_id: str, step: int, reason: str, attempt: int = 0) -> None:
        """Wake anything waiting on the peer for this step; the step's partial state is discarded.

        With an attempt number, RunSteps of that attempt (or earlier) are refused even when they
        arrive after the abort: the orchestrator's abort can overtake its own RunStep.

        Marks are kept only for what this stage knows: the current run, its current step (or the
        evaluation pass running now), and an attempt at most one past the highest it has seen for
        that step. An abort for a step not reached yet, or with a huge attempt, would otherwise
        refuse that step when the run gets there. Never waits behind a round."""
        if run_id != self.run_id or not run_id:
            return
        plan = self.current_plan
        running_pass = self.running.is_set() and plan is not None and plan.step == step
        if step != self.next_step and not running_pass:
            log.info(
                "%s stage: AbortStep for step %d ignored (the stage is at step %d)",
                self.name,
                step,
                self.next_step,
            )
            return
        key = (run_id, step)
        if attempt > 0 and step == self.next_step:
            known = self.seen_attempts.get(key, 0)
            if attempt > known + 1:
                log.info(
                    "%s stage: AbortStep attempt %d of step %d is beyond the attempts seen (%d): not kept",
                    self.name,
                    attempt,
                    step,
                    known,
                )
            elif attempt > self.aborted_attempts.get(key, (0, ""))[0]:
                self.aborted_attempts[key] = (attempt, reason)
            while len(self.aborted_attempts) > Mailbox.MAX_ABORTED:
                del self.aborted_attempts[next(iter(self.aborted_attempts))]
        self.mailbox.abort(run_id, step, reason)
        if self.running.is_set():
            return  # the round ends itself (StepAborted) and discards its state
        # Idle: discard what completed rounds left, if no other call holds the stage right now
        # (never wait for it: the next RunStep of the step starts over from round 0 anyway).
        if self.lock.acquire(blocking=False):
            try:
                if run_id == self.run_id and step == self.next_step and not self.running.is_set():
                    self._discard_step_state(step)
                    self.mailbox.clear_step(run_id, step)
            finally:
                self.lock.release()
