"""TensorBoard scalars of a run: ``metrics.tensorboard = true`` writes ``<output_dir>/tensorboard/``.

    tensorboard --logdir runs/        # compare runs side by side; each run directory is one run

Tags (step = optimizer steps done):

    loss/total, loss/<head>                         training loss, per head (emotion, bentham, judgment, regret)
    train/learning_rate, train/grad_norm            the schedule and the global gradient norm (before clipping)
    train/loss_scale                                fp16 dynamic loss scale (1 without fp16)
    train/samples_per_second, train/regret_mean     throughput and the regret service's mean score
    pipeline/bubble/<stage>                         share of the round a stage waited on its peer
    validation/<metric>, baseline/<metric>          each evaluation, and the trivial baseline beside it

The writer is optional (the `tensorboard` extra); asking for it without the package is refused
before the run starts, naming the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from redheart.heads import validation_metric_names

log = logging.getLogger(__name__)

VALIDATION_METRICS = validation_metric_names()  # the built-in heads' at import, for old imports


class TensorBoardUnavailable(RuntimeError):
    pass


class TensorBoardWriter:
    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardUnavailable(
                f"metrics.tensorboard = true needs the tensorboard package ({exc}); "
                "fix: pip install 'redheart-hybrid[tensorboard]', or set metrics.tensorboard = false"
            ) from None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.directory), flush_secs=10)

    def step(self, step: int, outcome: Any) -> None:
        """One optimizer step (an orchestrator.pipeline.StepOutcome); `step` counts steps done."""
        w = self._writer
        w.add_scalar("loss/total", outcome.total_loss, step)
        for head, value in outcome.losses.items():
            w.add_scalar(f"loss/{head}", value, step)
        w.add_scalar("train/learning_rate", outcome.learning_rate, step)
        w.add_scalar("train/grad_norm", outcome.grad_norm, step)
        w.add_scalar("train/loss_scale", outcome.loss_scale, step)
        w.add_scalar(
            "train/samples_per_second", outcome.samples / outcome.seconds if outcome.seconds else 0.0, step
        )
        w.add_scalar("train/regret_mean", outcome.regret_mean, step)
        for stage, t in outcome.stage_timings.items():
            # "cpu stage" -> "cpu": tag names without spaces
            w.add_scalar(
                f"pipeline/bubble/{stage.split()[0]}", t["wait"] / t["total"] if t.get("total") else 0.0, step
            )

    def validation(self, entry: dict[str, Any]) -> None:
        """One evaluation entry of the trainer: {"step", "metrics", "baseline", ...}."""
        step = int(entry.get("step", 0))
        for key in validation_metric_names():
            if key in entry["metrics"]:
                self._writer.add_scalar(f"validation/{key}", entry["metrics"][key], step)
            if f"baseline_{key}" in entry["baseline"]:
                self._writer.add_scalar(f"baseline/{key}", entry["baseline"][f"baseline_{key}"], step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def open_writer(config, output_dir: Path) -> TensorBoardWriter | None:
    """The run's writer, or None when metrics.tensorboard is off."""
    if not config.metrics.tensorboard:
        return None
    return TensorBoardWriter(Path(output_dir) / "tensorboard")
