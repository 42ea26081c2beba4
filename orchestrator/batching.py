"""The micro-batches of an optimizer step, each padded only as far as its longest sequence.

The corpus is encoded once at ``model.max_seq_len`` (``[N, L]``, right-padded). Texts of the
bundled corpus average 38 tokens, so padding every sample to L = 256 spends ~85% of every step on
padding. Here each micro-batch is cut to its longest real sequence, rounded up to a multiple of
``train.pad_to_multiple_of`` (vector-friendly widths, and few distinct shapes for the allocator).
Masked attention and masked mean pooling give the cut columns no say in the result, so a trimmed
micro-batch computes what the padded one did, only without the wasted work.

The pipeline driver and the single-process reference both build their micro-batches here, so they
always see the same shapes (``--verify`` compares like with like).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from redheart.data.dataset import trimmed_length


@dataclass
class Batch:
    """Samples as tensors ``[B, ...]`` (keyed like the plan's inputs) and their scenario ids."""

    tensors: dict[str, torch.Tensor]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int) -> Batch:
        return Batch({k: v[start:stop] for k, v in self.tensors.items()}, self.ids[start:stop])


SEQUENCE_KEYS = ("input_ids", "attention_mask")
"""Tensors with a sequence axis (axis 1); labels have none and are never cut."""


def trim_padding(batch: Batch, multiple: int) -> Batch:
    """The same samples with the sequence axis cut to :func:`trimmed_length` (a view, no copy)."""
    if "attention_mask" not in batch.tensors:
        return batch
    width = trimmed_length(batch.tensors["attention_mask"], multiple)
    tensors = {k: (v[:, :width] if k in SEQUENCE_KEYS else v) for k, v in batch.tensors.items()}
    return Batch(tensors, batch.ids)


def split_micro_batches(batch: Batch, micro_batch_size: int, multiple: int) -> list[Batch]:
    """Consecutive slices of ``micro_batch_size`` samples (the last may be shorter), each trimmed."""
    return [
        trim_padding(batch.slice(i, i + micro_batch_size), multiple)
        for i in range(0, len(batch), micro_batch_size)
    ]


def step_micro_batches(rounds: Sequence[Batch], micro_batch_size: int, multiple: int) -> list[Batch]:
    """Every micro-batch of an optimizer step, accumulation rounds in order.

    Position ``i`` in the list is the micro-batch's global index in the step: the dropout seed of
    (step, i, stage) and the pipeline's message keys use it, whichever process runs it.
    """
    out: list[Batch] = []
    for batch in rounds:
        out.extend(split_micro_batches(batch, micro_batch_size, multiple))
    return out


def computed_tokens(parts: Sequence[Batch]) -> int:
    """Token positions the model computes (real tokens + the padding left after trimming)."""
    return sum(int(p.tensors["input_ids"].numel()) for p in parts)
