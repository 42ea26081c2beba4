"""Encoded scenario tensors, the train/validation split, per-epoch row order and batch counting.

Everything here is deterministic and independent of process state (no Python ``hash``, no global
RNG), so a resumed run — or the CPU and GPU stages in different processes — see the same rows in
the same order from (seed, epoch) alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from tokenizers import Tokenizer

from redheart import heads as head_registry
from redheart.data.schema import DataError, Scenario
from redheart.data.tokenizer import encode_texts

__all__ = [
    "IGNORE_INDEX",
    "LABEL_KEYS",  # noqa: F822  (module __getattr__ below)
    "EncodedDataset",
    "encode_dataset",
    "split_train_validation",
    "epoch_order",
    "bucket_by_length",
    "batches_per_epoch",
    "trimmed_length",
]

IGNORE_INDEX = head_registry.IGNORE_INDEX
"""Judgment target for unlabeled rows; ``torch.nn.functional.cross_entropy``'s default ignore_index."""


def __getattr__(name: str) -> object:
    """``LABEL_KEYS``: keys of :meth:`EncodedDataset.labels` (and of the label tensors sent with a
    micro-batch), i.e. :func:`redheart.heads.label_keys`. Read when asked, not at import: the
    registry's built-in heads import the schema, whose package imports this module."""
    if name == "LABEL_KEYS":
        return head_registry.label_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Indices = Sequence[int] | torch.Tensor


@dataclass
class EncodedDataset:
    """A tokenized corpus with dense label tensors and masks (N rows, sequence length L).

    Missing labels are zero-filled (emotions, bentham) or ``IGNORE_INDEX`` (judgment) and flagged
    by the masks, so every row has the same tensor layout and losses can mask per head. The label
    tensors are those the head registry (redheart/heads.py) describes: the built-in heads' have
    their own fields below, those of heads registered beyond them are in ``extra_labels``.

    Attributes:
        ids: scenario ids, length N.
        sources: source name per row, length N (for per-source weights).
        input_ids: LongTensor [N, L], ``[CLS]`` + tokens + ``PAD_ID`` padding.
        attention_mask: LongTensor [N, L], 1 = real token.
        emotions: FloatTensor [N, 6] in EMOTIONS order, zeros where missing.
        emotions_mask: BoolTensor [N], True where emotions are labeled.
        bentham: FloatTensor [N, 8] in BENTHAM_KEYS order, zeros where missing.
        bentham_mask: BoolTensor [N], True where bentham is labeled.
        judgment: LongTensor [N], class index or -100 where missing.
        truncated: how many texts were cut to fit L (informational).
        truncated_mask: optional BoolTensor [N], True for rows that were cut (keeps ``truncated``
            exact through :meth:`subset`).
        extra_labels: label tensors of registered heads other than the built-in ones, by label key
            (``labels.<name>``), each [N, *per-row shape].
    """

    ids: list[str]
    sources: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    emotions: torch.Tensor
    emotions_mask: torch.Tensor
    bentham: torch.Tensor
    bentham_mask: torch.Tensor
    judgment: torch.Tensor
    truncated: int = 0
    truncated_mask: torch.Tensor | None = None
    extra_labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        expected = {
            "sources": (len(self.sources),),
            "input_ids": tuple(self.input_ids.shape[:1]),
            "attention_mask": tuple(self.attention_mask.shape[:1]),
        }
        wanted = {"sources": (n,), "input_ids": (n,), "attention_mask": (n,)}
        for spec in head_registry.heads():
            for label in spec.labels:
                tensor = self._label_or_none(label.key)
                if tensor is not None:
                    expected[_label_name(label.key)] = tuple(tensor.shape)
                    wanted[_label_name(label.key)] = (n, *label.shape)
        for name, shape in expected.items():
            if shape != wanted[name]:
                raise ValueError(
                    f"EncodedDataset.{name} has shape {shape}, expected {wanted[name]} for {n} rows"
                )
        if self.truncated_mask is not None and tuple(self.truncated_mask.shape) != (n,):
            raise ValueError(
                f"EncodedDataset.truncated_mask has shape {tuple(self.truncated_mask.shape)}, expected ({n},)"
            )
        if self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must have the same shape"
            )

    def _label_or_none(self, key: str) -> torch.Tensor | None:
        """The tensor of label ``key``: a built-in field, else ``extra_labels`` (None: not built)."""
        name = key.removeprefix("labels.")
        if name in _BUILTIN_LABEL_FIELDS:
            return getattr(self, name)
        return self.extra_labels.get(key)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_length(self) -> int:
        """Sequence length L."""
        return int(self.input_ids.shape[1])

    def subset(self, indices: Indices) -> EncodedDataset:
        """Rows ``indices`` (in that order; repeats allowed) as a new dataset (tensors are copies)."""
        index = _as_index(indices, len(self))
        rows = index.tolist()
        return EncodedDataset(
            ids=[self.ids[i] for i in rows],
            sources=[self.sources[i] for i in rows],
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            **{name: getattr(self, name)[index] for name in _BUILTIN_LABEL_FIELDS},
            truncated=int(self.truncated_mask[index].sum()) if self.truncated_mask is not None else 0,
            truncated_mask=None if self.truncated_mask is None else self.truncated_mask[index],
            extra_labels={key: tensor[index] for key, tensor in self.extra_labels.items()},
        )

    def labels(self, indices: Indices) -> dict[str, torch.Tensor]:
        """Label tensors for rows ``indices``, keyed by :func:`redheart.heads.label_keys`.

        Returns:
            ``labels.emotions`` [B, 6] float, ``labels.emotions_mask`` [B] bool,
            ``labels.bentham`` [B, 8] float, ``labels.bentham_mask`` [B] bool,
            ``labels.judgment`` [B] long (-100 = unlabeled), then registered heads' labels.
        """
        index = _as_index(indices, len(self))
        out = {}
        for key in head_registry.label_keys():
            tensor = self._label_or_none(key)
            if tensor is None:
                raise KeyError(f"this dataset was encoded before head label {key!r} was registered")
            out[key] = tensor[index]
        return out


_NOT_LABELS = ("ids", "sources", "input_ids", "attention_mask", "truncated", "truncated_mask", "extra_labels")
_BUILTIN_LABEL_FIELDS = tuple(f.name for f in fields(EncodedDataset) if f.name not in _NOT_LABELS)
"""The label fields of :class:`EncodedDataset` (emotions ... judgment), holding ``labels.<field>``."""


def _label_name(key: str) -> str:
    name = key.removeprefix("labels.")
    return name if name in _BUILTIN_LABEL_FIELDS else f"extra_labels[{key!r}]"


def _as_index(indices: Indices, n: int) -> torch.Tensor:
    """Validate row indices into a LongTensor [B]; negative or out-of-range indices are errors."""
    index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)  # [B]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise IndexError(
            f"row indices must be in [0, {n}), got min {int(index.min())} max {int(index.max())}"
        )
    return index


def encode_dataset(scenarios: Sequence[Scenario], tokenizer: Tokenizer, max_length: int) -> EncodedDataset:
    """Tokenize scenarios and build dense label tensors with masks.

    Args:
        scenarios: validated scenarios (e.g. ``load_jsonl(...).scenarios``).
        tokenizer: from ``train_tokenizer`` / ``load_tokenizer``.
        max_length: sequence length L including ``[CLS]``.
    """
    encoded = encode_texts(tokenizer, [s.text for s in scenarios], max_length)
    tensors = label_tensors(scenarios)
    builtin = {name: tensors.pop("labels." + name) for name in _BUILTIN_LABEL_FIELDS}
    return EncodedDataset(
        ids=[s.id for s in scenarios],
        sources=[s.source for s in scenarios],
        input_ids=encoded.input_ids,
        attention_mask=encoded.attention_mask,
        **builtin,
        truncated=encoded.truncated,
        truncated_mask=encoded.truncated_mask,
        extra_labels=tensors,
    )


def label_tensors(scenarios: Sequence[Scenario]) -> dict[str, torch.Tensor]:
    """Every registered head's label tensors for ``scenarios``, from its label spec: the value
    ``[N, *shape]`` (``fill`` where the scenario has no label) and, if it has one, its mask [N]."""
    n = len(scenarios)
    out: dict[str, torch.Tensor] = {}
    for spec in head_registry.heads():
        if not spec.labels or spec.read is None:
            continue
        values = [spec.read(s) for s in scenarios]
        for label in spec.labels:
            if label.is_mask:
                out[label.key] = torch.tensor([v is not None for v in values], dtype=torch.bool)
                continue
            size = math.prod(label.shape)
            missing = label.fill if not label.shape else (label.fill,) * size
            rows = [missing if v is None else v for v in values]
            out[label.key] = torch.tensor(rows, dtype=label.dtype).reshape(n, *label.shape)
    return out


def _unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from sha256 of the parts: stable across processes and versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_train_validation(
    scenarios: Sequence[Scenario], validation_fraction: float, seed: int
) -> tuple[list[Scenario], list[Scenario]]:
    """Split by a per-id hash: a scenario is in validation iff sha256(seed, id) < fraction.

    Because the decision depends only on (seed, id), adding or removing other scenarios never
    moves an existing one between train and validation (no leakage when a corpus grows), and file
    order is kept within each split. The validation size is ``fraction`` of N only in expectation.
    One exception for tiny corpora: if the fraction is positive but no id hashed into validation,
    the single lowest-hash scenario is moved there, so evaluation always has a row.

    Raises:
        ValueError: fraction outside [0, 1).
        DataError: no training rows would remain.
    """
    if not 0.0 <= float(validation_fraction) < 1.0 or math.isnan(validation_fraction):
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if not scenarios:
        return [], []
    scores = [_unit_hash("split", seed, s.id) for s in scenarios]
    in_val = [score < validation_fraction for score in scores]
    if validation_fraction > 0 and not any(in_val) and len(scenarios) > 1:
        in_val[min(range(len(scores)), key=scores.__getitem__)] = True
    train = [s for s, v in zip(scenarios, in_val) if not v]
    validation = [s for s, v in zip(scenarios, in_val) if v]
    if not train:
        raise DataError(
            f"validation_fraction {validation_fraction} left no training scenarios out of {len(scenarios)}; "
            "lower it or add data"
        )
    return train, validation


def _generator_for(seed: int, epoch: int) -> torch.Generator:
    # Hash (seed, epoch) rather than e.g. seed + epoch, so (seed=1, epoch=0) and (seed=0, epoch=1)
    # do not produce the same order.
    g = torch.Generator()
    g.manual_seed(int(_unit_hash("epoch", seed, epoch) * 2**63))
    return g


def epoch_order(
    sources: Sequence[str],
    epoch: int,
    seed: int,
    source_weights: Mapping[str, float] | None = None,
) -> list[int]:
    """Row indices to visit in ``epoch``: deterministic in (sources, epoch, seed, weights).

    Without weights (or with equal weights for all eligible sources) this is a permutation of the
    eligible rows: each row exactly once per epoch.

    With unequal ``source_weights``, each row is drawn with probability proportional to its
    source's weight (sources not listed weigh 1.0; weight 0 excludes the source), **with
    replacement**, as many draws as there are eligible rows. So the epoch length stays "the
    eligible data size", and a source of weight 2 is seen about twice as often per row as one of
    weight 1 (some of its rows twice, some rows of lighter sources not at all in that epoch). The
    weight is per row: a source's share of the epoch also grows with its size.

    Raises:
        DataError: a weight names an unknown source (the message lists the known ones), a weight is
            negative or not finite, or every row is excluded.
    """
    n = len(sources)
    g = _generator_for(seed, epoch)
    if source_weights is None or n == 0:
        return torch.randperm(n, generator=g).tolist()

    known = sorted(set(sources))
    unknown = sorted(k for k in source_weights if k not in set(known))
    if unknown:
        raise DataError(
            f"source_weights names unknown source(s) {', '.join(unknown)}; known sources: {', '.join(known)}"
        )
    for name, weight in source_weights.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise DataError(f"source_weights[{name!r}] = {weight!r}, must be a finite number >= 0")

    row_weight = torch.tensor(
        [float(source_weights.get(s, 1.0)) for s in sources], dtype=torch.float64
    )  # [N]
    eligible = torch.nonzero(row_weight > 0).flatten()  # [E]
    if eligible.numel() == 0:
        raise DataError(
            "source_weights exclude every source (all weights are 0); give at least one a weight > 0"
        )
    weights = row_weight[eligible]  # [E]
    if bool((weights == weights[0]).all()):
        # Equal weights: sampling with replacement would only add noise; visit each row once.
        return eligible[torch.randperm(eligible.numel(), generator=g)].tolist()
    draws = torch.multinomial(weights, eligible.numel(), replacement=True, generator=g)  # [E]
    return eligible[draws].tolist()


def bucket_by_length(
    order: Sequence[int],
    lengths: torch.Tensor,
    step_samples: int,
    window_steps: int,
    seed: int,
    epoch: int,
) -> list[int]:
    """``order`` regrouped so that each optimizer step holds samples of similar length.

    The epoch's order is cut into windows of ``window_steps x step_samples`` rows; each window is
    sorted by token length (stable: ties keep their shuffled order), cut into steps, and its steps are
    shuffled with a generator of (seed, epoch), so training does not walk from short to long texts.
    The same rows are visited, only grouped differently; a pure function of its arguments, so a
    resumed run and ``--verify`` see exactly the same steps. Rows past the last full step stay at the
    end, where the epoch drops them (:func:`batches_per_epoch`).

    Args:
        order: row indices of the epoch (from :func:`epoch_order`).
        lengths: LongTensor [N], real tokens per row.
        step_samples: rows per optimizer step (batch_size x gradient_accumulation_steps).
        window_steps: optimizer steps per window.
    """
    if step_samples < 1 or window_steps < 1:
        raise ValueError(f"step_samples ({step_samples}) and window_steps ({window_steps}) must be >= 1")
    g = torch.Generator()
    g.manual_seed(int(_unit_hash("bucket", seed, epoch) * 2**63))
    full = len(order) // step_samples * step_samples
    rows = torch.as_tensor(list(order[:full]), dtype=torch.long)  # [full]
    window = window_steps * step_samples
    out: list[int] = []
    for start in range(0, full, window):
        chunk = rows[start : start + window]  # [W]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]  # [W], shortest first
        steps = chunk.view(-1, step_samples)  # [W / step_samples, step_samples]
        steps = steps[torch.randperm(steps.shape[0], generator=g)]
        out.extend(steps.flatten().tolist())
    out.extend(order[full:])
    return out


def trimmed_length(attention_mask: torch.Tensor, multiple: int) -> int:
    """Width a micro-batch of right-padded rows is cut to: its longest row, rounded up to
    ``multiple`` (0: no cut). Shared by the pipeline, the reference and ``redheart-evaluate``, so
    they all compute on the same shapes."""
    full = attention_mask.shape[1]
    if multiple <= 0 or attention_mask.numel() == 0:
        return full
    longest = int(attention_mask.sum(dim=1).max())  # real tokens of the longest row
    return min(full, max(multiple, math.ceil(longest / multiple) * multiple))


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    """Full batches in an epoch of ``n_rows``; the last incomplete batch is dropped.

    Why drop it: an optimizer step is split into a fixed number of equal micro-batches on the
    pipeline, and the per-micro-batch loss scale (1 / (micro-batches × accumulation steps)) assumes
    they are all the same size. A short last batch would weigh its rows more than the others and
    make the pipelined step differ from the single-process one. The dropped rows are different
    each epoch because the order is reshuffled.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"n_rows must be a non-negative integer, got {n_rows!r}")
    return n_rows // batch_size
