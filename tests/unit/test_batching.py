"""Length-aware batching: micro-batches cut to their longest sequence, length bucketing."""

from __future__ import annotations

import torch
from synthetic import synthetic_batch

from orchestrator.batching import Batch, computed_tokens, step_micro_batches, trim_padding
from redheart.config import HybridConfig, auto_micro_batch_size
from redheart.data import bucket_by_length, epoch_order
from redheart.data.dataset import trimmed_length


def _batch(lengths: list[int], width: int = 64) -> Batch:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = torch.where(
        mask.bool(), torch.arange(width).expand(len(lengths), width) + 4, torch.zeros_like(mask)
    )
    labels = torch.arange(len(lengths), dtype=torch.float32)[:, None].expand(len(lengths), 6).clone()
    return Batch(
        {"input_ids": ids, "attention_mask": mask, "labels.emotions": labels},
        [f"s{i}" for i in range(len(lengths))],
    )


def test_trimmed_length_rounds_the_longest_row_up_to_the_multiple():
    assert trimmed_length(_batch([3, 9]).tensors["attention_mask"], 8) == 16
    assert trimmed_length(_batch([8, 2]).tensors["attention_mask"], 8) == 8
    assert trimmed_length(_batch([1]).tensors["attention_mask"], 8) == 8
    assert trimmed_length(_batch([60]).tensors["attention_mask"], 8) == 64  # never wider than encoded
    assert trimmed_length(_batch([3, 9]).tensors["attention_mask"], 0) == 64  # 0: pad to max_seq_len


def test_trim_keeps_every_real_token_and_leaves_labels_alone():
    batch = _batch([5, 17, 2])
    trimmed = trim_padding(batch, 8)
    assert trimmed.tensors["input_ids"].shape == (3, 24)
    assert torch.equal(trimmed.tensors["attention_mask"].sum(1), batch.tensors["attention_mask"].sum(1))
    assert torch.equal(trimmed.tensors["input_ids"], batch.tensors["input_ids"][:, :24])
    assert trimmed.tensors["labels.emotions"] is batch.tensors["labels.emotions"]
    assert trimmed.ids == batch.ids


def test_step_micro_batches_are_in_global_order_and_ragged():
    rounds = [_batch([3, 30, 4, 5]), _batch([40, 2, 9, 1])]
    parts = step_micro_batches(rounds, 2, 8)
    assert [p.ids for p in parts] == [["s0", "s1"], ["s2", "s3"], ["s0", "s1"], ["s2", "s3"]]
    assert [p.tensors["input_ids"].shape[1] for p in parts] == [32, 8, 40, 16]
    assert computed_tokens(parts) == 2 * (32 + 8 + 40 + 16)


def test_trimmed_forward_equals_the_padded_forward():
    # Masked attention and masked pooling: the cut columns must not change any head output.
    from redheart.model import CpuStageModule, GpuStageModule, resolve_model_shape

    cfg = HybridConfig(model={"preset": "tiny", "dropout": 0.0})
    shape = resolve_model_shape(cfg.model)
    cpu, gpu = CpuStageModule(shape).eval(), GpuStageModule(shape).eval()
    batch = synthetic_batch(3, seq=64)
    batch.tensors["attention_mask"][:, 20:] = 0  # every row at most 20 tokens
    batch.tensors["input_ids"][batch.tensors["attention_mask"] == 0] = 0
    full, cut = batch, trim_padding(batch, 8)
    assert cut.tensors["input_ids"].shape[1] == 24
    with torch.no_grad():
        a = gpu(
            cpu(full.tensors["input_ids"], full.tensors["attention_mask"]), full.tensors["attention_mask"]
        )
        b = gpu(cpu(cut.tensors["input_ids"], cut.tensors["attention_mask"]), cut.tensors["attention_mask"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_auto_micro_batch_size_aims_at_four_micro_batches_per_stage():
    assert auto_micro_batch_size(8, 2) == 1
    assert auto_micro_batch_size(16, 2) == 2
    assert auto_micro_batch_size(32, 2) == 4
    assert auto_micro_batch_size(24, 2) == 3
    assert auto_micro_batch_size(4, 2) == 1  # the batch cannot give 8: as many as it can
    cfg = HybridConfig(model={"preset": "base"}, batch_size=8)
    assert cfg.train.micro_batch_size == 1 and cfg.micro_batches == 8
    assert HybridConfig(batch_size=8, micro_batch_size=4).train.micro_batch_size == 4  # explicit wins


def test_bucketing_groups_similar_lengths_visits_every_row_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 80, (1000,), generator=g)
    order = epoch_order(["a"] * 1000, epoch=0, seed=1)
    step_samples = 8
    bucketed = bucket_by_length(order, lengths, step_samples, 16, seed=1, epoch=0)
    assert sorted(bucketed) == sorted(order)
    assert bucketed == bucket_by_length(order, lengths, step_samples, 16, seed=1, epoch=0)
    assert bucketed != bucket_by_length(order, lengths, step_samples, 16, seed=1, epoch=1)

    def spread(rows):  # mean (longest - shortest) length inside a step
        steps = torch.tensor(rows[: len(rows) // step_samples * step_samples]).view(-1, step_samples)
        lens = lengths[steps]
        return float((lens.max(1).values - lens.min(1).values).float().mean())

    assert spread(bucketed) < spread(order) / 4
    # The steps of a window are shuffled, not walked from short to long.
    firsts = [int(lengths[bucketed[i]]) for i in range(0, 16 * step_samples, step_samples)]
    assert firsts != sorted(firsts)


def test_bucketing_leaves_the_partial_tail_in_place():
    order = list(range(21))
    lengths = torch.arange(21, 0, -1)
    out = bucket_by_length(order, lengths, 4, 2, seed=0, epoch=0)
    assert out[20:] == [20]
    assert sorted(out[:20]) == list(range(20))
