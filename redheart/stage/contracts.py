"""What the stage runtime exchanges with the code around it: the tensor kinds, the peer link it
sends through, the stage part that holds the model-specific half, and the plan, context and
result of one round. Data and protocols only; the state machine is in redheart/stage/runtime.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from redheart.stage.runtime import StageRuntime

ACTIVATION, GRADIENT, EVAL_ACTIVATION = "activation", "gradient", "eval_activation"


# ----------------------------------------------------------------------------- messaging


class PeerLink(Protocol):
    """Sends tensors to the neighbouring stages. Implemented over gRPC in redheart/stage/peer_link.py.

    Optional members, probed by the runtime with hasattr/getattr (absent: the default below):

    * ``carries_attempts: bool`` -- ``send`` also takes ``deadline=`` (monotonic seconds) and
      ``attempt=`` keywords (default False: sent without them);
    * ``reset_error() -> None`` -- forget the delivery error of an earlier round, called when a round
      starts (default: nothing to forget);
    * ``supersede(run_id, step) -> None`` -- drop what a failed try of the step still had queued
      (default: nothing queued);
    * ``take_spans(started) -> list`` -- the sender thread's spans since ``started`` for the pipeline
      trace, as in :attr:`RoundContext.thread_spans` (default: none).
    """

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
    """The model-specific half of a stage (cpu_stage/logic.py, gpu_stage/logic.py).

    ``module`` must also have ``global_named_parameters()`` (redheart/model.py): parameters by their
    name in the whole model, which checkpoints and init_from weights are keyed by.

    Optional members, probed with hasattr/getattr (absent: the default below):

    * ``configure(settings, regret_address) -> None`` -- StartRun's settings and the regret service
      address, once per started run (default: nothing to configure);
    * ``discard() -> None`` -- forget what a failed or aborted round left (default: nothing kept);
    * ``finish_round(ctx, per_mb) -> None`` -- after a round's last action, before the link is
      flushed: drain queued sends and turn the per-micro-batch results into plain numbers
      (default: they already are);
    * ``describe_device() -> dict`` -- DescribeResponse fields about the device, read by the servicer
      (default: none);
    * ``regret`` -- the regret client, closed by the server when it stops (default: None).
    """

    name: str
    rank: int
    num_stages: int
    device: torch.device
    module: torch.nn.Module
    receives: frozenset[str]
    """The tensor kinds peers may push to this stage; any other kind is refused (INVALID_ARGUMENT)."""

    def forward(self, ctx: RoundContext, mb: MicroBatchInputs) -> ForwardRecord: ...

    def backward(self, ctx: RoundContext, mb: MicroBatchInputs, record: ForwardRecord) -> dict[str, Any]: ...

    def evaluate(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict[str, Any]: ...

    def check_tensor(self, kind: str, tensor: torch.Tensor) -> None:
        """Refuse a pushed tensor this part cannot use (StageError "invalid"), before it is stored."""


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
