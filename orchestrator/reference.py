"""Single-process training of the same model: the yardstick of ``--verify`` and the equivalence tests.

It builds every stage's module in this process from the same seed (two, or one per entry of
``model.stage_layers``), runs the micro-batches in order with the same dropout seeds, loss scaling and regret calculus as the pipeline, clips with
``torch.nn.utils.clip_grad_norm_`` over all parameters and steps AdamW. A pipelined step must give
the same losses and parameters (fp32 on CPU: rtol 1e-5, atol 4e-5).

With ``train.use_mixed_precision`` it autocasts as the stages do on their devices (bf16 on the
CPU), so the workload benchmark compares the pipeline with a single process in the same arithmetic;
precisions that need a loss scale (fp16 on older GPUs) are refused: the reference has no scaler.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from orchestrator.batching import Batch, step_micro_batches
from redheart import heads as head_registry
from redheart.config import HybridConfig
from redheart.losses import multitask_loss
from redheart.model import StageModule, derive_seed, resolve_model_shape, stage_layer_ranges
from redheart.precision import Precision, autocast, choose_precision, device_capability, held_weight_casts
from redheart.stage.optimizer import build_optimizer


def reference_placement(gpu_stage_device: str, cuda_available: bool) -> tuple[torch.device, str]:
    """Where the reference runs the GPU stage's part: on the device the pipeline's GPU stage reports
    (its Describe), so both draw dropout masks from the same generator (CPU and CUDA generators give
    different masks for one seed). Returns (device, note); the note says why when it must differ."""
    device = torch.device(gpu_stage_device or "cpu")
    if device.type == "cuda" and not cuda_available:
        return torch.device("cpu"), (
            f"the pipeline's GPU stage runs on {gpu_stage_device} but this host has no CUDA: "
            f"the reference runs it on the CPU (exact only with model.dropout = 0)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"the GPU stage reports device {gpu_stage_device!r}; the reference runs on cpu or cuda[:N]"
        )
    return device, ""


class SingleProcessTrainer:
    def __init__(self, config: HybridConfig, gpu_device: str | torch.device = "cpu") -> None:
        self.config = config
        shape = resolve_model_shape(config.model)
        # Of the GPU stages' parts; the CPU stage's part stays on the CPU.
        self.device = torch.device(gpu_device)
        ranges = stage_layer_ranges(config.model)
        last = len(ranges) - 1
        # Built in pipeline order, as the stages are started: same names, same initial weights.
        self.segments = [
            StageModule(shape, layers, embeddings=rank == 0, heads=rank == last).to(self._device_of(rank))
            for rank, layers in enumerate(ranges)
        ]
        self.cpu, self.gpu = self.segments[0], self.segments[-1]
        self.optimizers = [build_optimizer(m, config.train) for m in self.segments]
        # What each stage would compute in on its device.
        self.precisions = [self._precision(self._device_of(rank)) for rank in range(len(ranges))]

    def _device_of(self, rank: int) -> torch.device:
        return torch.device("cpu") if rank == 0 else self.device

    def _precision(self, device: torch.device) -> Precision:
        t = self.config.train
        precision = choose_precision(
            t.use_mixed_precision,
            t.mixed_precision_dtype,
            t.allow_tf32,
            device.type,
            device_capability(device),
        )
        if precision.loss_scaling:
            raise ValueError(
                f"the single-process reference cannot train in {precision.name} on {device} (it needs a "
                f'loss scale); set train.use_mixed_precision = false or train.mixed_precision_dtype = "bf16"'
            )
        return precision

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.segments for p in m.parameters()]

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for m in self.segments for n, p in m.global_named_parameters()}

    def step(self, step: int, rounds: Sequence[Batch], learning_rate: float) -> dict:
        t = self.config.train
        parts = step_micro_batches(rounds, t.micro_batch_size, t.pad_to_multiple_of)
        multiplier = 1.0 / len(parts)  # 1 / (micro-batches x accumulation steps), as the pipeline
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        # The stages hold their 16-bit weight copies for a whole round: so does the reference.
        with contextlib.ExitStack() as held:
            for rank, module in enumerate(self.segments):
                device_type = self._device_of(rank).type
                held.enter_context(held_weight_casts(self.precisions[rank], device_type, module))
            mb_losses, heads = self._micro_batches(step, parts, multiplier)
        params = self.parameters()
        if t.max_grad_norm > 0:
            total = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        else:
            total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = learning_rate
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {
            "micro_batch_losses": mb_losses,
            "losses": {h: sum(v) / len(v) for h, v in heads.items()},
            "grad_norm": total,
        }

    def _micro_batches(self, step: int, parts: Sequence[Batch], multiplier: float):
        """Forward and backward of each micro-batch in order; returns (losses, per-head losses)."""
        t = self.config.train
        mb_losses, heads = [], {}
        dev = self.device
        for index, part in enumerate(parts):
            outputs = self._forward(step, index, part.tensors["input_ids"], part.tensors["attention_mask"])
            regret_target = None
            if self.config.regret.enabled and head_registry.regret_service_targets():
                from redheart import calculus

                regret_target = calculus.score_tensor(
                    outputs["bentham"].detach(),
                    self.config.regret.regrets_per_step,
                    self.config.regret.bentham_per_regret,
                )
            labels = {k: part.tensors[k].to(dev) for k in head_registry.label_keys()}
            loss, head_losses = multitask_loss(outputs, labels, regret_target, t.loss_weights)
            (loss * multiplier * 1.0).backward()
            mb_losses.append(float(loss.detach()))
            for head, value in head_losses.items():
                heads.setdefault(head, []).append(value)
        return mb_losses, heads

    def _forward(
        self, step: int, index: int, ids: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Every segment in turn, each seeded as its stage seeds micro-batch ``index``."""
        hidden = ids
        for rank, module in enumerate(self.segments):
            device = self._device_of(rank)
            torch.manual_seed(derive_seed(self.config.train.seed, step, index, rank))  # CUDA's too
            with autocast(self.precisions[rank], device.type):
                hidden = module(hidden.to(device), mask.to(device))
        return hidden
