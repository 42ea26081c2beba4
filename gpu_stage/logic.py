"""GPU stage logic (torch only): layers [cpu_layers, num_layers), heads and losses; last stage.

The regret target of micro-batch i comes from the regret service, scored on the detached Bentham
prediction of that micro-batch. The request leaves right after the forward and is collected in
the backward; with ``lookahead`` extra warm-up forwards, the next forward runs while it is in
flight, so scoring overlaps compute instead of stalling it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from gpu_stage.transfer import DeviceToHostSender, to_device
from redheart import heads as head_registry
from redheart.losses import label_counts, multitask_loss
from redheart.model import ModelShape, StageModule
from redheart.stage.checks import check_hidden
from redheart.stage.contracts import (
    ACTIVATION,
    EVAL_ACTIVATION,
    GRADIENT,
    ForwardRecord,
    MicroBatchInputs,
    RoundContext,
)
from redheart.stage.errors import ErrorKind, StageError, StepAborted


def round_keys() -> tuple[str, ...]:
    """Inputs of the GPU stage's micro-batches: the attention mask and every head's labels."""
    return ("attention_mask",) + head_registry.label_keys()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f'gpu_stage.device = {name!r} but CUDA is not available (fix: device = "auto" or "cpu")'
        )
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

    def submit(
        self, run_id, step, micro_batch, bentham, scenario_ids=(), explain=False, deadline=None
    ) -> Future:
        from redheart import calculus

        result = calculus.score(
            bentham.detach().float().cpu().numpy(), self.regrets_per_step, self.bentham_per_regret
        )
        fut: Future = Future()
        fut.set_result(
            InProcessReply(
                torch.from_numpy(result.regret).float(),
                result.regret_computations,
                result.bentham_evaluations,
            )
        )
        return fut

    def close(self) -> None:
        pass


class GpuStagePart:
    name = "gpu"
    rank = 1
    num_stages = 2
    receives = frozenset({ACTIVATION, EVAL_ACTIVATION})

    def __init__(
        self,
        shape: ModelShape,
        *,
        device: str = "auto",
        checkpointing: bool = False,
        max_message_mb: int = 512,
        security: Any = None,
        budget_bytes: int = 0,
        layers: range | None = None,
        rank: int = 1,
        num_stages: int = 2,
    ) -> None:
        """``layers``: the global layer indices it holds (default: the two-stage split's); ``rank``
        and ``num_stages``: its place in the pipeline (it is the last stage)."""
        self.device = resolve_device(device)
        self.rank, self.num_stages = rank, num_stages
        self.previous = "the cpu stage" if rank == 1 else f"stage {rank - 1}"
        layers = range(shape.cpu_layers, shape.num_layers) if layers is None else layers
        module = StageModule(shape, layers, embeddings=False, heads=True, checkpointing=checkpointing)
        self.module = module.to(self.device)
        self.max_message_mb = max_message_mb
        self.security = (
            security  # [security] of this process: TLS / mTLS and the token toward the regret service
        )
        self.regret: Any = None
        self.loss_weights: Mapping[str, float] = {}
        # gpu_memory_gb as enforced by gpu_stage.device.enforce_budget (0: not capped)
        self.budget_bytes = budget_bytes
        # CUDA: gradients leave through a side-stream copy and a sender thread (gpu_stage/transfer.py).
        self.sender = DeviceToHostSender.for_device(self.device) if self.device.type == "cuda" else None
        self._round_key: tuple | None = None
        self._round_inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._round_counts: dict[int, dict[str, int]] = {}

    def describe_device(self) -> dict[str, Any]:
        """DescribeResponse fields about the card (read in this process, which owns the context)."""
        if self.device.type != "cuda":
            return {"device_name": "cpu"}
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "device_name": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}",
            "device_total_memory_bytes": int(total),
            "device_free_memory_bytes": int(free),
            "memory_budget_bytes": int(self.budget_bytes),
        }

    def _inputs(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict[str, torch.Tensor]:
        """The micro-batch's mask and labels on the device. On CUDA the whole round's are moved at
        its first forward, one copy per key: a handful of transfers per round, not per micro-batch."""
        key = (ctx.plan.run_id, ctx.plan.step, ctx.plan.accumulation_round, ctx.plan.attempt, id(ctx.plan))
        if self._round_key != key:
            self._round_key = key
            mbs = ctx.plan.micro_batches
            keys = round_keys()
            for m in mbs:
                missing = [k for k in keys if k not in m.tensors]
                if missing:
                    raise StageError(
                        ErrorKind.INVALID, f"micro-batch {m.index}: the gpu stage needs input {missing[0]!r}"
                    )
            self._round_counts = {m.index: label_counts(m.tensors) for m in mbs}
            if self.device.type != "cuda":
                self._round_inputs = {m.index: {k: m.tensors[k].to(self.device) for k in keys} for m in mbs}
            else:
                moved: dict[str, list[torch.Tensor]] = {}
                for k in keys:
                    # Micro-batches padded to their own longest text differ in width: flattened,
                    # [sum of numels] goes over in one copy and is split back into views of each shape.
                    parts = [m.tensors[k] for m in mbs]
                    flat = to_device(torch.cat([p.reshape(-1) for p in parts]), self.device)
                    pieces = flat.split([p.numel() for p in parts])
                    moved[k] = [piece.view(p.shape) for piece, p in zip(pieces, parts)]
                self._round_inputs = {m.index: {k: moved[k][i] for k in keys} for i, m in enumerate(mbs)}
        return self._round_inputs[mb.index]

    def configure(self, settings: Mapping[str, Any], regret_address: str) -> None:
        train = settings.get("train", {})
        regret = settings.get("regret", {})
        self.loss_weights = dict(train.get("loss_weights", {}))
        if self.regret is not None:
            self.regret.close()
            self.regret = None
        if not regret.get("enabled", True):
            return
        if not head_registry.regret_service_targets():
            return  # no head learns from the regret service: nothing to ask it
        per_step, per_regret = (
            int(regret.get("regrets_per_step", 7)),
            int(regret.get("bentham_per_regret", 3)),
        )
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
        self._round_key = None
        self._round_inputs, self._round_counts = {}, {}
        if self.sender is not None:
            self.sender.discard()

    def _mask(self, mb: MicroBatchInputs) -> torch.Tensor:
        """The host copy of the attention mask (as received)."""
        try:
            return mb.tensors["attention_mask"]
        except KeyError:
            raise StageError(
                ErrorKind.INVALID, f"micro-batch {mb.index}: the gpu stage needs input 'attention_mask'"
            ) from None

    def check_labels(self, mb: MicroBatchInputs) -> None:
        """Labels come over the network: shapes, dtypes and ranges are checked before any compute,
        each against its head's label spec in the registry."""
        t = mb.tensors
        specs = [label for spec in head_registry.heads() for label in spec.labels]
        for label in specs:
            if label.key not in t:
                raise StageError(
                    ErrorKind.INVALID, f"micro-batch {mb.index}: the gpu stage needs input {label.key!r}"
                )
        n = t["attention_mask"].shape[0] if "attention_mask" in t else None
        for label in specs:
            shape = (n, *label.shape)
            if tuple(t[label.key].shape) != shape:
                raise StageError(
                    ErrorKind.INVALID,
                    f"micro-batch {mb.index}: {label.key} has shape {list(t[label.key].shape)}, expected {list(shape)}",
                )
        for label in specs:
            if label.dtype.is_floating_point and (
                not t[label.key].is_floating_point() or not bool(torch.isfinite(t[label.key]).all())
            ):
                raise StageError(
                    ErrorKind.INVALID, f"micro-batch {mb.index}: {label.key} must be finite floats"
                )
        for label in specs:
            if label.classes is None:
                continue
            value, k = t[label.key], label.classes
            if value.dtype not in (torch.int64, torch.int32) or bool(
                ((value != label.fill) & ((value < 0) | (value >= k))).any()
            ):
                raise StageError(
                    ErrorKind.INVALID,
                    f"micro-batch {mb.index}: {label.key} must be integers in [0, {k}) or {label.fill} (missing)",
                )

    def forward(self, ctx: RoundContext, mb: MicroBatchInputs) -> ForwardRecord:
        self.check_labels(mb)
        act = ctx.receive(
            ACTIVATION, mb.index, f"the activation of micro-batch {mb.index} from {self.previous}"
        )
        host_mask = self._mask(mb)
        if act.shape[:2] != host_mask.shape:
            raise StageError(
                ErrorKind.INVALID,
                f"step {ctx.plan.step} micro-batch {mb.index}: activation shape "
                f"{list(act.shape)} does not match attention_mask {list(host_mask.shape)}",
            )
        mask = self._inputs(ctx, mb)["attention_mask"]
        # The received activation is the leaf whose gradient goes back to the CPU stage.
        leaf = to_device(act, self.device).requires_grad_(True)
        with ctx.autocast():
            outputs = self.module(leaf, mask)
        pending = None
        # The forward's one host sync: the regret service scores host values. The finiteness
        # check reads that host copy instead of syncing a second time.
        bentham_host = outputs["bentham"].detach().float().cpu() if self.regret is not None else None
        if bentham_host is not None and not bool(torch.isfinite(bentham_host).all()):
            # A diverged forward (fp32 blow-up, fp16 overflow): no regret target can be computed.
            # A NaN target makes this micro-batch's loss NaN, which the orchestrator turns into a
            # global skip (fp16) or a stop naming step, stage and micro-batch (fp32).
            nan = torch.full(outputs["bentham"].shape[:1], float("nan"))
            pending = Future()
            pending.set_result(InProcessReply(nan, 0, 0))
        elif self.regret is not None:
            deadline = time.monotonic() + ctx.plan.deadline_seconds
            pending = self.regret.submit(
                ctx.plan.run_id,
                ctx.plan.step,
                mb.index,
                bentham_host,
                scenario_ids=mb.sample_ids,
                deadline=deadline,
            )
        return ForwardRecord(
            input_leaf=leaf,
            head_outputs=outputs,
            pending=pending,
            inputs=mb,
            pending_since=time.perf_counter(),
        )

    def backward(self, ctx: RoundContext, mb: MicroBatchInputs, record: ForwardRecord) -> dict:
        keys = head_registry.label_keys()
        for key in keys:
            if key not in mb.tensors:
                raise StageError(
                    ErrorKind.INVALID, f"micro-batch {mb.index}: the gpu stage needs input {key!r}"
                )
        inputs = self._inputs(ctx, mb)
        labels = {key: inputs[key] for key in keys}
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
            host_target = reply.regret  # on the host: its statistics cost no device sync
            regret_target = to_device(host_target, self.device)
            stats.update(
                regret_computations=int(reply.regret_computations),
                bentham_evaluations=int(reply.bentham_evaluations),
                regret_mean=float(host_target.mean()) if host_target.numel() else 0.0,
                regret_max=float(host_target.max()) if host_target.numel() else 0.0,
            )
        assert record.head_outputs is not None and record.input_leaf is not None
        # lazy: the head losses stay on the device until finish_round reads the round back at once.
        loss, parts = multitask_loss(
            record.head_outputs,
            labels,
            regret_target,
            self.loss_weights,
            label_counts=self._round_counts[mb.index],
            lazy=True,
        )
        # Scale by 1/(micro-batches x accumulation) BEFORE backward; .grad is never rescaled later.
        (loss * ctx.plan.loss_multiplier * ctx.plan.loss_scale).backward()
        grad = record.input_leaf.grad
        if (
            grad is None
        ):  # the CPU stage holds no trainable path into this stage (cannot happen with embeddings)
            grad = torch.zeros_like(record.input_leaf)
        # Back in the compute dtype under mixed precision (fp16 overflow of a scaled gradient shows up
        # as inf in the CPU stage's norm: a global skip, as loss scaling intends).
        wire = ctx.runtime.wire_dtype()
        grad = grad.detach() if wire is None else grad.detach().to(wire)
        if self.sender is not None:
            self.sender.send(ctx.link, "prev", ctx.plan.run_id, ctx.plan.step, mb.index, GRADIENT, grad)
        else:
            ctx.link.send("prev", ctx.plan.run_id, ctx.plan.step, mb.index, GRADIENT, grad)
        stats.update(losses=parts, total_loss=loss.detach(), samples=int(record.input_leaf.shape[0]))
        return stats

    def finish_round(self, ctx: RoundContext, per_mb: dict[int, dict]) -> None:
        """End of a round: hand the queued gradients to the link, read every loss back in one copy."""
        if self.sender is not None:
            self.sender.drain(ctx.plan.deadline_seconds)
        slots: list[tuple[dict, str]] = []
        values: list[torch.Tensor] = []
        for stats in per_mb.values():
            for head, value in stats.get("losses", {}).items():
                slots.append((stats["losses"], head))
                values.append(value)
            if torch.is_tensor(stats.get("total_loss")):
                slots.append((stats, "total_loss"))
                values.append(stats["total_loss"])
        if values:
            host = torch.stack([v.float() for v in values]).cpu().tolist()  # [n] fp32 -> floats, one sync
            for (where, key), value in zip(slots, host):
                where[key] = value
        self._round_key = None  # the next round moves its own inputs

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
                    raise StepAborted(
                        f"step {ctx.plan.step} was aborted while waiting for the regret of micro-batch {micro_batch}: {reason}"
                    ) from None

    def evaluate(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict:
        act = ctx.receive(
            EVAL_ACTIVATION,
            mb.index,
            f"the evaluation activation of micro-batch {mb.index} from {self.previous}",
        )
        mask = to_device(self._mask(mb), self.device)
        with ctx.autocast():
            outputs = self.module(to_device(act, self.device), mask)
        return {"outputs": {k: v.detach().float().cpu() for k, v in outputs.items()}}

    def check_tensor(self, kind: str, tensor: torch.Tensor) -> None:
        check_hidden(kind, tensor, self.module.shape.hidden_size)
