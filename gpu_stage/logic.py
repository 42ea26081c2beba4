"""GPU stage logic (torch only): layers [cpu_layers, num_layers), heads and losses; last stage.

The regret target of micro-batch i comes from the regret service, scored on the detached Bentham
prediction of that micro-batch. The request leaves right after the forward and is collected in
the backward; with ``lookahead`` extra warm-up forwards, the next forward runs while it is in
flight, so scoring overlaps compute instead of stalling it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from redheart.losses import IGNORE_INDEX, multitask_loss
from redheart.model import NUM_JUDGMENTS, GpuStageModule, ModelShape
from redheart.stage_runtime import (
    ACTIVATION,
    EVAL_ACTIVATION,
    GRADIENT,
    ForwardRecord,
    MicroBatchInputs,
    RoundContext,
    StageError,
    StepAborted,
)

LABEL_KEYS = ("labels.emotions", "labels.emotions_mask", "labels.bentham", "labels.bentham_mask", "labels.judgment")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"gpu_stage.device = {name!r} but CUDA is not available (fix: device = \"auto\" or \"cpu\")")
    return torch.device(name)


@dataclass
class InProcessReply:
    regret: torch.Tensor
    regret_computations: int
    bentham_evaluations: int
    explanations: list = field(default_factory=list)


class InProcessRegret:
    """Scores in this process with the same calculus as the service (regret.address = "inprocess")."""

    def __init__(self, regrets_per_step: int, bentham_per_regret: int) -> None:
        self.regrets_per_step = regrets_per_step
        self.bentham_per_regret = bentham_per_regret

    def submit(self, run_id, step, micro_batch, bentham, scenario_ids=(), explain=False, deadline=None) -> Future:
        from redheart import calculus

        result = calculus.score(bentham.detach().float().cpu().numpy(), self.regrets_per_step, self.bentham_per_regret)
        fut: Future = Future()
        fut.set_result(InProcessReply(torch.from_numpy(result.regret).float(), result.regret_computations, result.bentham_evaluations))
        return fut

    def close(self) -> None:
        pass


class GpuStagePart:
    name = "gpu"
    rank = 1
    num_stages = 2
    receives = frozenset({ACTIVATION, EVAL_ACTIVATION})

    def __init__(self, shape: ModelShape, *, device: str = "auto", checkpointing: bool = False, max_message_mb: int = 512,
                 security: Any = None) -> None:
        self.device = resolve_device(device)
        self.module = GpuStageModule(shape, checkpointing=checkpointing).to(self.device)
        self.max_message_mb = max_message_mb
        self.security = security  # [security] of this process: TLS / mTLS and the token toward the regret service
        self.regret: Any = None
        self.loss_weights: Mapping[str, float] = {}

    def configure(self, settings: Mapping[str, Any], regret_address: str) -> None:
        train = settings.get("train", {})
        regret = settings.get("regret", {})
        self.loss_weights = dict(train.get("loss_weights", {}))
        if self.regret is not None:
            self.regret.close()
            self.regret = None
        if not regret.get("enabled", True):
            return
        per_step, per_regret = int(regret.get("regrets_per_step", 7)), int(regret.get("bentham_per_regret", 3))
        if regret_address in ("", "inprocess"):
            self.regret = InProcessRegret(per_step, per_regret)
        else:
            from redheart.regret_client import RegretClient

            self.regret = RegretClient(
                regret_address,
                max_message_mb=self.max_message_mb,
                timeout_seconds=float(regret.get("timeout_seconds", 30.0)),
                security=self.security,
            )

    def discard(self) -> None:
        pass

    def _mask(self, mb: MicroBatchInputs) -> torch.Tensor:
        try:
            return mb.tensors["attention_mask"].to(self.device)
        except KeyError:
            raise StageError("invalid", f"micro-batch {mb.index}: the gpu stage needs input 'attention_mask'") from None

    def check_labels(self, mb: MicroBatchInputs) -> None:
        """Labels come over the network: shapes, dtypes and ranges are checked before any compute."""
        t = mb.tensors
        for key in LABEL_KEYS:
            if key not in t:
                raise StageError("invalid", f"micro-batch {mb.index}: the gpu stage needs input {key!r}")
        n = t["attention_mask"].shape[0] if "attention_mask" in t else None
        expected = {"labels.emotions": (n, 6), "labels.emotions_mask": (n,), "labels.bentham": (n, 8),
                    "labels.bentham_mask": (n,), "labels.judgment": (n,)}
        for key, shape in expected.items():
            if tuple(t[key].shape) != shape:
                raise StageError("invalid", f"micro-batch {mb.index}: {key} has shape {list(t[key].shape)}, expected {list(shape)}")
        for key in ("labels.emotions", "labels.bentham"):
            if not t[key].is_floating_point() or not bool(torch.isfinite(t[key]).all()):
                raise StageError("invalid", f"micro-batch {mb.index}: {key} must be finite floats")
        judgment = t["labels.judgment"]
        if judgment.dtype not in (torch.int64, torch.int32) or bool(((judgment != IGNORE_INDEX) & ((judgment < 0) | (judgment >= NUM_JUDGMENTS))).any()):
            raise StageError("invalid", f"micro-batch {mb.index}: labels.judgment must be integers in [0, {NUM_JUDGMENTS}) or {IGNORE_INDEX} (missing)")

    def forward(self, ctx: RoundContext, mb: MicroBatchInputs) -> ForwardRecord:
        self.check_labels(mb)
        act = ctx.receive(ACTIVATION, mb.index, f"the activation of micro-batch {mb.index} from the cpu stage")
        mask = self._mask(mb)
        if act.shape[:2] != mask.shape:
            raise StageError("invalid", f"step {ctx.plan.step} micro-batch {mb.index}: activation shape {list(act.shape)} does not match attention_mask {list(mask.shape)}")
        # The received activation is the leaf whose gradient goes back to the CPU stage.
        leaf = act.to(self.device).requires_grad_(True)
        with ctx.autocast():
            outputs = self.module(leaf, mask)
        pending = None
        if self.regret is not None and not bool(torch.isfinite(outputs["bentham"]).all()):
            # A diverged forward (fp32 blow-up, fp16 overflow): no regret target can be computed.
            # A NaN target makes this micro-batch's loss NaN, which the orchestrator turns into a
            # global skip (fp16) or a stop naming step, stage and micro-batch (fp32).
            nan = torch.full(outputs["bentham"].shape[:1], float("nan"))
            pending = Future()
            pending.set_result(InProcessReply(nan, 0, 0))
        elif self.regret is not None:
            deadline = time.monotonic() + ctx.plan.deadline_seconds
            pending = self.regret.submit(
                ctx.plan.run_id, ctx.plan.step, mb.index, outputs["bentham"].detach().float().cpu(),
                scenario_ids=mb.sample_ids, deadline=deadline,
            )
        return ForwardRecord(input_leaf=leaf, head_outputs=outputs, pending=pending, inputs=mb,
                             pending_since=time.perf_counter())

    def backward(self, ctx: RoundContext, mb: MicroBatchInputs, record: ForwardRecord) -> dict:
        labels = {}
        for key in LABEL_KEYS:
            if key not in mb.tensors:
                raise StageError("invalid", f"micro-batch {mb.index}: the gpu stage needs input {key!r}")
            labels[key] = mb.tensors[key].to(self.device)
        regret_target = None
        stats: dict[str, Any] = {"regret_computations": 0, "bentham_evaluations": 0}
        if record.pending is not None:
            t0 = time.perf_counter()
            reply = self._await_regret(ctx, record.pending, mb.index)
            t1 = time.perf_counter()
            ctx.timings["regret_wait"] += t1 - t0
            # The request's life, sent at the forward, answered at the latest when the wait ended.
            since, until = record.pending_since - ctx.started, t1 - ctx.started
            ctx.thread_spans.append(("regret", mb.index, since, until, "regret-client"))
            if t1 - t0 > 1e-4:
                ctx.thread_spans.append(("regret wait", mb.index, t0 - ctx.started, t1 - ctx.started, ""))
            regret_target = reply.regret.to(self.device)
            stats.update(
                regret_computations=int(reply.regret_computations),
                bentham_evaluations=int(reply.bentham_evaluations),
                regret_mean=float(regret_target.mean()) if regret_target.numel() else 0.0,
                regret_max=float(regret_target.max()) if regret_target.numel() else 0.0,
            )
        assert record.head_outputs is not None and record.input_leaf is not None
        loss, parts = multitask_loss(record.head_outputs, labels, regret_target, self.loss_weights)
        # Scale by 1/(micro-batches x accumulation) BEFORE backward; .grad is never rescaled later.
        (loss * ctx.plan.loss_multiplier * ctx.plan.loss_scale).backward()
        grad = record.input_leaf.grad
        if grad is None:  # the CPU stage holds no trainable path into this stage (cannot happen with embeddings)
            grad = torch.zeros_like(record.input_leaf)
        # Back in the compute dtype under mixed precision (fp16 overflow of a scaled gradient shows up
        # as inf in the CPU stage's norm: a global skip, as loss scaling intends).
        wire = ctx.runtime.wire_dtype()
        grad = grad.detach() if wire is None else grad.detach().to(wire)
        ctx.link.send("prev", ctx.plan.run_id, ctx.plan.step, mb.index, GRADIENT, grad)
        stats.update(losses=parts, total_loss=float(loss.detach()), samples=int(record.input_leaf.shape[0]))
        return stats

    @staticmethod
    def _await_regret(ctx: RoundContext, pending: Future, micro_batch: int):
        """Wait for the regret target, but give up at once when the orchestrator aborts the step."""
        while True:
            try:
                return pending.result(timeout=0.1)  # raises ServiceError naming the regret service address
            except FutureTimeout:
                reason = ctx.runtime.mailbox.aborted(ctx.plan.run_id, ctx.plan.step)
                if reason is not None:
                    pending.cancel()
                    raise StepAborted(f"step {ctx.plan.step} was aborted while waiting for the regret of micro-batch {micro_batch}: {reason}")

    def evaluate(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict:
        act = ctx.receive(EVAL_ACTIVATION, mb.index, f"the evaluation activation of micro-batch {mb.index} from the cpu stage")
        mask = self._mask(mb)
        with ctx.autocast():
            outputs = self.module(act.to(self.device), mask)
        return {"outputs": {k: v.detach().float().cpu() for k, v in outputs.items()}}

    def check_tensor(self, kind: str, tensor: torch.Tensor) -> None:
        h = self.module.shape.hidden_size
        if tensor.ndim != 3 or tensor.shape[-1] != h or not tensor.is_floating_point():
            raise StageError("invalid", f"{kind} must be a float tensor [batch, seq, {h}], got {tensor.dtype} {list(tensor.shape)}")
