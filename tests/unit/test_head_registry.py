"""The head registry (redheart/heads.py): what it derives equals today's literals, and a toy head
defined through the registry alone is built, labeled, trained, evaluated and removed again."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F

from orchestrator.data import to_batch
from orchestrator.reference import SingleProcessTrainer
from orchestrator.stages import plan_inputs
from redheart import heads as registry
from redheart.config import ConfigError, ModelConfig, load_config
from redheart.data import baseline_metrics, compute_metrics, encode_dataset, load_jsonl, train_tokenizer
from redheart.heads import HeadSpec, MetricSpec, class_label
from redheart.losses import label_counts, multitask_loss
from redheart.model import GpuStageModule, resolve_model_shape

FOUR_HEADS = ("emotion", "bentham", "judgment", "regret")
FOUR_LABEL_KEYS = (
    "labels.emotions",
    "labels.emotions_mask",
    "labels.bentham",
    "labels.bentham_mask",
    "labels.judgment",
)
FOUR_METRICS = ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae")
FOUR_HEAD_PARAMETERS = [f"heads.{m}.{p}" for m in ("norm", "pooler", *FOUR_HEADS) for p in ("weight", "bias")]


def test_registry_derives_todays_literals() -> None:
    from gpu_stage import logic
    from orchestrator import metrics, plots, progress, tensorboard
    from redheart import model
    from redheart.data import LABEL_KEYS, dataset, evaluation

    assert registry.head_names() == FOUR_HEADS == model.HEADS
    assert registry.label_keys() == FOUR_LABEL_KEYS == LABEL_KEYS == dataset.LABEL_KEYS
    assert logic.round_keys() == ("attention_mask", *FOUR_LABEL_KEYS) == plan_inputs(1, 2)
    assert plan_inputs(0, 2) == ("input_ids", "attention_mask")
    assert plan_inputs(1, 3) == ("attention_mask",)  # a middle stage
    assert registry.validation_metric_names() == FOUR_METRICS == evaluation.METRIC_KEYS
    assert metrics.VALIDATION_METRICS == plots.VALIDATION_METRICS == tensorboard.VALIDATION_METRICS
    assert metrics.HEADS == (*FOUR_HEADS, "total")
    assert progress.METRICS == (
        ("judgment_accuracy", True),
        ("emotion_macro_f1", True),
        ("bentham_mae", False),
        ("regret_mae", False),
    )
    assert [s.size for s in registry.heads()] == [6, 8, 5, 1]
    assert [s.output for s in registry.heads()] == ["emotion_logits", "bentham", "judgment_logits", "regret"]
    assert [s.target for s in registry.heads()] == [registry.LABELS] * 3 + [registry.REGRET_SERVICE]
    assert (model.NUM_EMOTIONS, model.NUM_BENTHAM, model.NUM_JUDGMENTS) == (6, 8, 5)


def test_four_head_model_layout() -> None:
    gpu = GpuStageModule(resolve_model_shape(ModelConfig(preset="tiny")))
    names = [n for n, _ in gpu.global_named_parameters() if n.startswith("heads.")]
    assert names == FOUR_HEAD_PARAMETERS


# ----------------------------------------------------------------------------- the toy head

LONG_WORDS = (
    30  # a text of more than 30 words (about the median) is "long": a 2-class label every scenario has
)


def _toy_loss(logits: torch.Tensor, labels: Mapping[str, torch.Tensor], count: int | None):
    target = labels["labels.long_text"].long()
    if not bool((target != registry.IGNORE_INDEX).any()):
        return None
    return F.cross_entropy(logits, target, ignore_index=registry.IGNORE_INDEX)


def _toy_metric(pred: torch.Tensor, labels: Mapping[str, torch.Tensor], n: int) -> dict[str, float]:
    target = labels["labels.long_text"].long()
    keep = target != registry.IGNORE_INDEX
    if not bool(keep.any()):
        return {}
    return {"long_text_accuracy": float((pred[keep].argmax(1) == target[keep]).double().mean())}


def _toy_baseline(train: Mapping[str, torch.Tensor], n: int):
    if "labels.long_text" not in train:
        return None
    target = train["labels.long_text"].long()
    target = target[target != registry.IGNORE_INDEX]
    if not target.numel():
        return None
    logits = torch.zeros(n, 2)
    logits[:, int(torch.bincount(target, minlength=2).argmax())] = 1.0
    return {"": logits}


TOY = HeadSpec(
    name="long_text",
    output="long_text_logits",
    size=2,
    kind="class",
    vocabulary=("short", "long"),
    labels=(class_label("labels.long_text", 2),),
    read=lambda s: int(len(s.text.split()) > LONG_WORDS),
    loss=_toy_loss,
    count=lambda labels: int((labels["labels.long_text"] != registry.IGNORE_INDEX).sum()),
    metrics=(MetricSpec("long_text_accuracy", higher=True),),
    metric=_toy_metric,
    baseline=_toy_baseline,
    default_weight=3.0,
)


@pytest.fixture
def tiny(tiny_toml):
    cfg = load_config(tiny_toml, overrides=['regret.address="inprocess"'], env={})
    scenarios = load_jsonl(cfg.data.path).scenarios[:64]
    shape = resolve_model_shape(cfg.model)
    tokenizer = train_tokenizer((s.text for s in scenarios), vocab_size=shape.vocab_size)
    return cfg, scenarios, tokenizer, shape.max_seq_len, tiny_toml


def test_toy_head_trains_one_step_through_the_registry_alone(tiny) -> None:
    cfg, scenarios, tokenizer, max_len, path = tiny
    four_heads = SingleProcessTrainer(cfg).named_parameters()
    with registry.registered_head(TOY):
        assert registry.head_names() == (*FOUR_HEADS, "long_text")
        assert registry.label_keys() == (*FOUR_LABEL_KEYS, "labels.long_text")
        assert registry.validation_metric_names() == (*FOUR_METRICS, "long_text_accuracy")
        # The last stage's plan carries the new head's labels; the first stage's does not.
        assert plan_inputs(1, 2) == ("attention_mask", *FOUR_LABEL_KEYS, "labels.long_text")
        assert plan_inputs(0, 2) == ("input_ids", "attention_mask")

        data = encode_dataset(scenarios, tokenizer, max_len)
        want = torch.tensor([int(len(s.text.split()) > LONG_WORDS) for s in scenarios])
        assert torch.equal(data.extra_labels["labels.long_text"], want)
        assert 0 < int(want.sum()) < len(want)  # both classes occur: the head has something to learn
        batch = to_batch(data, list(range(cfg.train.batch_size)))
        assert "labels.long_text" in batch.tensors

        trainer = SingleProcessTrainer(cfg)
        # Weights are initialised by name: the toy head changes none of the four-head model's.
        initial = trainer.named_parameters()
        assert list(initial) == [*four_heads, "heads.long_text.weight", "heads.long_text.bias"]
        assert all(torch.equal(initial[n], p) for n, p in four_heads.items())
        toy_weight = trainer.gpu.long_text.weight
        before = toy_weight.detach().clone()
        grads: list[torch.Tensor] = []
        toy_weight.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.detach().clone()))
        result = trainer.step(0, [batch], 1e-2)

        assert "long_text" in result["losses"] and result["losses"]["long_text"] > 0
        assert grads and bool(grads[-1].abs().sum() > 0), "the toy head got no gradient"
        assert not torch.equal(toy_weight.detach(), before), "the optimizer step did not change the toy head"

        # The total loss includes the toy head with its spec's default weight (3.0).
        trainer.gpu.eval()
        trainer.cpu.eval()
        with torch.no_grad():
            mb = batch.slice(0, cfg.train.micro_batch_size).tensors
            outputs = trainer.gpu(trainer.cpu(mb["input_ids"], mb["attention_mask"]), mb["attention_mask"])
            labels = {k: mb[k] for k in registry.label_keys()}
            total, parts = multitask_loss(outputs, labels, None)
            without = sum(v for k, v in parts.items() if k != "long_text")  # weights 1 (none given)
        assert outputs["long_text_logits"].shape == (cfg.train.micro_batch_size, 2)
        assert label_counts(labels)["long_text"] == cfg.train.micro_batch_size
        assert float(total) == pytest.approx(without + 3.0 * parts["long_text"], rel=1e-6)

        # Evaluation reports the toy head's metric and its trivial baseline.
        pred = {k: v.float() for k, v in outputs.items()}
        assert "long_text_accuracy" in compute_metrics(pred, labels)
        assert "baseline_long_text_accuracy" in baseline_metrics(labels, labels)

        # The config's loss_weights check knows the registered head.
        load_config(path, overrides=["train.loss_weights={long_text=2.0}"], env={})

    # Unregistered: the four-head model, labels and config check are back.
    assert registry.head_names() == FOUR_HEADS
    assert registry.label_keys() == FOUR_LABEL_KEYS
    after = SingleProcessTrainer(cfg).named_parameters()
    assert [n for n in after if n.startswith("heads.")] == FOUR_HEAD_PARAMETERS
    assert list(after) == list(four_heads) and all(torch.equal(after[n], p) for n, p in four_heads.items())
    with pytest.raises(ConfigError, match="unknown head `long_text`"):
        load_config(path, overrides=["train.loss_weights={long_text=2.0}"], env={})


def test_register_rejects_clashes() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register_head(HeadSpec(**{**TOY.__dict__, "name": "emotion"}))
    with pytest.raises(ValueError, match="identifier"):
        registry.register_head(HeadSpec(**{**TOY.__dict__, "name": "pooler"}))
    with registry.registered_head(TOY):
        with pytest.raises(ValueError, match="label key"):
            registry.register_head(HeadSpec(**{**TOY.__dict__, "name": "other", "output": "other"}))
    assert registry.head_names() == FOUR_HEADS
