"""Running rounds on a stage: one accumulation round of a step (its schedule's forward and
backward actions, then the gradient norm after the last round) or one evaluation pass. A mixin of
:class:`redheart.stage.runtime.StageRuntime`, which owns the state these methods read and advance.

Invariants kept here (docs/architecture.md, "One optimizer step"): each micro-batch loss is multiplied by
``loss_multiplier`` before backward (``.grad`` is never rescaled afterwards), and the stage's
gradient-norm² is reported after the last accumulation round of the step."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch

from redheart.config import TrainConfig
from redheart.model import derive_seed
from redheart.schedule import build_schedule
from redheart.stage.checks import check_plan_numbers
from redheart.stage.contracts import (
    EVAL_ACTIVATION,
    AttemptLink,
    ForwardRecord,
    PeerLink,
    RoundContext,
    RoundPlan,
    RoundResult,
    StagePart,
)
from redheart.stage.errors import ErrorKind, StageError, StepAborted
from redheart.stage.mailbox import Mailbox


class Rounds:
    """RunStep of :class:`~redheart.stage.runtime.StageRuntime`, which sets these attributes and
    provides the run check (``_check_run``)."""

    part: StagePart
    mailbox: Mailbox
    lock: threading.RLock
    run_id: str
    train: TrainConfig
    optimizer: torch.optim.Optimizer | None
    next_step: int
    rounds_done: int
    current_plan: RoundPlan | None
    results: dict[tuple[str, int, int], RoundResult]
    aborted_attempts: dict[tuple[str, int], tuple[int, str]]
    seen_attempts: dict[tuple[str, int], int]
    running: threading.Event
    _apply_peak: int
    held_weight_casts: Any  # () -> context manager (StageRuntime.held_weight_casts)

    def run_round(self, plan: RoundPlan, link: PeerLink) -> RoundResult:
        """Run this stage's actions for one accumulation round (or an evaluation pass)."""
        check_plan_numbers(plan)
        # A retried RunStep waits for the round it repeats (then gets its cached result), bounded.
        if not self.lock.acquire(timeout=plan.deadline_seconds):
            raise StageError(
                ErrorKind.PRECONDITION,
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
                ErrorKind.PRECONDITION,
                f"RunStep for step {plan.step} round {plan.accumulation_round}, but this stage expects step {self.next_step}",
            )
        if plan.accumulation_round != self.rounds_done:
            raise StageError(
                ErrorKind.PRECONDITION,
                f"RunStep for step {plan.step} accumulation round {plan.accumulation_round}, but {self.rounds_done} round(s) of it are done",
            )
        mark = self.aborted_attempts.get((plan.run_id, plan.step))
        if plan.attempt > 0 and mark is not None and plan.attempt <= mark[0]:
            raise StepAborted(f"step {plan.step} attempt {plan.attempt} was aborted: {mark[1]}")
        if not plan.micro_batches:
            raise StageError(ErrorKind.INVALID, f"step {plan.step}: the plan has no micro-batches")
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
            if self.replicas is not None:  # the replicas waiting in the gradient sum need not time out
                self.replicas.release()
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
        if self.replicas is not None:
            self.replicas.begin_step()
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
        with self.held_weight_casts():  # weights cast to 16 bits once per round, not per micro-batch
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
            if self.replicas is not None:  # the whole batch's gradient, on every replica
                seconds, sent = self.replicas.sum_gradients(self.part.module)
                ctx.timings["allreduce"] = seconds
                ctx.timings["allreduce_bytes"] = float(sent)
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
            with torch.no_grad(), self.held_weight_casts():
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
