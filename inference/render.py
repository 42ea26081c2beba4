"""Plain-text tables for a terminal: predictions and evaluation results (no extra dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inference.predictor import Prediction
from redheart.calculus import TRANSFORM_DESCRIPTIONS
from redheart.heads import validation_metrics


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def predictions_table(predictions: Sequence[Prediction]) -> str:
    blocks = []
    for n, p in enumerate(predictions, start=1):
        e = p.explanation
        top = sorted(p.emotions.items(), key=lambda kv: -kv[1])
        head = f"[{p.id or n}] {_short(p.text)}" + ("  (truncated to max_seq_len)" if p.truncated else "")
        rows = [("", "value")]
        rows.append(
            (
                "judgment",
                f"{p.judgment} ({p.judgment_probabilities[p.judgment]:.2f}); "
                + ", ".join(f"{k} {v:.2f}" for k, v in p.judgment_probabilities.items() if k != p.judgment),
            )
        )
        rows.append(("emotions", ", ".join(f"{k} {v:.2f}" for k, v in top)))
        rows.append(("bentham", ", ".join(f"{k} {v:.2f}" for k, v in p.bentham.items())))
        rows.append(("valence", f"{p.valence:+.2f}"))
        rows.append(
            ("regret", f"{e['regret']:.4f} by the calculus, {p.predicted_regret:.4f} by the regret head")
        )
        rows.append(
            (
                "best counterfactual",
                f"{e['best_counterfactual']} (utility {e['counterfactual_utilities'][e['best_counterfactual']]:+.4f} "
                f"vs actual {e['actual_utility']:+.4f})",
            )
        )
        # What the counterfactual means, so a reader need not look the name up in docs/regret.md.
        rows.append(("  meaning", TRANSFORM_DESCRIPTIONS[e["best_counterfactual"]]))
        for view, actual in e["actual_perspective_utilities"].items():
            rows.append(
                (f"  {view}", f"actual {actual:+.4f}, best {e['best_perspective_utilities'][view]:+.4f}")
            )
        blocks.append(head + "\n" + _table(rows))
    return "\n\n".join(blocks)


def evaluation_table(result: dict[str, Any]) -> str:
    m, b = result["metrics"], result["baseline"]
    rows = [("metric", "model", "bag-of-words", "trivial", "better")]
    for key, higher in ((metric.name, metric.higher) for metric in validation_metrics()):
        if key not in m:
            continue
        bow, trivial = b.get("baseline_bow_" + key), b.get("baseline_" + key)
        rows.append(
            (
                key,
                f"{m[key]:.4f}",
                "-" if bow is None else f"{bow:.4f}",
                "-" if trivial is None else f"{trivial:.4f}",
                "higher" if higher else "lower",
            )
        )
    text = (
        f"{result['data']} ({result['split']}, {result['scenarios']} scenarios), model {result['model']}\n"
        + _table(rows)
    )
    for line in result["worse_than_baselines"]:
        text += f"\nWORSE THAN A BASELINE: {line}"
    for note in result.get("notes", []):
        text += f"\nnote: {note}"
    return text
