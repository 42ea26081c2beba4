"""The label vocabularies of the scenario schema (re-exported by :mod:`redheart.data.schema`).

The order of each tuple is the column order of its head, so it is part of every checkpoint.
"""

from __future__ import annotations

__all__ = ["BENTHAM_KEYS", "EMOTIONS", "JUDGMENTS", "TOP_LEVEL_KEYS"]

EMOTIONS: tuple[str, ...] = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
"""The six basic emotions, in the column order of the emotion head and of ``Scenario.emotions``."""

BENTHAM_KEYS: tuple[str, ...] = (
    "intensity",
    "duration",
    "certainty",
    "propinquity",
    "fecundity",
    "purity",
    "extent",
    "valence",
)
"""Bentham's circumstances (first 7, each in [0, 1]) plus valence in [-1, 1], in head column order."""

JUDGMENTS: tuple[str, ...] = ("author", "other", "everybody", "nobody", "unclear")
"""Ethical verdict classes (who is in the wrong); ``Scenario.judgment`` is an index into this."""

TOP_LEVEL_KEYS: tuple[str, ...] = (
    "id",
    "text",
    "source",
    "emotions",
    "bentham",
    "judgment",
    "options",
    "meta",
)
"""Keys allowed at the top level of a scenario object. ``meta`` holds free-form data and is ignored."""

# Validity ranges per Bentham key: valence is signed (pain vs pleasure), the rest are magnitudes.
_BENTHAM_RANGES: dict[str, tuple[float, float]] = {k: (0.0, 1.0) for k in BENTHAM_KEYS}
_BENTHAM_RANGES["valence"] = (-1.0, 1.0)
