"""The orchestrator's view of the data: load, split, tokenize once, then hand out batches by step.

Batches are a pure function of (seed, epoch, position): the order of an epoch comes from
``epoch_order(seed, epoch)`` and step ``s`` consumes a fixed slice of it. So the data position of
a checkpoint is just its step number, and a resumed run sees exactly the batches it would have
seen had it never stopped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from orchestrator.batching import Batch
from redheart.config import ConfigError, HybridConfig
from redheart.data import (
    DataError,
    EncodedDataset,
    batches_per_epoch,
    bucket_by_length,
    encode_dataset,
    epoch_order,
    load_jsonl,
    load_tokenizer,
    split_train_validation,
    train_tokenizer,
)
from redheart.model import resolve_model_shape

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: EncodedDataset
    validation: EncodedDataset
    tokenizer_path: Path
    tokenizer_sha256: str
    skipped_lines: int
    truncated: int
    source_counts: dict[str, int]

    @cached_property
    def train_labels(self) -> dict[str, torch.Tensor]:
        """Labels of the whole training split (the baselines' reference), built once per run."""
        return self.train.labels(list(range(len(self.train))))

    @cached_property
    def validation_labels(self) -> dict[str, torch.Tensor]:
        return self.validation.labels(list(range(len(self.validation))))

    def summary(self) -> dict:
        return {
            "train_scenarios": len(self.train),
            "validation_scenarios": len(self.validation),
            "skipped_invalid_lines": self.skipped_lines,
            "truncated_texts": self.truncated,
            "sources": self.source_counts,
            "tokenizer": str(self.tokenizer_path),
            "tokenizer_sha256": self.tokenizer_sha256,
        }


def ensure_corpus(config: HybridConfig) -> Path:
    path = Path(config.data.path)
    if path.exists():
        return path
    if not config.data.generate_if_missing:
        raise ConfigError(
            f"data.path = {str(path)!r} does not exist (fix: point data.path at your JSONL, or set data.generate_if_missing = true)"
        )
    from redheart.data.generate import write_jsonl

    log.info("writing the bundled generated corpus (%d scenarios) to %s", config.data.generated_count, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, config.data.generated_count, config.data.seed)
    return path


def prepare_data(
    config: HybridConfig, output_dir: Path, *, tokenizer_path: Path | None = None
) -> PreparedData:
    """Load + validate + split + tokenizer (train once, store with the run, reuse) + encode."""
    path = ensure_corpus(config)
    result = load_jsonl(path, skip_invalid=config.data.skip_invalid)
    if result.skipped:
        log.warning(
            "skipped %d invalid line(s) of %s (data.skip_invalid = true); first: %s",
            result.skipped,
            path,
            result.errors[0] if result.errors else "",
        )
    scenarios = result.scenarios
    if config.data.max_scenarios:
        scenarios = scenarios[: config.data.max_scenarios]
    if config.data.validation_path:
        # A separate validation file: all of data.path trains, all of the other file validates.
        train = scenarios
        validation = load_jsonl(config.data.validation_path, skip_invalid=config.data.skip_invalid).scenarios
        overlap = sorted({s.id for s in train} & {s.id for s in validation})
        if overlap:
            raise DataError(
                f"{config.data.validation_path}: {len(overlap)} scenario id(s) are also in {path} "
                f"(e.g. {overlap[0]!r}); validation must be held-out data (fix: remove them from one file)"
            )
    else:
        train, validation = split_train_validation(
            scenarios, config.data.validation_fraction, config.data.seed
        )
    if not train or not validation:
        raise DataError(
            f"{path}: {len(scenarios)} scenario(s) leave {len(train)} for training and {len(validation)} for validation "
            f"(fix: more data or another data.validation_fraction)"
        )
    shape = resolve_model_shape(config.model)
    tok_path = tokenizer_path or (
        Path(config.data.tokenizer_path) if config.data.tokenizer_path else output_dir / "tokenizer.json"
    )
    if tok_path.exists():
        tokenizer = load_tokenizer(tok_path)
        if tokenizer.get_vocab_size() > shape.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_path} has {tokenizer.get_vocab_size()} tokens, model.vocab_size is {shape.vocab_size} "
                f"(fix: a matching tokenizer or model.vocab_size >= {tokenizer.get_vocab_size()})"
            )
        log.info("reusing tokenizer %s", tok_path)
    else:
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer((s.text for s in train), shape.vocab_size, tok_path)
        log.info(
            "trained a %d-token byte-level BPE tokenizer on the training split -> %s",
            tokenizer.get_vocab_size(),
            tok_path,
        )
    train_enc = encode_dataset(train, tokenizer, shape.max_seq_len)
    val_enc = encode_dataset(validation, tokenizer, shape.max_seq_len)
    known = sorted({s.source for s in train})
    for source in config.data.source_weights:
        if source not in known:
            raise ConfigError(
                f"data.source_weights names source {source!r}, which is not in {path} (sources: {', '.join(known)})"
            )
    counts: dict[str, int] = {}
    for s in train:
        counts[s.source] = counts.get(s.source, 0) + 1
    return PreparedData(
        train=train_enc,
        validation=val_enc,
        tokenizer_path=tok_path,
        tokenizer_sha256=hashlib.sha256(tok_path.read_bytes()).hexdigest(),
        skipped_lines=result.skipped,
        truncated=train_enc.truncated + val_enc.truncated,
        source_counts=counts,
    )


def to_batch(dataset: EncodedDataset, indices: list[int] | torch.Tensor) -> Batch:
    sub = dataset.subset(indices)
    tensors = {"input_ids": sub.input_ids, "attention_mask": sub.attention_mask}
    tensors.update(dataset.labels(indices))
    return Batch(tensors, list(sub.ids))


class StepBatches:
    """Maps an optimizer step to its accumulation rounds (deterministic, so resume is exact)."""

    def __init__(self, config: HybridConfig, train: EncodedDataset) -> None:
        self.config = config
        self.train = train
        t = config.train
        self.samples_per_step = t.batch_size * t.gradient_accumulation_steps
        self._orders: dict[int, list[int]] = {}
        self.epoch_rows = len(self._order(0))
        self.steps_per_epoch = batches_per_epoch(self.epoch_rows, self.samples_per_step)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training split has {self.epoch_rows} scenario(s), fewer than one step needs "
                f"(train.batch_size {t.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps}); "
                f"fix: more data or a smaller batch"
            )
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            d = self.config.data
            order = epoch_order(self.train.sources, epoch, d.seed, d.source_weights or None)
            if d.length_bucketing:
                lengths = self.train.attention_mask.sum(dim=1)  # [N] real tokens per row
                order = bucket_by_length(
                    order, lengths, self.samples_per_step, d.bucket_window, d.seed, epoch
                )
            self._orders = {epoch: order}
        return self._orders[epoch]

    def position(self, step: int) -> tuple[int, int]:
        return step // self.steps_per_epoch, step % self.steps_per_epoch

    def rounds(self, step: int) -> list[Batch]:
        epoch, offset = self.position(step)
        order = self._order(epoch)
        start = offset * self.samples_per_step
        b = self.config.train.batch_size
        return [
            to_batch(self.train, order[start + r * b : start + (r + 1) * b])
            for r in range(self.config.train.gradient_accumulation_steps)
        ]
