"""--trace: a Chrome trace-event timeline of chosen steps from every process, on one clock."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def _spans(trace: dict) -> list[dict]:
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    out = []
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            out.append(
                dict(
                    e,
                    process=processes[e["pid"]],
                    thread=threads[(e["pid"], e["tid"])],
                    start=e["ts"],
                    end=e["ts"] + e["dur"],
                )
            )
    return out


def _check_format(trace: dict) -> None:
    assert isinstance(trace["traceEvents"], list) and trace["displayTimeUnit"] == "ms"
    begun: dict[str, float] = {}
    for e in trace["traceEvents"]:
        assert e["ph"] in ("M", "X", "b", "e"), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and isinstance(e["name"], str)
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["dur"] >= 0
        if e["ph"] == "b":
            begun[e["id"]] = e["ts"]
        if e["ph"] == "e":
            assert e["ts"] >= begun.pop(e["id"])  # every async end has its begin, later
    assert not begun


def _by_micro_batch(spans: list[dict], process: str, step: int, action: str) -> dict[int, dict]:
    """The spans of one action of `process` in `step`, by micro-batch."""
    return {
        s["args"]["micro_batch"]: s
        for s in spans
        if s["process"] == process and s["args"]["step"] == step and s["args"].get("action") == action
    }


def _check_one_clock(trace: dict, spans: list[dict], step: int) -> None:
    """The stages' spans of `step` on the orchestrator's clock, and 1F1B overlapping them."""
    rtt = trace["otherData"]["clock_round_trips_seconds"]
    tolerance = max(2000.0, 1e6 * (rtt["cpu stage"] + rtt["gpu stage"]) / 2)  # microseconds
    fwd = {st: _by_micro_batch(spans, st, step, "F") for st in ("cpu stage", "gpu stage")}
    bwd = {st: _by_micro_batch(spans, st, step, "B") for st in ("cpu stage", "gpu stage")}
    sent = {}  # micro-batch -> when the CPU stage's sender began pushing its activation
    for s in spans:
        if (
            s["process"] == "cpu stage"
            and s["args"]["step"] == step
            and s["args"].get("action") == "send activation"
        ):
            mb = s["args"]["micro_batch"]
            sent[mb] = min(sent.get(mb, s["start"]), s["start"])
    assert len(fwd["cpu stage"]) == len(fwd["gpu stage"]) == len(sent) == 8
    # One clock, checked only by causality (each stage's offset is off by at most half its round
    # trip): the GPU stage's forward of a micro-batch ends after the CPU stage's sender began
    # pushing that activation, and the CPU stage's backward ends after the GPU stage's backward
    # began. Not against the end of the CPU stage's forward: under load its compute thread can be
    # preempted after queueing the send, while the GPU stage already computes on the tensor.
    for mb in range(8):
        assert fwd["gpu stage"][mb]["end"] >= sent[mb] - tolerance, (step, mb)
        assert bwd["cpu stage"][mb]["end"] >= bwd["gpu stage"][mb]["start"] - tolerance, (step, mb)
    # 1F1B at work: the two stages compute forwards at the same time.
    overlaps = [
        (a, b)
        for a in fwd["cpu stage"].values()
        for b in fwd["gpu stage"].values()
        if a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlaps, f"step {step}: no forward of the cpu stage overlaps one of the gpu stage"


def test_trace_of_steps_1_to_2_has_every_process_on_one_clock(tmp_path, tiny_toml):
    out = tmp_path / "run"
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            "train.max_steps=3",
            "--trace",
            "1-2",
            "--set",
            "train.batch_size=16",
            "--set",
            "model.gpu_layers_ratio=0.75",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trace = json.loads((out / "trace.json").read_text())
    _check_format(trace)
    spans = _spans(trace)
    assert {s["process"] for s in spans} == {"orchestrator", "cpu stage", "gpu stage"}
    assert {s["args"]["step"] for s in spans} == {1, 2}  # step 3 was not asked for
    names = {(s["process"], s["thread"], s["name"].split(" mb")[0]) for s in spans}
    for stage in ("cpu stage", "gpu stage"):
        assert {
            (stage, "compute", "forward"),
            (stage, "compute", "backward"),
            (stage, "optimizer", "optimizer step"),
            (stage, "sender", "send activation" if stage == "cpu stage" else "send gradient"),
        } <= names
        assert (
            "orchestrator",
            "MainThread",
            f"RunStep {stage}",
        ) not in names  # called from the pool's threads
    assert {("orchestrator", "MainThread", "step 1"), ("orchestrator", "MainThread", "step 2")} <= names
    assert any(s["process"] == "orchestrator" and s["name"].startswith("RunStep") for s in spans)
    regret = [e for e in trace["traceEvents"] if e["ph"] == "b" and e["name"].startswith("regret")]
    assert len(regret) == 2 * 8  # every micro-batch's regret request, both steps
    assert set(trace["otherData"]["clock_offsets_seconds"]) == {"orchestrator", "cpu stage", "gpu stage"}

    for step in (1, 2):
        _check_one_clock(trace, spans, step)
    report = json.loads((out / "report.json").read_text())
    assert report["trace"]["json"] == str(out / "trace.json")
    assert (out / "trace-step-2.png").stat().st_size > 10_000
