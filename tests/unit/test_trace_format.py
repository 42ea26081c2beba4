"""The pieces of the pipeline trace that need no processes: step ranges, clock offsets, the format."""

from __future__ import annotations

import pytest

from orchestrator.trace import TraceRecorder, measure_offset, parse_steps
from redheart.v1 import stage_pb2, tensor_pb2


def test_step_ranges():
    assert parse_steps("10-12") == (10, 12) and parse_steps(" 5 ") == (5, 5)
    for bad in ("0", "3-2", "a-b", "1-", ""):
        with pytest.raises(ValueError, match="e.g. 10-12"):
            parse_steps(bad)


def test_offset_keeps_the_sample_with_the_shortest_round_trip():
    # A remote clock 2.5 s ahead; round trips of 40, 2 and 30 ms, the short one asymmetric by 1 ms.
    samples = iter([(100.0, 102.52, 100.04), (200.0, 202.5015, 200.002), (300.0, 302.52, 300.03)] * 3)
    offset, rtt = measure_offset(lambda: next(samples))
    assert rtt == pytest.approx(0.002) and offset == pytest.approx(2.5005)
    assert abs(offset - 2.5) <= rtt / 2


def test_stage_spans_are_moved_onto_the_orchestrator_clock():
    rec = TraceRecorder((2, 2))
    rec.offsets["gpu stage"] = 10.0  # the stage's clock runs 10 s ahead
    plan = stage_pb2.StepPlan(envelope=tensor_pb2.Envelope(step=1))
    result = stage_pb2.StepResult(started_unix=1010.0)
    result.spans.add(action="F", micro_batch=0, start=0.5, end=0.75)
    result.spans.add(action="send activation", micro_batch=0, start=0.75, end=0.8, thread="sender")
    rec.stage_round("gpu stage", plan, result, 999.0, 1001.0)
    rec.stage_round(
        "gpu stage", stage_pb2.StepPlan(envelope=tensor_pb2.Envelope(step=2)), result, 0, 1
    )  # not traced
    events = {e["name"]: e for e in rec.events()}
    assert (
        events["forward mb0"]["start"] == pytest.approx(1000.5)
        and events["forward mb0"]["thread"] == "compute"
    )
    assert events["send activation mb0"]["thread"] == "sender"
    assert events["RunStep gpu stage"]["start"] == 999.0 and events["forward mb0"]["args"]["step"] == 2
    trace = rec.chrome_trace()
    x = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert x["RunStep gpu stage"]["ts"] == 0 and x["forward mb0"]["ts"] == pytest.approx(1.5e6)
    assert (
        x["forward mb0"]["dur"] == pytest.approx(0.25e6)
        and x["forward mb0"]["pid"] != x["RunStep gpu stage"]["pid"]
    )


def test_loss_png_has_a_validation_panel_beside_the_losses(tmp_path):
    import matplotlib.image

    from orchestrator.plots import plot_losses

    history = [
        {"step": s, "loss": 3.0 / s, "losses": {"emotion": 1.0 / s, "judgment": 2.0 / s}} for s in (1, 2, 3)
    ]
    validation = [
        {
            "step": s,
            "metrics": {"judgment_accuracy": 0.1 * s, "bentham_mae": 0.3 / s},
            "baseline": {"baseline_judgment_accuracy": 0.2, "baseline_bentham_mae": 0.25},
        }
        for s in (2, 3)
    ]
    plot_losses(history, tmp_path / "only.png")
    plot_losses(history, tmp_path / "both.png", validation)
    only, both = (matplotlib.image.imread(tmp_path / n) for n in ("only.png", "both.png"))
    assert only.shape[0] == both.shape[0] and both.shape[1] > 1.5 * only.shape[1]  # a second panel


def test_the_step_picture_draws_one_row_per_process_and_thread(tmp_path):
    import matplotlib.image

    from orchestrator.plots import plot_trace_step

    events = [
        {"name": n, "process": p, "thread": t, "start": a, "end": b, "args": {"step": 2, "micro_batch": 0}}
        for n, p, t, a, b in (
            ("forward mb0", "cpu stage", "compute", 0.0, 0.01),
            ("forward mb0", "gpu stage", "compute", 0.012, 0.02),
            ("send activation mb0", "cpu stage", "sender", 0.01, 0.011),
            ("step 2", "orchestrator", "MainThread", 0.0, 0.03),
        )
    ]
    assert plot_trace_step(events, 3, tmp_path / "none.png") is None  # no spans of that step
    path = plot_trace_step(events, 2, tmp_path / "two.png")
    assert matplotlib.image.imread(path).shape[0] > 200
