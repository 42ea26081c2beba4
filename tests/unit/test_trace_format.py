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
    rec.stage_round("gpu stage", stage_pb2.StepPlan(envelope=tensor_pb2.Envelope(step=2)), result, 0, 1)  # not traced
    events = {e["name"]: e for e in rec.events()}
    assert events["forward mb0"]["start"] == pytest.approx(1000.5) and events["forward mb0"]["thread"] == "compute"
    assert events["send activation mb0"]["thread"] == "sender"
    assert events["RunStep gpu stage"]["start"] == 999.0 and events["forward mb0"]["args"]["step"] == 2
    trace = rec.chrome_trace()
    x = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert x["RunStep gpu stage"]["ts"] == 0 and x["forward mb0"]["ts"] == pytest.approx(1.5e6)
    assert x["forward mb0"]["dur"] == pytest.approx(0.25e6) and x["forward mb0"]["pid"] != x["RunStep gpu stage"]["pid"]
