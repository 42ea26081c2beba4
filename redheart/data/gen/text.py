"""Rendering a drawn scenario as text: people's names, the core sentence, outcome and filler sentences.

The core sentence (who did what) carries the judgment; everything else is drawn independently of
the labels so text length predicts nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from redheart.data.gen.actions import _Action, _Event, _Outcome
from redheart.data.gen.vocab import (
    _CLOSERS_EN,
    _CLOSERS_KO,
    _DURATIONS,
    _FILLERS_EN,
    _FILLERS_KO,
    _GROUPS,
    _IMPORTANCE,
    _LEADS_EN,
    _LEADS_KO,
    _ME_EXTENT,
    _NAMES_EN,
    _NAMES_KO,
    _PLACES,
    _TIMES,
    _josa,
    _Person,
    _Target,
    _Time,
)


def _cap(text: str) -> str:
    """Capitalise the first character only ("my coworker Sam" → "My coworker Sam")."""
    return text[:1].upper() + text[1:]


def _render_person(
    rng: random.Random, person: _Person, korean: bool, avoid: str | None
) -> tuple[str, str, str]:
    """Fill a relation's name slot with a name != ``avoid``; returns (english, korean, name used)."""
    names = _NAMES_KO if korean else _NAMES_EN
    name = rng.choice(names)
    while name == avoid:  # never "my friend Sam lied to my coworker Sam"
        name = rng.choice(names)
    return person.en.replace("{n}", name), person.ko.replace("{n}", name), name


def _target(
    rng: random.Random, pool: Sequence[_Person], korean: bool, avoid: str | None = None
) -> tuple[_Target, _Person]:
    """Draw an affected party from ``pool`` and render its grammatical forms."""
    person = rng.choice(pool)
    en, ko, _ = _render_person(rng, person, korean, avoid)
    plural = person in _GROUPS and en.endswith("s")  # "my friends'" not "my friends's"
    pos = en + ("'" if plural else "'s")
    return _Target(en_obj=en, en_pos=pos, ko=ko, extent=person.extent), person


_ME = _Target(en_obj="me", en_pos="my", ko="나", extent=_ME_EXTENT, is_me=True)


def _predicate(action_or_event: _Action | _Event, target: _Target, korean: bool) -> str:
    if korean:
        return action_or_event.ko.format(**target.ko_forms())
    return action_or_event.en.format(t=target.en_obj, t_pos=target.en_pos)


@dataclass(frozen=True)
class _Parts:
    """The label-relevant and label-free pieces of a text, drawn after the outcome."""

    outcome_sentence: str
    time: _Time
    place: tuple[str, str] | None
    duration: tuple[str, str, float] | None  # (english, korean, duration value)
    importance: tuple[str, str, float] | None  # (english, korean, added intensity)
    fillers: list[str]
    closer: str | None
    lead: str
    pattern: int  # which sentence shape of the core sentence


def _draw_parts(rng: random.Random, outcome: _Outcome, korean: bool) -> _Parts:
    """Draw the text's other parts; the order of rng calls is part of the corpus's bytes."""
    outcome_sentence = rng.choice(outcome.ko if korean else outcome.en)
    time = rng.choice(_TIMES)
    place = rng.choice(_PLACES) if rng.random() < 0.6 else None
    duration = rng.choice(_DURATIONS) if rng.random() < 0.4 else None
    importance = rng.choice(_IMPORTANCE) if rng.random() < 0.3 else None
    fillers = rng.sample(_FILLERS_KO if korean else _FILLERS_EN, k=rng.choice((0, 0, 1, 1, 2, 3)))
    closer = rng.choice(_CLOSERS_KO if korean else _CLOSERS_EN) if rng.random() < 0.3 else None
    lead = rng.choice(_LEADS_KO if korean else _LEADS_EN)
    pattern = rng.randrange(3)
    return _Parts(outcome_sentence, time, place, duration, importance, fillers, closer, lead, pattern)


def _render_text(
    rng: random.Random,
    kind: str,
    actor: str,
    action: _Action | _Event,
    target: _Target,
    parts: _Parts,
    korean: bool,
) -> str:
    """The whole text: lead, core sentence, the other sentences in a shuffled order, closer."""
    predicate = _predicate(action, target, korean)
    core = (_korean_core if korean else _english_core)(
        kind, actor, predicate, parts.time, parts.place, parts.pattern
    )

    extras = [parts.outcome_sentence]
    if parts.duration is not None:
        extras.append(parts.duration[1] if korean else parts.duration[0])
    if parts.importance is not None:
        extras.append(parts.importance[1] if korean else parts.importance[0])
    extras.extend(parts.fillers)
    rng.shuffle(extras)  # the outcome sentence need not be right after the action
    pieces = [core, *extras]
    if parts.closer is not None:
        pieces.append(parts.closer)
    return parts.lead + " ".join(pieces)


def _english_core(
    kind: str, actor: str, predicate: str, time: _Time, place: tuple[str, str] | None, pattern: int
) -> str:
    """The sentence that says who did what (the judgment-bearing part) in English."""
    where = f" {place[0]}" if place else ""
    if kind == "event":  # no place: "a pipe burst in my kitchen at the gym" reads badly
        if pattern == 0:
            return f"{_cap(time.en)}, {predicate}."
        return f"{_cap(predicate)} {time.en}."
    if kind == "unclear":
        if pattern == 0:
            return (
                f"{_cap(time.en)}, I honestly can't tell whether it was me or {actor} who {predicate}{where}."
            )
        if pattern == 1:
            return f"It's hard to say if it was me or {actor} who {predicate}{where} {time.en}."
        return f"{_cap(time.en)}{where}, someone {predicate}, and I can't tell whether it was me or {actor}."
    subject = {"author": "I", "other": actor, "everybody": f"{actor} and I both"}[kind]
    if pattern == 0:
        return f"{_cap(time.en)}, {subject} {predicate}{where}."
    if pattern == 1:
        return f"{_cap(subject)} {predicate}{where} {time.en}."
    if place:
        return f"{_cap(place[0])} {time.en}, {subject} {predicate}."
    return f"{_cap(subject)} {predicate} {time.en}."


def _korean_core(
    kind: str, actor: str, predicate: str, time: _Time, place: tuple[str, str] | None, pattern: int
) -> str:
    """The sentence that says who did what in Korean (plain past tense, -다 style)."""
    where = f"{place[1]} " if place else ""
    if kind == "event":
        return f"{time.ko} {predicate}."
    if kind == "unclear":
        # "-었다" → "-었는지": an embedded question ("whether ... did it").
        embedded = predicate[:-1] + "는지"
        if pattern == 0:
            return f"{time.ko} {where}누가 {embedded} 잘 모르겠다. {_josa(actor, '이었을', '였을')} 수도 있고 나였을 수도 있다."
        return f"{time.ko} {where}{actor}인지 나인지, 누가 {embedded} 확실하지 않다."
    if kind == "author":
        subject = "나는" if pattern != 2 else "내가"
    elif kind == "other":
        subject = _josa(actor, "이", "가")
    else:
        subject = f"{_josa(actor, '과', '와')} 나는 둘 다"
    if pattern == 1:
        return f"{subject} {time.ko} {where}{predicate}."
    return f"{time.ko} {where}{subject} {predicate}."
