"""Deterministic synthetic scenario corpus in English and Korean, with labels that follow from the text.

Why synthetic: the trainer must be testable and demonstrable offline, and the model must have
something *learnable* — a label that is a function of the words, not noise. Every label here is
computed from the same discrete choices that produced the text:

* **judgment** (who is in the wrong) — from the *actor phrase* and whether the *action* is wrong:
  ``I <wrong action>`` → author, ``<someone> <wrong action>`` → other, ``<someone> and I both
  <wrong action>`` → everybody, a harmless action or an event nobody caused → nobody, and an
  explicitly ambiguous phrasing ("I can't tell whether it was me or X who ...") → unclear.
* **emotions** (multi-label) — the outcome sentence (e.g. "It ended badly" → sadness, "To my
  surprise, ..." → surprise) plus the narrator's perspective on the action (someone stole from me
  → anger + disgust; someone helped me → joy).
* **bentham** — the action's typical hedonic profile (intensity, duration, fecundity, purity,
  valence), adjusted by the outcome (valence, intensity, certainty), the time words (propinquity:
  "today" ≈ 0.95 … "when I was a kid" ≈ 0.05), who was affected (extent: me < one person < a group
  < a community), optional duration / importance sentences, plus ±0.03 seeded jitter.

Length carries no label signal on purpose: filler sentences, optional places and closers are drawn
independently of the labels. ~10 % of rows have no emotions, ~10 % no bentham, ~5 % no judgment and
~15 % no options, to exercise the loss masking.

Determinism: everything is drawn from one ``random.Random(seed)``, iterating only over tuples
(never sets or dicts keyed by hash), so the same (count, seed, korean_fraction) gives the same
scenarios, and ``write_jsonl`` gives the same bytes. Scenario ``i`` does not depend on ``count``
(a shorter corpus is a prefix of a longer one).

CLI: ``redheart-make-data --out data/scenarios.jsonl [--count 28882] [--seed 0] [--korean-fraction 0.3]``.

This module holds the writer and the CLI; the generator itself lives in :mod:`redheart.data.gen`
(word lists in ``vocab.py`` / ``actions.py``, text in ``text.py``, labels in ``labels.py``, the draws
in ``scenario.py``). ``DEFAULT_COUNT`` and ``generate_scenarios`` are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import click

from redheart.cli_common import CONTEXT_SETTINGS, ExitCodeCommand
from redheart.data.gen.scenario import DEFAULT_COUNT, generate_scenarios
from redheart.data.schema import JUDGMENTS

__all__ = ["DEFAULT_COUNT", "generate_scenarios", "write_jsonl", "main"]


def _canonical_lines(records: Sequence[dict]) -> bytes:
    # sort_keys + fixed separators + ensure_ascii=False + "\n": the same records give the same bytes.
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def write_jsonl(
    path: str | Path, count: int = DEFAULT_COUNT, seed: int = 0, korean_fraction: float = 0.3
) -> Path:
    """Generate a corpus and write it as canonical JSON Lines (atomically: temp file + rename).

    Returns the path written. The same arguments always give the same bytes.
    """
    return _write_bytes(Path(path), _canonical_lines(generate_scenarios(count, seed, korean_fraction)))


def _write_bytes(out: Path, data: bytes) -> Path:
    """Write ``data`` to ``out`` atomically, so a crash never leaves a half-written corpus."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _summary(records: Sequence[dict]) -> str:
    """A short per-label summary so the person running the CLI sees what they got."""
    judgments = Counter(r.get("judgment", "<missing>") for r in records)
    sources = Counter(r["source"] for r in records)
    korean = sum(1 for r in records if "-ko-" in r["source"])
    lines = [
        f"  korean: {korean}  english: {len(records) - korean}",
        "  judgment: " + ", ".join(f"{k}={judgments.get(k, 0)}" for k in (*JUDGMENTS, "<missing>")),
        f"  missing labels: emotions={sum('emotions' not in r for r in records)}"
        f" bentham={sum('bentham' not in r for r in records)}",
        "  sources: " + ", ".join(f"{k}={v}" for k, v in sorted(sources.items())),
    ]
    return "\n".join(lines)


_MAKE_DATA_HELP = f"""Write a deterministic synthetic English/Korean scenario corpus (JSON Lines).

\b
Examples:
  redheart-make-data --out runs/data/scenarios.jsonl                 # the original {DEFAULT_COUNT} scenarios
  redheart-make-data --out small.jsonl --count 200 --seed 1 --korean-fraction 0.5

The same seed and count always give the same bytes. Exit codes: 0 written, 2 bad arguments."""


@click.command(cls=ExitCodeCommand, context_settings=CONTEXT_SETTINGS, help=_MAKE_DATA_HELP)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="output .jsonl file (parent dirs are created)",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=DEFAULT_COUNT,
    show_default=True,
    help="number of scenarios",
)
@click.option("--seed", type=int, default=0, show_default=True, help="random seed; same seed → same bytes")
@click.option(
    "--korean-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.3,
    show_default=True,
    help="fraction of scenarios in Korean, 0..1",
)
def make_data(out: Path, count: int, seed: int, korean_fraction: float) -> int:
    records = generate_scenarios(count, seed, korean_fraction)
    data = _canonical_lines(records)
    _write_bytes(out, data)
    digest = hashlib.sha256(data).hexdigest()[:16]
    print(f"wrote {len(records)} scenarios to {out} ({len(data)} bytes, sha256 {digest}…, seed {seed})")
    print(_summary(records))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``redheart-make-data`` entry point. Returns the process exit status."""
    from redheart.cli_common import invoke

    return invoke(make_data, argv, prog_name="redheart-make-data")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
