"""A GPU stage process between two others (torch only): layers [a, b), no embeddings, no heads.

With ``model.stage_layers`` of p > 2 entries, pipeline positions 1 .. p-2 run this part. It takes
the previous stage's activation, runs its layers and sends the result to the next stage; in the
backward it takes the next stage's gradient of that result and sends the gradient of its own input
back. On CUDA both leave through the side-stream sender (gpu_stage/transfer.py), so neither copy
to host stalls the compute stream; on the CPU they are sent as they are.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_stage.logic import resolve_device
from gpu_stage.transfer import DeviceToHostSender, to_device
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
from redheart.stage.errors import ErrorKind, StageError


class MiddleStagePart:
    receives = frozenset({ACTIVATION, EVAL_ACTIVATION, GRADIENT})

    def __init__(
        self,
        shape: ModelShape,
        layers: range,
        *,
        rank: int,
        num_stages: int,
        device: str = "auto",
        checkpointing: bool = False,
    ) -> None:
        if not 0 < rank < num_stages - 1:
            raise ValueError(f"a middle stage sits between two others: rank {rank} of {num_stages} stages")
        self.name = f"gpu{rank}"
        self.rank, self.num_stages = rank, num_stages
        self.device = resolve_device(device)
        self.previous = "the cpu stage" if rank == 1 else f"stage {rank - 1}"
        module = StageModule(shape, layers, embeddings=False, heads=False, checkpointing=checkpointing)
        self.module = module.to(self.device)
        self.sender = DeviceToHostSender.for_device(self.device) if self.device.type == "cuda" else None

    def _send(
        self,
        ctx: RoundContext,
        to: str,
        index: int,
        kind: str,
        tensor: torch.Tensor,
        side_stream: bool = True,
    ) -> None:
        # Detached, in the wire's dtype under mixed precision (the next matmul would round it anyway).
        wire = ctx.runtime.wire_dtype()
        tensor = tensor.detach() if wire is None else tensor.detach().to(wire)
        if self.sender is not None and side_stream:
            self.sender.send(ctx.link, to, ctx.plan.run_id, ctx.plan.step, index, kind, tensor)
        else:
            ctx.link.send(to, ctx.plan.run_id, ctx.plan.step, index, kind, tensor)

    def _received(self, ctx: RoundContext, kind: str, mb: MicroBatchInputs, what: str) -> torch.Tensor:
        act = ctx.receive(kind, mb.index, f"the {what} of micro-batch {mb.index} from {self.previous}")
        mask = mb.tensors.get("attention_mask")
        if mask is None:
            raise StageError(
                ErrorKind.INVALID, f"micro-batch {mb.index}: stage {self.rank} needs input 'attention_mask'"
            )
        if act.shape[:2] != mask.shape:
            raise StageError(
                ErrorKind.INVALID,
                f"step {ctx.plan.step} micro-batch {mb.index}: {what} shape {list(act.shape)} does not "
                f"match attention_mask {list(mask.shape)}",
            )
        return act

    def forward(self, ctx: RoundContext, mb: MicroBatchInputs) -> ForwardRecord:
        act = self._received(ctx, ACTIVATION, mb, "activation")
        # The received activation is the leaf whose gradient goes back to the previous stage.
        leaf = to_device(act, self.device).requires_grad_(True)
        mask = to_device(mb.tensors["attention_mask"], self.device)
        with ctx.autocast():
            out = self.module(leaf, mask)  # [B, T, H]
        self._send(ctx, "next", mb.index, ACTIVATION, out)
        return ForwardRecord(input_leaf=leaf, output=out)

    def backward(self, ctx: RoundContext, mb: MicroBatchInputs, record: ForwardRecord) -> dict[str, Any]:
        grad = ctx.receive(GRADIENT, mb.index, f"the gradient of micro-batch {mb.index} from the next stage")
        assert record.output is not None and record.input_leaf is not None
        if grad.shape != record.output.shape:
            raise StageError(
                ErrorKind.INVALID,
                f"step {ctx.plan.step} micro-batch {mb.index}: gradient shape {list(grad.shape)} does not match "
                f"the activation shape {list(record.output.shape)}",
            )
        record.output.backward(to_device(grad, self.device).to(record.output.dtype))
        leaf_grad = record.input_leaf.grad
        if leaf_grad is None:  # cannot happen: every layer depends on its input
            leaf_grad = torch.zeros_like(record.input_leaf)
        self._send(ctx, "prev", mb.index, GRADIENT, leaf_grad)
        return {}

    def finish_round(self, ctx: RoundContext, per_mb: dict[int, dict]) -> None:
        """Hand what the side-stream sender still holds to the link before it is flushed."""
        if self.sender is not None:
            self.sender.drain(ctx.plan.deadline_seconds)

    def discard(self) -> None:
        if self.sender is not None:
            self.sender.discard()

    def evaluate(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict[str, Any]:
        act = self._received(ctx, EVAL_ACTIVATION, mb, "evaluation activation")
        mask = to_device(mb.tensors["attention_mask"], self.device)
        with ctx.autocast():
            out = self.module(to_device(act, self.device), mask)  # [B, T, H]
        # Not through the side-stream sender: an evaluation pass has no finish_round to drain it,
        # and nothing to overlap the copy with.
        self._send(ctx, "next", mb.index, EVAL_ACTIVATION, out.cpu(), side_stream=False)
        return {}

    def check_tensor(self, kind: str, tensor: torch.Tensor) -> None:
        check_hidden(kind, tensor, self.module.shape.hidden_size)
