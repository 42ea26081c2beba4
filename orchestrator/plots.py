"""The run's pictures: ``loss.png`` (training losses beside validation metrics) and
``trace-step-N.png`` (one step's pipeline timeline, from the --trace spans)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redheart.heads import validation_metric_names

VALIDATION_METRICS = validation_metric_names()  # the built-in heads' at import, for old imports

# forward / backward / waiting / wire / regret / optimizer: the same colour wherever they appear
COLOURS = {
    "forward": "#4c72b0",
    "backward": "#dd8452",
    "wait": "#c8c8c8",
    "send": "#55a868",
    "regret": "#8172b3",
    "optimizer": "#c44e52",
    "RunStep": "#937860",
    "ApplyStep": "#da8bc3",
    "step": "#8c8c8c",
    "evaluation": "#64b5cd",
    "checkpoint": "#ccb974",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict], path: Path, validation: Sequence[dict[str, Any]] = ()) -> None:
    """Training loss per head (log scale) and, beside it, each evaluation's metrics against their
    baselines (dashed: the trivial baseline of the same colour)."""
    if not history:
        return
    plt = _pyplot()
    evaluations = [v for v in validation if v.get("metrics")]
    fig, axes = plt.subplots(
        1, 2 if evaluations else 1, figsize=(13 if evaluations else 8, 4.5), squeeze=False
    )
    ax = axes[0][0]
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="total", linewidth=2, color="black")
    heads = sorted({k for h in history for k in h["losses"]})
    for head in heads:
        ax.plot(steps, [h["losses"].get(head, float("nan")) for h in history], label=head)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Red Heart training loss per head")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if evaluations:
        ax = axes[0][1]
        at = [v["step"] for v in evaluations]
        for i, key in enumerate(validation_metric_names()):
            if not any(key in v["metrics"] for v in evaluations):
                continue
            colour = f"C{i}"
            ax.plot(
                at,
                [v["metrics"].get(key, float("nan")) for v in evaluations],
                marker="o",
                color=colour,
                label=key,
            )
            ax.plot(
                at,
                [v["baseline"].get(f"baseline_{key}", float("nan")) for v in evaluations],
                linestyle="--",
                marker="x",
                color=colour,
                alpha=0.7,
                label=f"{key} baseline",
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation metric (accuracy / F1 up, MAE down)")
        ax.set_title("Validation per evaluation (dashed: baseline)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colour(name: str) -> str:
    for key, colour in COLOURS.items():
        if key in name:
            return colour
    return "#64b5cd"


def plot_trace_step(events: Sequence[dict[str, Any]], step: int, path: Path) -> Path | None:
    """One step's timeline: a row per (process, thread), bars coloured by action. `step` is 1-based."""
    chosen = [e for e in events if e["args"].get("step") == step]
    if not chosen:
        return None
    plt = _pyplot()
    t0 = min(e["start"] for e in chosen)
    rows = sorted({(e["process"], e["thread"]) for e in chosen}, key=lambda r: (r[0] != "orchestrator", r))
    fig, ax = plt.subplots(figsize=(13, 0.5 * len(rows) + 2.0))
    # Waits happen inside a forward / backward (it waits for its input): drawn last, hatched, on top.
    chosen = sorted(chosen, key=lambda e: "wait" in e["name"])
    for y, (process, thread) in enumerate(rows):
        for e in chosen:
            if (e["process"], e["thread"]) != (process, thread):
                continue
            start, width = (e["start"] - t0) * 1e3, max((e["end"] - e["start"]) * 1e3, 0.05)
            waiting = "wait" in e["name"]
            ax.broken_barh(
                [(start, width)],
                (y - 0.4, 0.8),
                facecolors=_colour(e["name"]),
                edgecolor="white",
                linewidth=0.3,
                hatch="//" if waiting else None,
                alpha=0.8 if waiting else 1.0,
            )
            if "micro_batch" in e["args"] and width > 1.5 and not waiting:
                ax.text(
                    start + width / 2, y, str(e["args"]["micro_batch"]), ha="center", va="center", fontsize=6
                )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{p} / {t}" for p, t in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the step began (one clock; numbers: micro-batch)")
    ax.set_title(f"Pipeline timeline of step {step}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    fig.legend(handles, list(COLOURS), fontsize=7, ncol=len(COLOURS), loc="lower center")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
