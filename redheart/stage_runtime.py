"""Torch-only logic of a pipeline stage: the part of the model it holds, its optimizer, and the
execution of its ordered schedule actions. No gRPC here: tensors arrive through a
:class:`Mailbox` and leave through a :class:`PeerLink` that the service layer provides.

The same class runs the CPU stage (first) and the GPU stage (last); what differs is the
:class:`StagePart` (cpu_stage/logic.py, gpu_stage/logic.py) that knows how to run a forward and a
backward of its modules.

Invariants kept here (design.md section 3):

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
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from redheart.config import TrainConfig, fingerprint
from redheart.model import ModelShape, derive_seed
from redheart.precision import Precision, PrecisionError, apply_tf32, choose_precision, device_capability
from redheart.schedule import build_schedule

log = logging.getLogger(__name__)

ACTIVATION, GRADIENT, EVAL_ACTIVATION = "activation", "gradient", "eval_activation"


MAX_STEP = 1 << 62
"""Steps are int64 on the wire: a run starting near 2**63 would apply a step and then fail to report
the next one (and every Describe after it)."""

CONTROL_WAIT_SECONDS = 2.0
"""How long StartRun / SaveState / LoadState / ApplyStep wait for another short control call to
finish before answering FAILED_PRECONDITION (while a round runs they answer at once)."""

MAX_LEARNING_RATE = 1e30
"""Above this AdamW's step size (lr / bias correction) no longer fits in float32 and the update fails
half-way through the parameters; no real schedule comes near it."""


class StageError(Exception):
    """A request this stage cannot serve. `kind` maps to a gRPC status in the servicer."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "precondition" | "invalid" | "deadline" | "aborted" | "unavailable" | "internal"


class StepAborted(StageError):
    def __init__(self, message: str) -> None:
        super().__init__("aborted", message)


# ----------------------------------------------------------------------------- messaging


class Mailbox:
    """Tensors pushed by the peer, keyed by (run, step, micro-batch, kind); waiters block on a condition.

    Each tensor carries the attempt of the step it was sent for (0: not given). Once a RunStep of
    attempt N started here (:meth:`set_floor`), tensors of attempts below N are stale: dropped on
    arrival and when the floor rises, counted in ``stale_dropped`` (and ``on_stale``), so a
    tensor of an aborted try can never satisfy, or be mistaken for a duplicate of, the next one's."""

    MAX_FLOORS = 64

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[tuple[str, int, int, str], tuple[int, torch.Tensor]] = {}
        self._consumed: dict[tuple[str, int, int, str], int] = {}  # key -> attempt it was taken for
        self._aborted: dict[tuple[str, int], str] = {}
        self._arrived: dict[tuple[str, int], float] = {}  # (run, step) -> when its last tensor arrived
        self._floor: dict[tuple[str, int], int] = {}  # (run, step) -> oldest attempt still accepted
        self.stale_dropped = 0
        self.on_stale: Callable[[int], None] | None = None

    def _stale(self, n: int) -> None:
        self.stale_dropped += n
        if self.on_stale is not None and n:
            self.on_stale(n)

    def put(self, key: tuple[str, int, int, str], tensor: torch.Tensor, attempt: int = 0) -> str:
        """Store; returns "fresh", "duplicate" (already delivered: drop it) or "stale" (dropped)."""
        with self._cond:
            if attempt != 0 and attempt < self._floor.get((key[0], key[1]), 0):
                self._stale(1)
                return "stale"
            held = self._items.get(key)
            if (held is not None and held[0] >= attempt) or self._consumed.get(key, -1) >= attempt:
                return "duplicate"
            self._items[key] = (attempt, tensor)
            self._arrived[(key[0], key[1])] = time.monotonic()
            self._cond.notify_all()
            return "fresh"

    def set_floor(self, run_id: str, step: int, attempt: int) -> None:
        """A RunStep of ``attempt`` started: tensors of older attempts of the step are stale."""
        with self._cond:
            if attempt <= self._floor.get((run_id, step), 0):
                return
            self._floor[(run_id, step)] = attempt
            while len(self._floor) > self.MAX_FLOORS:
                del self._floor[next(iter(self._floor))]
            old = [
                k for k, (a, _t) in self._items.items() if k[0] == run_id and k[1] == step and 0 < a < attempt
            ]
            for key in old:
                del self._items[key]
            self._consumed = {
                k: a
                for k, a in self._consumed.items()
                if not (k[0] == run_id and k[1] == step and a < attempt)
            }
            self._stale(len(old))

    def count(self, run_id: str, step: int, kinds: Sequence[str]) -> int:
        """Tensors of (run, step) of these kinds held and not yet taken."""
        with self._cond:
            return sum(1 for k in self._items if k[0] == run_id and k[1] == step and k[3] in kinds)

    def drop(self, keep) -> None:
        """Forget the held tensors whose key ``keep(key)`` refuses (older steps, other passes)."""
        with self._cond:
            for key in [k for k in self._items if not keep(k)]:
                del self._items[key]

    def get(
        self, key: tuple[str, int, int, str], timeout: float, describe: str, attempt: int = 0
    ) -> torch.Tensor:
        """Wait for ``key`` (of ``attempt``; a tensor of a newer attempt is left for it). The
        deadline measures progress: it fails when nothing of this step arrived for ``timeout``
        seconds, so a long round whose tensors keep coming never does."""
        started = time.monotonic()
        with self._cond:
            while True:
                held = self._items.get(key)
                if held is not None and (attempt == 0 or held[0] in (0, attempt)):
                    break
                reason = self._aborted.get((key[0], key[1]))
                if reason is not None:
                    raise StepAborted(f"step {key[1]} was aborted while waiting for {describe}: {reason}")
                since = max(started, self._arrived.get((key[0], key[1]), 0.0))
                remaining = since + timeout - time.monotonic()
                if remaining <= 0:
                    raise StageError(
                        "deadline",
                        f"nothing arrived for {timeout:.1f}s while waiting for {describe} "
                        f"(step {key[1]}, micro-batch {key[2]}); is the peer stage alive?",
                    )
                self._cond.wait(min(remaining, 1.0))
            self._consumed[key] = held[0]
            del self._items[key]
            return held[1]

    MAX_ABORTED = 256
    """Abort marks kept (a step's mark is dropped when the step is cleared); the oldest go first,
    so AbortStep calls for steps that never run cannot grow the stage's memory without bound."""

    def abort(self, run_id: str, step: int, reason: str) -> None:
        with self._cond:
            self._aborted.pop((run_id, step), None)
            self._aborted[(run_id, step)] = reason
            while len(self._aborted) > self.MAX_ABORTED:
                del self._aborted[next(iter(self._aborted))]
            for key in [k for k in self._items if k[0] == run_id and k[1] == step]:
                del self._items[key]
            self._cond.notify_all()

    def aborted(self, run_id: str, step: int) -> str | None:
        with self._cond:
            return self._aborted.get((run_id, step))

    def clear_step(self, run_id: str, step: int, kinds: Sequence[str] | None = None) -> None:
        """Forget everything of a finished step (keeps memory bounded over a long run). Its attempt
        floor stays: tensors of an aborted try may still arrive."""
        with self._cond:
            for key in [
                k for k in self._items if k[0] == run_id and k[1] == step and (kinds is None or k[3] in kinds)
            ]:
                del self._items[key]
            self._consumed = {
                k: a
                for k, a in self._consumed.items()
                if not (k[0] == run_id and k[1] == step and (kinds is None or k[3] in kinds))
            }
            self._aborted.pop((run_id, step), None)
            self._arrived.pop((run_id, step), None)

    def reset(self) -> None:
        with self._cond:
            self._items.clear()
            self._consumed.clear()
            self._aborted.clear()
            self._arrived.clear()
            self._floor.clear()
            self._cond.notify_all()


class PeerLink(Protocol):
    """Sends tensors to the neighbouring stages. Implemented over gRPC in redheart/stage_service.py."""

    def send(
        self, direction: str, run_id: str, step: int, micro_batch: int, kind: str, tensor: torch.Tensor
    ) -> None:
        """Queue a tensor for the next ("next") or previous ("prev") stage; returns at once."""

    def flush(self, timeout: float) -> None:
        """Block until every queued tensor was delivered; raise the first delivery error."""

    def stats(self) -> dict[str, float]:
        """Cumulative serialize_seconds, send_seconds, bytes_sent."""


class AttemptLink:
    """The link as a round's stage part sees it: every send carries the round's attempt, and a
    deadline of the round's (a push never outlives its try)."""

    def __init__(self, link: PeerLink, plan: RoundPlan) -> None:
        self._link = link
        self._plan = plan

    def send(
        self, direction: str, run_id: str, step: int, micro_batch: int, kind: str, tensor: torch.Tensor
    ) -> None:
        if getattr(self._link, "carries_attempts", False):
            self._link.send(
                direction,
                run_id,
                step,
                micro_batch,
                kind,
                tensor,
                deadline=time.monotonic() + self._plan.deadline_seconds,
                attempt=self._plan.attempt,
            )
        else:
            self._link.send(direction, run_id, step, micro_batch, kind, tensor)

    def flush(self, timeout: float) -> None:
        self._link.flush(timeout)

    def stats(self) -> dict[str, float]:
        return self._link.stats()


# ----------------------------------------------------------------------------- stage parts


@dataclass
class MicroBatchInputs:
    index: int
    tensors: dict[str, torch.Tensor]
    sample_ids: list[str] = field(default_factory=list)


@dataclass
class ForwardRecord:
    """What a forward leaves for its backward."""

    output: torch.Tensor | None = None  # first stage: its output activation (graph attached)
    input_leaf: torch.Tensor | None = None  # later stages: the received activation (requires grad)
    head_outputs: dict[str, torch.Tensor] | None = None
    pending: Any = None  # last stage: the regret request in flight
    inputs: MicroBatchInputs | None = None
    pending_since: float = 0.0  # perf_counter when the regret request was sent (for the trace)


class StagePart(Protocol):
    """The model-specific half of a stage (cpu_stage/logic.py, gpu_stage/logic.py)."""

    name: str
    rank: int
    num_stages: int
    device: torch.device
    module: torch.nn.Module

    def forward(self, ctx: RoundContext, mb: MicroBatchInputs) -> ForwardRecord: ...

    def backward(self, ctx: RoundContext, mb: MicroBatchInputs, record: ForwardRecord) -> dict[str, Any]: ...

    def evaluate(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict[str, Any]: ...


@dataclass
class RoundPlan:
    run_id: str
    step: int
    accumulation_round: int
    accumulation_steps: int
    schedule: str
    micro_batches: list[MicroBatchInputs]
    loss_multiplier: float
    loss_scale: float = 1.0
    deadline_seconds: float = 600.0
    forward_only: bool = False
    lookahead: int = 0
    attempt: int = 0


def _check_settings(settings: Mapping[str, Any]) -> None:
    """The parts of the StartRun settings a step uses later: refused now (INVALID_ARGUMENT) rather
    than failing inside every RunStep as an INTERNAL error."""
    for section in ("train", "regret"):
        value = settings.get(section, {})
        if not isinstance(value, Mapping):
            raise StageError(
                "invalid", f"StartRun settings: {section!r} must be a JSON object, got {type(value).__name__}"
            )
    weights = settings.get("train", {}).get("loss_weights", {})
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and _is_real(v) for k, v in weights.items()
    ):
        raise StageError(
            "invalid",
            f"StartRun settings: train.loss_weights must map head names to finite numbers, got {weights!r:.200}",
        )
    every = settings.get("empty_cache_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise StageError(
            "invalid", f"StartRun settings: empty_cache_every = {every!r:.50} must be an integer >= 0"
        )
    regret = settings.get("regret", {})
    if regret.get("enabled", True):
        from redheart.calculus import check_counts

        try:
            check_counts(regret.get("regrets_per_step", 7), regret.get("bentham_per_regret", 3))
        except ValueError as exc:
            raise StageError("invalid", f"StartRun settings: regret: {exc}") from None
        timeout = regret.get("timeout_seconds", 30.0)
        if not (_is_real(timeout) and timeout > 0):
            raise StageError(
                "invalid", f"StartRun settings: regret.timeout_seconds = {timeout!r:.50} must be a number > 0"
            )


def _check_plan_numbers(plan: RoundPlan) -> None:
    """Refuse non-finite numbers: an infinite deadline would wait on the peer forever (holding the
    stage's lock), an infinite loss multiplier or scale would turn every gradient into inf/NaN."""
    for name in ("deadline_seconds", "loss_multiplier", "loss_scale"):
        value = getattr(plan, name)
        if not (math.isfinite(value) and value > 0):
            raise StageError("invalid", f"step {plan.step}: {name} = {value} must be a finite number > 0")


@dataclass
class RoundContext:
    """Handed to the stage part for each action: where to send, how to wait, what to count."""

    plan: RoundPlan
    runtime: StageRuntime
    link: PeerLink
    started: float
    timings: dict[str, float] = field(
        default_factory=lambda: {"forward": 0.0, "backward": 0.0, "wait": 0.0, "regret_wait": 0.0}
    )
    spans: list[tuple[str, int, float, float]] = field(default_factory=list)
    # Spans of other threads (sender, regret client) as (action, micro-batch, start, end, thread),
    # relative to `started` like `spans`; only the pipeline trace reads them.
    thread_spans: list[tuple[str, int, float, float, str]] = field(default_factory=list)

    def receive(self, kind: str, micro_batch: int, describe: str) -> torch.Tensor:
        start = time.perf_counter()
        try:
            key = (self.plan.run_id, self.plan.step, micro_batch, kind)
            return self.runtime.mailbox.get(key, self.plan.deadline_seconds, describe, self.plan.attempt)
        finally:
            end = time.perf_counter()
            self.timings["wait"] += end - start
            if end - start > 1e-4:
                self.spans.append(("wait", micro_batch, start - self.started, end - self.started))

    def autocast(self):
        return self.runtime.autocast()


@dataclass
class RoundResult:
    run_id: str
    step: int
    accumulation_round: int
    micro_batches: list[dict[str, Any]]
    timings: dict[str, float]
    spans: list[tuple[str, int, float, float]]
    grad_norm_sq: float | None = None
    found_inf: bool = False
    peak_memory_bytes: int = 0
    started_unix: float = 0.0  # wall clock at the round's start: puts the spans on the trace's clock
    thread_spans: list[tuple[str, int, float, float, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- runtime


def build_optimizer(module: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases, norms and embeddings' rows are vectors: no decay)."""
    decay, no_decay = [], []
    for _name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused=True: one kernel over all parameters of a group instead of a dozen ops per tensor (on
    # 2 cores, 0.09 s against 0.65 s for the 196M base model). Its arithmetic is the same for every
    # process that builds the same groups, so the pipeline still equals the single-process
    # reference, which builds its optimizers here too.
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"]
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=fused,
        foreach=False if not fused else None,
    )


class StageRuntime:
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
        dtype = self.precision.autocast_dtype
        if dtype is None:
            return torch.autocast(device_type=self.part.device.type, enabled=False)
        return torch.autocast(device_type=self.part.device.type, dtype=dtype)

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
            raise StageError("precondition", f"{what}: a step is running on this stage (abort it first)")
        if not self.lock.acquire(timeout=CONTROL_WAIT_SECONDS):
            raise StageError(
                "precondition",
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
        with self._control(f"cannot start run {_short(run_id)}"):
            _check_settings(
                settings
            )  # before anything changes: a refused StartRun leaves the stage as it was
            if not 0 <= first_step <= MAX_STEP:
                raise StageError(
                    "invalid",
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
                raise StageError("precondition", f"cannot start run {run_id!r} on {device}: {exc}") from None
            if reinitialize or self.optimizer is None:
                part = self._part_factory()
                if settings.get("init_from"):
                    _load_init_weights(
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
            self.next_step = first_step
            self.rounds_done = 0
            self.results.clear()
            self.applied.clear()
            self.mailbox.reset()
            # Abort marks belong to the run (or attempt) they were given for: a new start forgets them.
            self.aborted_attempts.clear()
            self.seen_attempts.clear()
            self.current_plan = None
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
            return self.num_parameters()

    def _check_run(self, run_id: str) -> None:
        if not self.run_id:
            raise StageError(
                "precondition", "no run started on this stage (the orchestrator must call StartRun first)"
            )
        if run_id != self.run_id:
            raise StageError(
                "precondition",
                f"run {_short(run_id)} is not the current run {_short(self.run_id)} of this stage",
            )

    def check_push(self, run_id: str, step: int, micro_batch: int, kind: str) -> None:
        """Refuse tensors this stage cannot use, naming step and micro-batch."""
        self._check_run(run_id)
        expected = self.part.receives
        if kind not in expected:
            raise StageError(
                "invalid",
                f"the {self.name} stage does not accept {kind} tensors (it receives {', '.join(sorted(expected))})",
            )
        if micro_batch < 0:
            raise StageError("invalid", f"micro-batch {micro_batch} is negative")
        plan = self.current_plan
        if kind == EVAL_ACTIVATION:
            # Only for the evaluation pass running now (its micro-batches), or a few ahead of its
            # RunStep: each is freed when its pass ends, so pushes for passes that never run cannot
            # grow the stage's memory.
            if plan is not None and plan.forward_only and plan.step == step and self.running.is_set():
                if micro_batch not in {mb.index for mb in plan.micro_batches}:
                    raise StageError(
                        "precondition", f"evaluation pass {step} has no micro-batch {micro_batch}"
                    )
                return
            self._check_early(step, micro_batch, kind, "evaluation pass")
            return
        if step < self.next_step:
            raise StageError(
                "precondition",
                f"step {step} micro-batch {micro_batch}: step {step} is already applied on this stage (next step is {self.next_step})",
            )
        if step > self.next_step:
            raise StageError(
                "precondition",
                f"step {step} micro-batch {micro_batch}: this stage is at step {self.next_step}; step {step} is unknown",
            )
        if plan is None or plan.forward_only or plan.step != step:
            self._check_early(step, micro_batch, kind, "step")
            return
        limit = plan.accumulation_steps * len(plan.micro_batches)
        if micro_batch >= limit:
            raise StageError(
                "precondition",
                f"step {step} micro-batch {micro_batch}: unknown micro-batch (the step has {limit})",
            )

    def _check_early(self, step: int, micro_batch: int, kind: str, what: str) -> None:
        """A tensor for a step or pass whose RunStep has not arrived here yet: kept, up to a bound."""
        held = self.mailbox.count(self.run_id, step, (kind,))
        if held >= self.max_early_pushes:
            raise StageError(
                "exhausted",
                f"{what} {step} micro-batch {micro_batch}: {held} {kind} tensors already wait "
                f"for a RunStep of it (wire.max_early_pushes); retry once it started",
            )

    def run_round(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        """Run this stage's actions for one accumulation round (or an evaluation pass)."""
        _check_plan_numbers(plan)
        # A retried RunStep waits for the round it repeats (then gets its cached result), bounded.
        if not self.lock.acquire(timeout=plan.deadline_seconds):
            raise StageError(
                "precondition",
                f"RunStep for step {plan.step}: another call held the stage for {plan.deadline_seconds:.0f}s",
            )
        try:
            return self._run_round_locked(plan, link)
        finally:
            self.lock.release()

    def _run_round_locked(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        self._check_run(plan.run_id)
        if plan.forward_only:
            if hasattr(link, "reset_error"):
                link.reset_error()
            return self._run_eval(plan, link)
        key = (plan.run_id, plan.step, plan.accumulation_round)
        if key in self.results:
            return self.results[key]  # a retried RunStep: same answer, no recompute
        if plan.step != self.next_step:
            raise StageError(
                "precondition",
                f"RunStep for step {plan.step} round {plan.accumulation_round}, but this stage expects step {self.next_step}",
            )
        if plan.accumulation_round != self.rounds_done:
            raise StageError(
                "precondition",
                f"RunStep for step {plan.step} accumulation round {plan.accumulation_round}, but {self.rounds_done} round(s) of it are done",
            )
        mark = self.aborted_attempts.get((plan.run_id, plan.step))
        if plan.attempt > 0 and mark is not None and plan.attempt <= mark[0]:
            raise StepAborted(f"step {plan.step} attempt {plan.attempt} was aborted: {mark[1]}")
        if not plan.micro_batches:
            raise StageError("invalid", f"step {plan.step}: the plan has no micro-batches")
        step_key = (plan.run_id, plan.step)
        self.seen_attempts[step_key] = max(plan.attempt, self.seen_attempts.get(step_key, 0))
        self.mailbox.set_floor(plan.run_id, plan.step, self.seen_attempts[step_key])
        # Only now, holding the lock: a retried RunStep must not clear the delivery error of
        # the round it waited behind.
        if hasattr(link, "reset_error"):
            link.reset_error()
        self.current_plan = plan
        self.running.set()
        try:
            result = self._run_train_round(plan, link)
        except BaseException:
            self._discard_step_state(plan.step)
            if hasattr(link, "supersede"):  # what this try still had queued must not reach the next one
                link.supersede(plan.run_id, plan.step)
            raise
        finally:
            self.running.clear()
        self.results[key] = result
        self.rounds_done += 1
        return result

    def _discard_step_state(self, step: int) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.rounds_done = 0
        self.results = {k: v for k, v in self.results.items() if k[1] != step}
        self.mailbox.clear_step(self.run_id, step)
        if hasattr(self.part, "discard"):
            self.part.discard()

    def _run_train_round(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        assert self.optimizer is not None
        if plan.accumulation_round == 0:
            self.optimizer.zero_grad(set_to_none=True)
        m = len(plan.micro_batches)
        order = build_schedule(plan.schedule, self.part.num_stages, m, extra_warmup=plan.lookahead)[
            self.part.rank
        ]
        started, started_unix = time.perf_counter(), time.time()
        ctx = RoundContext(plan=plan, runtime=self, link=AttemptLink(link, plan), started=started)
        records: dict[int, ForwardRecord] = {}
        per_mb: dict[int, dict[str, Any]] = {}
        if self.part.device.type == "cuda" and plan.accumulation_round == 0:
            # The step's peak starts here; the previous ApplyStep's peak is kept in _apply_peak.
            torch.cuda.reset_peak_memory_stats(self.part.device)
        for action in order:
            mb = plan.micro_batches[action.micro_batch]
            t0 = time.perf_counter()
            if action.op == "F":
                # Dropout is seeded by (seed, step, micro-batch, stage): the single-process
                # reference seeds the same way, so both draw the same masks.
                torch.manual_seed(derive_seed(self.train.seed, plan.step, mb.index, self.part.rank))
                records[action.micro_batch] = self.part.forward(ctx, mb)
                t1 = time.perf_counter()
                ctx.timings["forward"] += t1 - t0
            else:
                record = records.pop(action.micro_batch)
                per_mb[action.micro_batch] = self.part.backward(ctx, mb, record)
                t1 = time.perf_counter()
                ctx.timings["backward"] += t1 - t0
            ctx.spans.append((action.op, mb.index, t0 - started, t1 - started))
        if hasattr(self.part, "finish_round"):
            # Device parts queue their sends and keep per-micro-batch results on the device:
            # drained and read back once per round instead of once per micro-batch.
            self.part.finish_round(ctx, per_mb)
        flush_start = time.perf_counter()
        link.flush(plan.deadline_seconds)
        ctx.timings["wait"] += time.perf_counter() - flush_start
        ctx.timings["total"] = time.perf_counter() - started
        result = RoundResult(
            run_id=plan.run_id,
            step=plan.step,
            accumulation_round=plan.accumulation_round,
            micro_batches=[dict(per_mb[i], index=plan.micro_batches[i].index) for i in range(m)],
            timings=ctx.timings,
            spans=ctx.spans,
            started_unix=started_unix,
            thread_spans=ctx.thread_spans + (link.take_spans(started) if hasattr(link, "take_spans") else []),
        )
        if plan.accumulation_round == plan.accumulation_steps - 1:
            norm_sq, found_inf = self._grad_norm_sq(plan.loss_scale)
            result.grad_norm_sq = norm_sq
            result.found_inf = found_inf
        if self.part.device.type == "cuda":
            result.peak_memory_bytes = max(
                torch.cuda.max_memory_allocated(self.part.device), self._apply_peak
            )
        return result

    @torch.no_grad()
    def _grad_norm_sq(self, loss_scale: float) -> tuple[float, bool]:
        # Per-tensor norms (as torch.nn.utils.clip_grad_norm_ computes them), summed in float64:
        # no full-size temporary copies of the gradients.
        norms = [
            torch.linalg.vector_norm(p.grad.detach())
            for p in self.part.module.parameters()
            if p.grad is not None
        ]
        total = float(torch.stack(norms).double().pow(2).sum()) if norms else 0.0
        # Divided twice: loss_scale ** 2 can underflow to 0 (a tiny scale); the quotient only overflows to inf.
        value = total / loss_scale / loss_scale
        return value, not math.isfinite(value)

    def _run_eval(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        started = time.perf_counter()
        ctx = RoundContext(plan=plan, runtime=self, link=AttemptLink(link, plan), started=started)
        # Leftovers of other passes (one that failed before it read them) are dropped now.
        self.mailbox.drop(lambda k: k[3] != EVAL_ACTIVATION or (k[0] == plan.run_id and k[1] == plan.step))
        previous = self.current_plan
        self.current_plan = plan
        self.running.set()
        self.part.module.eval()
        outputs = []
        try:
            with torch.no_grad():
                for mb in plan.micro_batches:
                    t0 = time.perf_counter()
                    outputs.append(dict(self.part.evaluate(ctx, mb), index=mb.index))
                    ctx.timings["forward"] += time.perf_counter() - t0
            link.flush(plan.deadline_seconds)
        finally:
            self.running.clear()
            self.current_plan = previous
            self.part.module.train()
            self.mailbox.clear_step(plan.run_id, plan.step, kinds=[EVAL_ACTIVATION])
        ctx.timings["total"] = time.perf_counter() - started
        return RoundResult(plan.run_id, plan.step, 0, outputs, ctx.timings, ctx.spans)

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
                    "precondition", f"ApplyStep for step {step}, but this stage is at step {self.next_step}"
                )
            plan = self.current_plan
            needed = plan.accumulation_steps if plan is not None and plan.step == step else None
            if needed is None or self.rounds_done != needed:
                raise StageError(
                    "precondition",
                    f"ApplyStep for step {step}: {self.rounds_done} of {needed or '?'} accumulation round(s) ran on this stage",
                )
            if not (math.isfinite(clip_coefficient) and clip_coefficient >= 0):
                raise StageError(
                    "invalid",
                    f"ApplyStep for step {step}: clip coefficient {clip_coefficient} is not a finite number >= 0",
                )
            if not (math.isfinite(learning_rate) and 0 <= learning_rate <= MAX_LEARNING_RATE):
                raise StageError(
                    "invalid",
                    f"ApplyStep for step {step}: learning rate {learning_rate} is not a number in [0, {MAX_LEARNING_RATE:g}]",
                )
            if not skip and not (loss_scale > 0 and math.isfinite(clip_coefficient / loss_scale)):
                raise StageError(
                    "invalid",
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

    # ---- parameters and checkpoints

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.part.module.global_named_parameters()]

    def save(self, run_id: str, step: int, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write this stage's shard: weights and optimizer tensors as safetensors, the rest as JSON."""
        with self._control(f"cannot save at step {step}"):
            self._check_run(run_id)
            if step != self.next_step:
                raise StageError(
                    "precondition",
                    f"SaveState for step {step}, but this stage has completed {self.next_step} steps",
                )
            start = time.perf_counter()
            try:
                return self._write_shard(run_id, step, Path(directory), start)
            except (OSError, ValueError, SafetensorError) as exc:
                # An unwritable, missing or malformed directory (or a full disk) is a problem of the
                # request or the machine, not a bug: FAILED_PRECONDITION naming the directory.
                raise StageError(
                    "precondition",
                    f"SaveState for step {step}: cannot write the shard to "
                    f"{_short(directory)}: {type(exc).__name__}: {exc}",
                ) from None

    def _write_shard(self, run_id: str, step: int, out: Path, start: float) -> dict[str, Any]:
        """The body of `save` (holding the lock); I/O errors propagate to `save`."""
        out.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().to("cpu").contiguous() for n, p in self.named_parameters()}
        weights_path = out / "weights.safetensors"
        _atomic_save_tensors(params, weights_path)
        opt_tensors, opt_meta = self._optimizer_state()
        _atomic_save_tensors(opt_tensors, out / "optimizer.safetensors")
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.part.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.part.device)
        _atomic_save_tensors(rng, out / "rng.safetensors")
        meta = {
            "stage": self.name,
            "run_id": run_id,
            "step": step,
            "model_fingerprint": self.fingerprint(),
            "model_settings": self.model_settings(),
            "optimizer": opt_meta,
            "files": {},
        }
        total = 0
        for f in ("weights.safetensors", "optimizer.safetensors", "rng.safetensors"):
            data = (out / f).read_bytes()
            total += len(data)
            meta["files"][f] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _atomic_write_text(out / "stage.json", json.dumps(meta, indent=2, sort_keys=True))
        return {
            "files": [
                str(out / f)
                for f in ("weights.safetensors", "optimizer.safetensors", "rng.safetensors", "stage.json")
            ],
            "bytes": total,
            "seconds": time.perf_counter() - start,
            "sha256": meta["files"]["weights.safetensors"]["sha256"],
        }

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.optimizer is not None
        names = {id(p): n for n, p in self.part.module.global_named_parameters()}
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if not state:
                    continue
                name = names[id(p)]
                for key, value in state.items():
                    if key == "step":
                        steps[name] = float(value)
                    elif torch.is_tensor(value):
                        tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        for g in groups:
            g["betas"] = list(g["betas"])
        return tensors, {"steps": steps, "param_groups": groups}

    def load(self, run_id: str, step: int, directory: str | os.PathLike[str], max_bytes: int) -> int:
        """Restore weights, optimizer and RNG from a shard written by `save` (no pickle anywhere).

        The shard is an untrusted file: everything is read and checked first (sizes capped, sha256,
        names, shapes, types), and only then is the stage changed, so a refused load leaves it as it
        was. Anything unreadable or malformed is a FAILED_PRECONDITION naming the directory."""
        with self._control("cannot load state"):
            try:
                src = Path(directory)
                shard = self._read_shard(src, step, max_bytes)
            except StageError:
                raise
            except (
                OSError,
                ValueError,
                TypeError,
                KeyError,
                IndexError,
                AttributeError,
                RuntimeError,
                SafetensorError,
            ) as exc:
                raise StageError(
                    "precondition",
                    f"checkpoint {_short(directory)} cannot be loaded: {type(exc).__name__}: {exc}",
                ) from None
            meta, weights, opt_state, groups, rng = shard
            params = dict(self.part.module.global_named_parameters())
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name].to(p.device, p.dtype))
            self.optimizer = build_optimizer(self.part.module, self.train)
            for name, state in opt_state.items():
                p = params[name]
                # The fused kernels read "step" on the parameter's device; the others want it on the CPU.
                fused = bool(self.optimizer.defaults.get("fused"))
                self.optimizer.state[p] = {
                    k: (v.to(p.device) if k != "step" or fused else v) for k, v in state.items()
                }
            for group, saved in zip(self.optimizer.param_groups, groups):
                group.update(saved)
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and self.part.device.type == "cuda":
                torch.cuda.set_rng_state(rng["torch_cuda"], self.part.device)
            self.run_id = run_id or meta.get("run_id") or self.run_id
            self.next_step = step
            self.rounds_done = 0
            self.results.clear()
            self.applied.clear()
            self.mailbox.reset()
            self.aborted_attempts.clear()
            self.seen_attempts.clear()
            self.current_plan = None
            return self.next_step

    def _read_shard(self, src: Path, step: int, max_bytes: int):
        """Read and check a shard without touching the stage; raises on anything malformed."""

        def bad(what: str) -> StageError:
            return StageError("precondition", f"checkpoint {_short(src)}: {what}")

        meta_path = src / "stage.json"
        if not meta_path.is_file():
            raise StageError("precondition", f"no stage shard at {_short(src)} (missing stage.json)")
        meta = json.loads(_read_capped(meta_path, 16 << 20))
        if not isinstance(meta, dict):
            raise bad("stage.json is not a JSON object")
        if meta.get("model_fingerprint") != self.fingerprint():
            from redheart.config import diff_settings

            theirs = meta.get("model_settings")
            diffs = (
                diff_settings(self.model_settings(), theirs)
                if isinstance(theirs, dict)
                else ["no model_settings"]
            )
            raise StageError(
                "precondition",
                f"checkpoint {_short(src)} was written by a different model: {'; '.join(diffs)}",
            )
        saved_step = meta.get("step")
        if type(saved_step) is not int or saved_step != step or not 0 <= step <= MAX_STEP:
            raise StageError(
                "precondition", f"checkpoint {_short(src)} holds step {saved_step!r}, not {step}"
            )
        if not isinstance(meta.get("run_id", ""), str):
            raise bad("run_id is not a string")
        files = meta.get("files")
        if not isinstance(files, dict) or set(files) != set(SHARD_FILES):
            raise bad(f"stage.json must list exactly the files {list(SHARD_FILES)}")
        for f in SHARD_FILES:
            info = files[f]
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
                raise bad(f"stage.json has no sha256 for {f}")
            path = src / f
            if not path.is_file():  # follows links; devices, FIFOs and directories are refused
                raise bad(f"{f} is missing or not a regular file")
            if _sha256_capped(path, max_bytes) != info["sha256"]:
                raise StageError(
                    "precondition", f"checkpoint file {_short(path)} is corrupt (sha256 mismatch)"
                )
        weights = load_file(str(src / "weights.safetensors"))
        params = dict(self.part.module.global_named_parameters())
        missing = sorted(set(params) - set(weights))
        unexpected = sorted(set(weights) - set(params))
        if missing or unexpected:
            raise bad(f"missing {missing[:5]} unexpected {unexpected[:5]}")
        for name, p in params.items():
            if weights[name].shape != p.shape or not weights[name].is_floating_point():
                raise bad(
                    f"{name} is {weights[name].dtype} {tuple(weights[name].shape)}, the model has {p.dtype} {tuple(p.shape)}"
                )
        opt_meta = meta.get("optimizer")
        if (
            not isinstance(opt_meta, dict)
            or not isinstance(opt_meta.get("steps"), dict)
            or not isinstance(opt_meta.get("param_groups"), list)
        ):
            raise bad("stage.json has no valid optimizer section")
        opt_tensors = load_file(str(src / "optimizer.safetensors"))
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        for name, step_value in opt_meta["steps"].items():
            if name not in params:
                raise bad(f"optimizer state for unknown parameter {name!r}")
            if not _is_real(step_value):
                raise bad(f"optimizer step of {name} is {step_value!r}, not a finite number")
            state = {"step": torch.tensor(float(step_value), dtype=torch.float32)}
            for key in ("exp_avg", "exp_avg_sq"):
                t = opt_tensors.get(f"{name}::{key}")
                if t is not None:
                    if t.shape != params[name].shape or not t.is_floating_point():
                        raise bad(
                            f"optimizer {key} of {name} is {t.dtype} {tuple(t.shape)}, the parameter is {tuple(params[name].shape)}"
                        )
                    state[key] = t
            opt_state[name] = state
        groups = []
        template = build_optimizer(self.part.module, self.train).param_groups
        if len(opt_meta["param_groups"]) != len(template):
            raise bad(
                f"{len(opt_meta['param_groups'])} optimizer parameter groups, the stage has {len(template)}"
            )
        for saved, current in zip(opt_meta["param_groups"], template):
            if not isinstance(saved, dict):
                raise bad("an optimizer parameter group is not a JSON object")
            restored: dict[str, Any] = {}
            for k, v in saved.items():
                cur = current.get(k)
                if k == "betas":
                    if not (isinstance(v, list) and len(v) == 2 and all(_is_real(b) for b in v)):
                        raise bad(f"optimizer betas {v!r} are not two numbers")
                    restored[k] = tuple(float(b) for b in v)
                elif isinstance(cur, bool):
                    if not isinstance(v, bool):
                        raise bad(f"optimizer {k} = {v!r} is not a boolean")
                    restored[k] = v
                elif isinstance(cur, (int, float)):
                    if not _is_real(v):
                        raise bad(f"optimizer {k} = {v!r} is not a finite number")
                    restored[k] = v
                # other keys (None-valued constructor options) are the same for every run: kept as built
            groups.append(restored)
        rng = load_file(str(src / "rng.safetensors"))
        reference = torch.get_rng_state()
        cpu_state = rng.get("torch_cpu")
        if cpu_state is None or cpu_state.dtype != torch.uint8 or cpu_state.shape != reference.shape:
            raise bad("rng.safetensors has no valid torch_cpu state")
        if "torch_cuda" in rng and self.part.device.type == "cuda":
            cuda_ref = torch.cuda.get_rng_state(self.part.device)
            if rng["torch_cuda"].dtype != torch.uint8 or rng["torch_cuda"].shape != cuda_ref.shape:
                raise bad("rng.safetensors has no valid torch_cuda state")
        return meta, weights, opt_state, groups, rng


SHARD_FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")


def _load_init_weights(part: StagePart, spec: Any) -> None:
    """model.init_from: this stage's parameters from an exported folder, by global name (any split)."""
    from redheart import model_folder

    try:
        tensors = model_folder.read_init_weights(spec, part.module)
    except (model_folder.ModelFolderError, OSError) as exc:
        raise StageError("precondition", f"StartRun settings: init_from: {exc}") from None
    model_folder.load_into(part.module.global_named_parameters(), tensors)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(path: Any, limit: int = 200) -> str:
    text = str(path)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _sha256_capped(path: Path, max_bytes: int) -> str:
    digest = hashlib.sha256()
    total = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise StageError(
                    "precondition",
                    f"{_short(path)} is above the load cap of {max_bytes} bytes (checkpoint.max_load_mb)",
                )
            digest.update(chunk)
    return digest.hexdigest()


def _read_capped(path: Path, max_bytes: int) -> bytes:
    # Read at most max_bytes + 1: st_size can lie (procfs, devices), the read cannot.
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise StageError(
            "precondition",
            f"{_short(path)} is above the load cap of {max_bytes} bytes (checkpoint.max_load_mb)",
        )
    return data


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
