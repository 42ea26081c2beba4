"""The progress display: rich on a terminal (steps, samples/s, ETA, phases, final table), plain lines elsewhere."""

from __future__ import annotations

import io
import logging

from orchestrator.progress import Progress

FINAL = {
    "label": "final",
    "step": 3,
    "metrics": {"judgment_accuracy": 0.7, "emotion_macro_f1": 0.2, "bentham_mae": 0.1, "regret_mae": 0.5},
    "baseline": {
        "baseline_judgment_accuracy": 0.6,
        "baseline_emotion_macro_f1": 0.4,
        "baseline_bentham_mae": 0.2,
        "baseline_regret_mae": 0.01,
    },
}


class _Text(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_not_a_terminal_gives_only_the_log_lines():
    stream = _Text()
    progress = Progress(3, "auto", stream=stream)
    assert not progress.bar
    progress.update(1, 2.5, 40.0)
    with progress.phase("evaluation"):
        progress.message("step 1/3 loss 2.5000")
    progress.summary(FINAL)
    progress.close()
    assert stream.getvalue() == "step 1/3 loss 2.5000\n"


def test_bar_shows_steps_rate_eta_phases_and_the_final_table():
    stream = _Text()
    progress = Progress(4, "bar", stream=stream)
    for step, rate in ((1, 40.0), (2, 60.0)):
        progress.update(step, 2.0 / step, rate)
    assert progress.samples_per_second == 0.3 * 60.0 + 0.7 * 40.0  # smoothed, not the last step's
    with progress.phase("checkpoint at step 2"):
        progress._live.refresh()
        during = stream.getvalue()
    progress.message("step 2/4 epoch 0 loss 1.0000")
    progress.summary(FINAL)
    progress.close()
    out = stream.getvalue()
    assert "checkpoint at step 2" in during and "2/4" in out and "samples/s" in out and "ETA" in out
    assert "step 2/4 epoch 0 loss 1.0000" in out
    table = out[out.index("validation (final, step 3)") :]
    for key in ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae"):
        assert key in table
    assert (
        table.count("worse") == 2 and table.count("better") == 2
    )  # F1 and regret MAE lose to their baselines


def test_log_records_go_through_the_display_and_the_handler_is_restored():
    stream = _Text()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(2, "bar", stream=stream)
        assert handler.stream is not stream
        logging.getLogger("orchestrator.test").warning("a record while the bar is up")
        progress.close()
        assert handler.stream is stream
        assert "a record while the bar is up" in stream.getvalue()
    finally:
        root.removeHandler(handler)


def test_a_resumed_run_starts_the_eta_clock_at_its_first_step():
    stream = _Text()
    progress = Progress(100, "bar", stream=stream)
    progress.update(51, 1.0, 10.0)  # resumed at step 50: one step done in this process
    task = progress._live.tasks[0]
    assert task.completed == 51 and sum(s.completed for s in task._progress) == 1
    progress.close()
