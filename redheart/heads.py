"""The one registry of the model's heads: every fact about a head is written here, once.

Per head (:class:`HeadSpec`): its name (the module and parameter name ``heads.<name>.*``), its
output key and size (from the schema's vocabularies), the label tensors it reads (key, per-row
shape, dtype, fill value of a row without the label), where its target comes from (the dataset's
labels, or the regret service at train time), its loss, its validation metric(s) with the names they
are reported under, and the trivial, text-blind baseline the report compares them with.

The model builds its head modules from the registry, the losses, the dataset's label tensors, the
GPU stage's input checks, the orchestrator's label keys, the metrics, the evaluation and the report
iterate it. Adding a head means adding one :class:`HeadSpec` (here, or with :func:`register_head` /
:func:`registered_head` from a test): nothing else names heads.

The four built-in heads are built on first use, not at import: ``redheart.data`` (whose schema holds
the vocabularies) imports this module, so reading the schema here at import time would be a cycle.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from redheart.data.schema import Scenario

__all__ = [
    "IGNORE_INDEX",
    "LABELS",
    "REGRET_SERVICE",
    "LabelSpec",
    "MetricSpec",
    "HeadSpec",
    "HeadRegistry",
    "HEADS",
    "heads",
    "get_head",
    "head_names",
    "label_keys",
    "validation_metrics",
    "validation_metric_names",
    "register_head",
    "unregister_head",
    "registered_head",
    "probe_labels",
    "regret_service_targets",
]

IGNORE_INDEX = -100
"""Class target of an unlabeled row; ``torch.nn.functional.cross_entropy``'s default ignore_index."""

LABELS = "labels"
"""Target source: the head's labels come with the data (``labels.*`` tensors of each micro-batch)."""
REGRET_SERVICE = "regret service"
"""Target source: the target is computed at train time by the regret service (the GPU stage asks
for it, scoring the detached Bentham prediction) and arrives under the head's ``target_key``."""

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Mapping[str, Tensor], "int | None"], "Tensor | None"]
MetricFn = Callable[[Tensor, Mapping[str, Tensor], int], dict[str, float]]
BaselineFn = Callable[[Mapping[str, Tensor], int], "dict[str, Tensor] | None"]


@dataclass(frozen=True)
class LabelSpec:
    """One label tensor of a head: ``[N, *shape]`` of ``dtype``; rows without the label hold ``fill``.

    A mask label (``is_mask``) is a BoolTensor [N], True where the head's label is present.
    ``classes``: for a class-index label, the number of classes (values in ``[0, classes)`` or fill).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | int | bool
    is_mask: bool = False
    classes: int | None = None


@dataclass(frozen=True)
class MetricSpec:
    """A validation metric as reported (report.json, gauges, tables); ``higher``: higher is better."""

    name: str
    higher: bool


@dataclass(frozen=True)
class HeadSpec:
    """Everything about one head (see the module docstring; the built-in four: redheart/builtin_heads.py).

    Attributes:
        name: module / parameter name (``heads.<name>.weight``) and key of its loss and weight.
        output: key of the head's output in the model's output dict.
        size: output units of the head's linear layer.
        kind, vocabulary: what its outputs mean (exported to the model folder's config.json).
        activation: applied to the linear layer's output [B, size] (None: raw logits).
        labels: its label tensors, in the order they travel with a micro-batch.
        read: a scenario's label value (a number or a row of ``size``), None when it has none.
        target: :data:`LABELS` or :data:`REGRET_SERVICE`.
        target_key: key of a :data:`REGRET_SERVICE` head's target in the labels given to its loss
            and metric.
        loss: ``(output [B, ...] fp32, labels, count) -> scalar`` or None when no row is labeled.
        count: samples carrying its label, from host label tensors (None: not counted).
        metrics: the validation metrics ``metric`` returns.
        metric: ``(prediction [N, ...], labels, N) -> {metric name: value}`` over labeled rows.
        baseline: ``(train labels, N validation rows) -> {candidate name: constant prediction}``;
            None when train has no label. One candidate is named ``""``; several are each reported
            as ``baseline_<metric>_<name>`` and the best of them as ``baseline_<metric>``.
        forward_order: position of its layer in the forward. It fixes the order autograd sums the
            heads' gradients into the pooled vector, so it decides the last bits of every gradient
            below the heads: Bentham has always been applied first, the others in model order.
        report_order: position of its metrics in reports (judgment's accuracy has come first since
            the first report; new heads go after the built-in ones).
        default_weight: its loss weight when ``train.loss_weights`` does not name it.
    """

    name: str
    output: str
    size: int
    kind: str
    vocabulary: tuple[str, ...]
    loss: LossFn
    metric: MetricFn
    metrics: tuple[MetricSpec, ...]
    baseline: BaselineFn
    labels: tuple[LabelSpec, ...] = ()
    read: Callable[[Scenario], Any] | None = None
    activation: Callable[[Tensor], Tensor] | None = None
    target: str = LABELS
    target_key: str = ""
    count: Callable[[Mapping[str, Tensor]], int] | None = None
    forward_order: int = 100
    report_order: int = 100
    default_weight: float = 1.0

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Keys its loss and metric read from the labels."""
        return (self.target_key,) if self.target == REGRET_SERVICE else tuple(s.key for s in self.labels)


# Attributes of the GPU stage module a head's layer would shadow, and the loss gauge's "total".
_RESERVED = frozenset({"stack", "norm", "pooler", "shape", "head_specs", "forward", "training", "total"})


class HeadRegistry:
    """The ordered heads. Iterating it yields :class:`HeadSpec` in model order."""

    def __init__(self, builtin: Callable[[], Sequence[HeadSpec]]) -> None:
        self._builtin = builtin
        self._specs: list[HeadSpec] | None = None
        self._lock = threading.RLock()

    def heads(self) -> tuple[HeadSpec, ...]:
        with self._lock:
            if self._specs is None:
                self._specs = list(self._builtin())
            return tuple(self._specs)

    def __iter__(self) -> Iterator[HeadSpec]:
        return iter(self.heads())

    def __len__(self) -> int:
        return len(self.heads())

    def __getitem__(self, name: str) -> HeadSpec:
        for spec in self.heads():
            if spec.name == name:
                return spec
        raise KeyError(f"no head named {name!r}; heads: {', '.join(s.name for s in self.heads())}")

    def register(self, spec: HeadSpec) -> HeadSpec:
        """Add a head after the existing ones; its name, output and label keys must be new."""
        with self._lock:
            current = self.heads()
            if not spec.name.isidentifier() or spec.name in _RESERVED:
                raise ValueError(
                    f"head name {spec.name!r} must be an identifier and not one of {sorted(_RESERVED)}"
                )
            taken_keys = {k for s in current for k in s.input_keys}
            for other in current:
                if spec.name == other.name or spec.output == other.output:
                    raise ValueError(f"head {spec.name!r}: name or output {spec.output!r} already registered")
            clash = taken_keys.intersection(spec.input_keys)
            if clash:
                raise ValueError(f"head {spec.name!r}: label key(s) {sorted(clash)} already registered")
            assert self._specs is not None
            self._specs.append(spec)
            return spec

    def unregister(self, name: str) -> HeadSpec:
        with self._lock:
            spec = self[name]
            assert self._specs is not None
            self._specs.remove(spec)
            return spec

    @contextlib.contextmanager
    def registered(self, spec: HeadSpec) -> Iterator[HeadSpec]:
        """``with registry.registered(spec):`` the head exists inside the block only."""
        self.register(spec)
        try:
            yield spec
        finally:
            self.unregister(spec.name)


def _builtin_heads() -> list[HeadSpec]:
    from redheart.builtin_heads import builtin_heads

    return builtin_heads()


HEADS = HeadRegistry(_builtin_heads)
"""The process's registry: emotion, bentham, judgment, regret, then any registered head."""


def heads() -> tuple[HeadSpec, ...]:
    """The registered heads, in model order."""
    return HEADS.heads()


def get_head(name: str) -> HeadSpec:
    return HEADS[name]


def head_names() -> tuple[str, ...]:
    """``("emotion", "bentham", "judgment", "regret")`` plus registered heads."""
    return tuple(s.name for s in HEADS)


def label_keys() -> tuple[str, ...]:
    """Keys of the label tensors sent with a micro-batch (dataset labels; not regret targets)."""
    return tuple(label.key for s in HEADS for label in s.labels)


def validation_metrics() -> tuple[MetricSpec, ...]:
    """Every head's validation metrics in report order."""
    ordered = sorted(HEADS.heads(), key=lambda s: s.report_order)  # stable: ties keep model order
    return tuple(m for s in ordered for m in s.metrics)


def validation_metric_names() -> tuple[str, ...]:
    """``("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae")`` plus registered."""
    return tuple(m.name for m in validation_metrics())


def register_head(spec: HeadSpec) -> HeadSpec:
    return HEADS.register(spec)


def unregister_head(name: str) -> HeadSpec:
    return HEADS.unregister(name)


def registered_head(spec: HeadSpec):
    """Context manager: the head is registered inside the ``with`` block only."""
    return HEADS.registered(spec)


def regret_service_targets() -> bool:
    """Whether some head's target comes from the regret service (else nobody needs to ask it)."""
    return any(spec.target == REGRET_SERVICE for spec in HEADS)


def probe_labels(rows: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every head's label tensors for ``rows`` rows, all labeled with zeros (masks True): inputs of
    the right shapes and dtypes for timing probes."""
    out = {}
    for spec in HEADS:
        for label in spec.labels:
            if label.is_mask:
                out[label.key] = torch.ones(rows, dtype=torch.bool, device=device)
            else:
                out[label.key] = torch.zeros(rows, *label.shape, dtype=label.dtype, device=device)
    return out


def class_label(key: str, classes: int) -> LabelSpec:
    """A class-index label [N] (long), IGNORE_INDEX where missing."""
    return LabelSpec(key, (), torch.long, IGNORE_INDEX, classes=classes)


def masked_labels(key: str, size: int) -> tuple[LabelSpec, LabelSpec]:
    """A float label row [N, size] (zeros where missing) and its mask ``<key>_mask`` [N]."""
    return (
        LabelSpec(key, (size,), torch.float32, 0.0),
        LabelSpec(key + "_mask", (), torch.bool, False, is_mask=True),
    )
