"""Labels derived from the same draws as the text: judgment, emotions, Bentham values, label dropout."""

from __future__ import annotations

import random
from typing import Any

from redheart.data.gen.actions import _Action, _Event, _Outcome, _Profile
from redheart.data.gen.vocab import _Time
from redheart.data.schema import BENTHAM_KEYS, EMOTIONS

_JITTER = 0.03  # ± uniform noise on every Bentham value: enough to stop exact lookup, small enough to learn

# Label dropout rates (exercise the loss masking).
_P_NO_EMOTIONS = 0.10
_P_NO_BENTHAM = 0.10
_P_NO_JUDGMENT = 0.05
_P_NO_OPTIONS = 0.15


def _clip(value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if value < lo else hi if value > hi else value


def _judgment(kind: str, wrong: bool) -> str:
    """A pure function of the actor kind and the action's wrongness."""
    if kind == "unclear":
        return "unclear"
    if not wrong:
        return "nobody"
    return {"author": "author", "other": "other", "everybody": "everybody"}[kind]


def _emotions(kind: str, action: _Action | _Event, outcome: _Outcome) -> dict[str, int]:
    """The outcome's emotions ∪ the narrator's perspective on the action."""
    felt = set(outcome.emotions)
    if isinstance(action, _Event):
        felt.add("sadness")  # every event here is a misfortune
    elif kind == "other":
        felt.update(action.victim_emotions)  # the narrator is on the receiving end
    elif kind == "author":
        felt.update(action.agent_emotions)
    return {e: (1 if e in felt else 0) for e in EMOTIONS}


def _bentham(
    rng: random.Random,
    p: _Profile,
    outcome: _Outcome,
    time: _Time,
    duration: tuple[str, str, float] | None,
    importance: tuple[str, str, float] | None,
    extent: float,
) -> dict[str, float]:
    """The action's profile adjusted by outcome, time, duration / importance and extent, plus jitter."""
    dur = p.duration + outcome.duration
    if duration is not None:
        dur = 0.4 * dur + 0.6 * duration[2]
    raw = {
        "intensity": p.intensity + outcome.intensity + (importance[2] if importance else 0.0),
        "duration": dur,
        "certainty": outcome.certainty,
        "propinquity": time.propinquity,
        "fecundity": p.fecundity + outcome.fecundity,
        "purity": p.purity + outcome.purity,
        "extent": extent,
        "valence": p.valence + outcome.valence,
    }
    bentham = {}
    for key in BENTHAM_KEYS:
        lo = -1.0 if key == "valence" else 0.0
        bentham[key] = round(_clip(raw[key] + rng.uniform(-_JITTER, _JITTER), lo, 1.0), 3)
    return bentham


def _drop_labels(rng: random.Random, record: dict[str, Any]) -> None:
    """Drop some labels in place (drawn for every row, so the rng stream does not depend on earlier drops)."""
    drops = (rng.random(), rng.random(), rng.random(), rng.random())
    if drops[0] < _P_NO_EMOTIONS:
        del record["emotions"]
    if drops[1] < _P_NO_BENTHAM:
        del record["bentham"]
    if drops[2] < _P_NO_JUDGMENT:
        del record["judgment"]
    if drops[3] < _P_NO_OPTIONS:
        del record["options"]
