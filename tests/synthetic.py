"""Synthetic batches for equivalence tests (the math must match whatever the tokens are)."""

from __future__ import annotations

import torch

from orchestrator.pipeline import Batch


def synthetic_batch(seed: int, batch_size: int = 8, seq: int = 16, vocab: int = 2048) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    lengths = torch.randint(3, seq + 1, (batch_size,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = 0
    ids[mask == 0] = 0
    judgment = torch.randint(0, 5, (batch_size,), generator=g)
    judgment[torch.rand(batch_size, generator=g) < 0.2] = -100  # some labels missing
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels.emotions": (torch.rand(batch_size, 6, generator=g) > 0.5).float(),
        "labels.emotions_mask": torch.rand(batch_size, generator=g) > 0.2,
        "labels.bentham": torch.cat(
            [torch.rand(batch_size, 7, generator=g), torch.rand(batch_size, 1, generator=g) * 2 - 1], 1
        ),
        "labels.bentham_mask": torch.rand(batch_size, generator=g) > 0.2,
        "labels.judgment": judgment,
    }
    return Batch(tensors, [f"syn-{seed}-{i}" for i in range(batch_size)])
