"""CPU stage logic (torch only): embeddings + layers [0, k0), first stage of the pipeline."""

from __future__ import annotations

import torch

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


class CpuStagePart:
    name = "cpu"
    rank = 0
    num_stages = 2
    receives = frozenset({GRADIENT})

    def __init__(
        self,
        shape: ModelShape,
        *,
        checkpointing: bool = False,
        layers: range | None = None,
        num_stages: int = 2,
    ) -> None:
        """``layers``: the global layer indices it holds (default: the two-stage split's)."""
        self.device = torch.device("cpu")
        self.num_stages = num_stages
        layers = range(0, shape.cpu_layers) if layers is None else layers
        self.module = StageModule(shape, layers, embeddings=True, heads=False, checkpointing=checkpointing)

    def _inputs(self, mb: MicroBatchInputs) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ids, mask = mb.tensors["input_ids"], mb.tensors["attention_mask"]
        except KeyError as exc:
            raise StageError(
                ErrorKind.INVALID, f"micro-batch {mb.index}: the cpu stage needs input {exc.args[0]!r}"
            ) from None
        if ids.dtype != torch.int64 or ids.ndim != 2:
            raise StageError(
                ErrorKind.INVALID,
                f"micro-batch {mb.index}: input_ids must be int64 [batch, seq], got {ids.dtype} {list(ids.shape)}",
            )
        if mask.shape != ids.shape:
            raise StageError(
                ErrorKind.INVALID,
                f"micro-batch {mb.index}: attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}",
            )
        vocab = self.module.token.num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise StageError(
                ErrorKind.INVALID,
                f"micro-batch {mb.index}: input_ids outside [0, {vocab}) (min {int(ids.min())}, max {int(ids.max())})",
            )
        if ids.shape[1] > self.module.shape.max_seq_len:
            raise StageError(
                ErrorKind.INVALID,
                f"micro-batch {mb.index}: {ids.shape[1]} positions exceed max_seq_len {self.module.shape.max_seq_len}",
            )
        return ids, mask

    def forward(self, ctx: RoundContext, mb: MicroBatchInputs) -> ForwardRecord:
        ids, mask = self._inputs(mb)
        with ctx.autocast():
            out = self.module(ids, mask)  # [B, T, H]
        # Detached before it leaves: the graph stays here, only values cross the wire. Under autocast
        # the residual stream stays fp32; it travels in the compute dtype (bf16), as the next
        # stage's matmuls would round it anyway. backward() takes the fp32 `out` with the gradient
        # cast back, which is what the cast's own backward would do.
        ctx.link.send("next", ctx.plan.run_id, ctx.plan.step, mb.index, ACTIVATION, _for_wire(ctx, out))
        return ForwardRecord(output=out)

    def backward(self, ctx: RoundContext, mb: MicroBatchInputs, record: ForwardRecord) -> dict:
        grad = ctx.receive(GRADIENT, mb.index, f"the gradient of micro-batch {mb.index} from the next stage")
        assert record.output is not None
        if grad.shape != record.output.shape:
            raise StageError(
                ErrorKind.INVALID,
                f"step {ctx.plan.step} micro-batch {mb.index}: gradient shape {list(grad.shape)} does not match "
                f"the activation shape {list(record.output.shape)}",
            )
        record.output.backward(grad.to(record.output.dtype))
        return {}

    def evaluate(self, ctx: RoundContext, mb: MicroBatchInputs) -> dict:
        ids, mask = self._inputs(mb)
        with ctx.autocast():
            out = self.module(ids, mask)
        ctx.link.send("next", ctx.plan.run_id, ctx.plan.step, mb.index, EVAL_ACTIVATION, _for_wire(ctx, out))
        return {}

    def check_tensor(self, kind: str, tensor: torch.Tensor) -> None:
        check_hidden(kind, tensor, self.module.shape.hidden_size)


def _for_wire(ctx: RoundContext, tensor: torch.Tensor) -> torch.Tensor:
    dtype = ctx.runtime.wire_dtype()
    tensor = tensor.detach()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
