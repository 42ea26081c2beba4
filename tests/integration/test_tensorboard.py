"""metrics.tensorboard = true: the run's scalars in <output_dir>/tensorboard/, read back with TensorBoard."""

from __future__ import annotations

import pytest

from orchestrator import HybridConfig, HybridDistributedTrainer

pytestmark = pytest.mark.slow

HEADS = ("emotion", "bentham", "judgment", "regret")
METRICS = ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae")


def test_every_tag_is_in_the_event_files(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb-run"
    config = HybridConfig(
        model={"preset": "tiny"},
        max_steps=3,
        log_every_n_steps=2,
        save_checkpoint_every=0,
        data={"path": str(corpus), "max_scenarios": 120},
        metrics={"enabled": False, "tensorboard": True},
        regret={"address": "inprocess"},
        orchestrator={"output_dir": str(out), "progress": "log"},
    )
    report, _ = HybridDistributedTrainer(config).train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = (
        {
            "loss/total",
            "train/learning_rate",
            "train/grad_norm",
            "train/loss_scale",
            "train/samples_per_second",
            "pipeline/bubble/cpu",
            "pipeline/bubble/gpu",
        }
        | {f"loss/{h}" for h in HEADS}
        | {f"validation/{m}" for m in METRICS}
        | {f"baseline/{m}" for m in METRICS}
    )
    assert expected <= tags, sorted(expected - tags)
    # every step, not only the logged ones, and the values are the run's own
    total = events.Scalars("loss/total")
    assert [e.step for e in total] == [1, 2, 3]
    assert total[1].value == pytest.approx(report["loss_history"][0]["loss"], rel=1e-6)
    final = report["final_validation"]
    assert events.Scalars("validation/judgment_accuracy")[-1].value == pytest.approx(
        final["metrics"]["judgment_accuracy"]
    )
    assert events.Scalars("baseline/bentham_mae")[-1].value == pytest.approx(
        final["baseline"]["baseline_bentham_mae"]
    )
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("pipeline/bubble/gpu"))


def test_tensorboard_is_opt_in_and_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    from orchestrator.tensorboard import TensorBoardUnavailable, open_writer

    config = HybridConfig()
    assert config.metrics.tensorboard is False and open_writer(config, tmp_path) is None
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(TensorBoardUnavailable, match=r"redheart-hybrid\[tensorboard\]"):
        open_writer(HybridConfig(metrics={"tensorboard": True}), tmp_path)
    assert not (tmp_path / "tensorboard").exists()
