"""Drawing scenarios: one ``random.Random(seed)``, and a fixed order of rng calls per scenario.

The order of the draws is what makes the corpus reproducible byte for byte: changing it (even
moving a draw between helpers) changes every scenario after the first one affected.
"""

from __future__ import annotations

import random
from typing import Any

from redheart.data.gen.actions import (
    _EVENTS,
    _OK_ACTIONS,
    _OUTCOMES,
    _OUTCOMES_FOR,
    _WRONG_ACTIONS,
    _Action,
    _Event,
)
from redheart.data.gen.labels import _bentham, _drop_labels, _emotions, _judgment
from redheart.data.gen.text import _ME, _draw_parts, _render_person, _render_text, _target
from redheart.data.gen.vocab import _DOMAINS, _GROUPS, _PEOPLE, _Person, _Target

DEFAULT_COUNT = 28882
"""Default corpus size (the size of the original Red Heart scenario set)."""

# Actor kinds and their probabilities. "event" = nobody acted; "unclear" = ambiguous phrasing.
_ACTOR_KINDS = ("author", "other", "everybody", "unclear", "event")
_ACTOR_WEIGHTS = (0.38, 0.35, 0.10, 0.05, 0.12)
_P_WRONG = 0.7  # chance a (non-event, non-unclear) actor's action is a wrong one


def _draw_action(rng: random.Random) -> tuple[str, bool, _Action | _Event]:
    """The actor kind, whether the act is wrong, and the action (or event) itself."""
    kind = rng.choices(_ACTOR_KINDS, weights=_ACTOR_WEIGHTS)[0]
    if kind in ("author", "other", "everybody"):
        wrong = rng.random() < _P_WRONG
    else:
        wrong = kind == "unclear"  # ambiguity is only about wrongdoing; events are nobody's fault
    action: _Action | _Event
    if kind == "event":
        action = rng.choice(_EVENTS)
    else:
        action = rng.choice(_WRONG_ACTIONS if wrong else _OK_ACTIONS)
    return kind, wrong, action


def _draw_parties(rng: random.Random, kind: str, korean: bool) -> tuple[str, _Target, str]:
    """Who acted (a rendered phrase, "" for the narrator or nobody), who was affected, and the domain."""
    actor = ""
    actor_person: _Person | None = None
    avoid: str | None = None
    if kind in ("other", "everybody", "unclear"):
        actor_person = rng.choice(_PEOPLE)
        actor_en, actor_ko, avoid = _render_person(rng, actor_person, korean, None)
        actor = actor_ko if korean else actor_en
    if kind == "other" and rng.random() < 0.65:
        target, domain = _ME, actor_person.domain  # type: ignore[union-attr]
    elif kind in ("other", "everybody", "unclear") and rng.random() < 0.35:
        # A group from the actor's own circle (my coworker lied to my whole team).
        pool = tuple(g for g in _GROUPS if g.domain == actor_person.domain)  # type: ignore[union-attr]
        target, person = _target(rng, pool, korean)
        domain = person.domain
    elif kind == "event" and rng.random() < 0.4:
        target, domain = _ME, rng.choice(_DOMAINS)
    else:
        pool = _GROUPS if rng.random() < 0.25 else _PEOPLE
        target, person = _target(rng, pool, korean, avoid)
        domain = person.domain if actor_person is None else actor_person.domain
    return actor, target, domain


def _one(rng: random.Random, index: int, korean: bool) -> dict[str, Any]:
    """Draw one scenario. The order of rng calls is fixed, which is what makes output reproducible."""
    kind, wrong, action = _draw_action(rng)
    actor, target, domain = _draw_parties(rng, kind, korean)
    judgment = _judgment(kind, wrong)

    if kind == "event":
        outcome_pool = _OUTCOMES_FOR["event"]
    elif not wrong:
        outcome_pool = _OUTCOMES_FOR["ok_action"]
    else:
        outcome_pool = _OUTCOMES_FOR[kind]
    outcome = _OUTCOMES[rng.choice(outcome_pool)]
    parts = _draw_parts(rng, outcome, korean)
    text = _render_text(rng, kind, actor, action, target, parts, korean)

    emotions = _emotions(kind, action, outcome)
    bentham = _bentham(
        rng, action.profile, outcome, parts.time, parts.duration, parts.importance, target.extent
    )
    options_pool = action.options_ko if korean else action.options_en
    options = rng.sample(options_pool, k=rng.choice((2, 3)))

    lang = "ko" if korean else "en"
    record: dict[str, Any] = {
        "id": f"gen-{index:06d}",
        "text": text,
        "source": f"generated-{lang}-{domain}",
        "emotions": emotions,
        "bentham": bentham,
        "judgment": judgment,
        "options": options,
    }
    _drop_labels(rng, record)
    return record


def generate_scenarios(count: int = DEFAULT_COUNT, seed: int = 0, korean_fraction: float = 0.3) -> list[dict]:
    """Generate ``count`` labeled scenarios as JSON-ready dicts (deterministic in ``seed``).

    Args:
        count: number of scenarios (>= 0).
        seed: seeds the only random source, ``random.Random(seed)``.
        korean_fraction: probability that a scenario is written in Korean, in [0, 1].

    Returns:
        Dicts with ``id``, ``text``, ``source`` and (mostly) ``emotions`` (object form),
        ``bentham`` (object form), ``judgment`` (class name) and ``options``; the schema of
        :mod:`redheart.data.schema`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if not 0.0 <= float(korean_fraction) <= 1.0:
        raise ValueError(f"korean_fraction must be in [0, 1], got {korean_fraction!r}")
    rng = random.Random(seed)
    out = []
    for index in range(count):
        korean = rng.random() < korean_fraction
        out.append(_one(rng, index, korean))
    return out
