"""Validation of a row's labels against the vocabularies (used by :mod:`redheart.data.schema`).

Each ``_parse_*`` takes the decoded JSON value of one label field and returns the tuple stored in
:class:`redheart.data.schema.Scenario` (or ``None`` when unlabeled), raising :class:`DataError`
with ``file:line``, the field, the problem and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from redheart.data.errors import _did_you_mean, _fmt, _json_type, _Where
from redheart.data.vocabularies import _BENTHAM_RANGES, BENTHAM_KEYS, EMOTIONS, JUDGMENTS


def _number(where: _Where, name: str, value: Any, lo: float, hi: float, *, allow_bool: bool) -> float:
    """Validate one numeric label value and return it as float."""
    if isinstance(value, bool):
        if allow_bool:
            return 1.0 if value else 0.0
        raise where.error(name, f" = {_fmt(value)}, must be a number in [{lo:g}, {hi:g}], not a boolean")
    if not isinstance(value, (int, float)):
        raise where.error(
            name, f" = {_fmt(value)}, must be a number in [{lo:g}, {hi:g}], got {_json_type(value)}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise where.error(name, f" = {value}, must be a finite number in [{lo:g}, {hi:g}]")
    if not lo <= number <= hi:
        raise where.error(name, f" = {_fmt(value)}, must be in [{lo:g}, {hi:g}]")
    return number


def _parse_emotions(where: _Where, value: Any) -> tuple[float, ...] | None:
    """Emotions: ``null``, an object with all six keys, or a list of the present emotion names."""
    if value is None:
        return None
    if isinstance(value, list):
        present: set[str] = set()
        for i, name in enumerate(value):
            item = f"emotions[{i}]"
            if not isinstance(name, str):
                raise where.error(
                    item, f" = {_fmt(name)}, must be an emotion name (string), got {_json_type(name)}"
                )
            if name not in EMOTIONS:
                raise where.error(
                    item,
                    f' = "{name}": unknown emotion{_did_you_mean(name, EMOTIONS)}; valid emotions: {", ".join(EMOTIONS)}',
                )
            if name in present:
                raise where.error(item, f' = "{name}": listed twice; list each present emotion once')
            present.add(name)
        return tuple(1.0 if e in present else 0.0 for e in EMOTIONS)
    if isinstance(value, dict):
        unknown = [k for k in value if k not in EMOTIONS]
        if unknown:
            k = unknown[0]
            raise where.error(
                f"emotions.{k}",
                f": unknown emotion key{_did_you_mean(k, EMOTIONS)}; valid keys: {', '.join(EMOTIONS)}",
            )
        missing = [k for k in EMOTIONS if k not in value]
        if missing:
            raise where.error(
                "emotions",
                f": missing key(s) {', '.join(missing)}; the object form needs all six emotions "
                "(use 0 for absent ones), or use the list form with only the present emotions",
            )
        return tuple(_number(where, f"emotions.{k}", value[k], 0.0, 1.0, allow_bool=True) for k in EMOTIONS)
    raise where.error(
        "emotions",
        f" = {_fmt(value)}, must be an object with all six emotions, a list of present emotion names, "
        f"or null; got {_json_type(value)}",
    )


def _parse_bentham(where: _Where, value: Any) -> tuple[float, ...] | None:
    """Bentham: ``null`` or an object with exactly the eight :data:`BENTHAM_KEYS`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise where.error(
            "bentham",
            f" = {_fmt(value)}, must be an object with keys {', '.join(BENTHAM_KEYS)}, got {_json_type(value)}",
        )
    unknown = [k for k in value if k not in BENTHAM_KEYS]
    if unknown:
        k = unknown[0]
        raise where.error(
            f"bentham.{k}",
            f": unknown key{_did_you_mean(k, BENTHAM_KEYS)}; valid keys: {', '.join(BENTHAM_KEYS)}",
        )
    missing = [k for k in BENTHAM_KEYS if k not in value]
    if missing:
        raise where.error(
            "bentham",
            f": missing key(s) {', '.join(missing)}; all eight are required "
            '(or set "bentham": null to leave the row unlabeled)',
        )
    return tuple(
        _number(where, f"bentham.{k}", value[k], *_BENTHAM_RANGES[k], allow_bool=False) for k in BENTHAM_KEYS
    )


def _parse_judgment(where: _Where, value: Any) -> int | None:
    """Judgment: ``null`` or a class name (case-insensitive) from :data:`JUDGMENTS`."""
    if value is None:
        return None
    valid = ", ".join(JUDGMENTS)
    if not isinstance(value, str):
        raise where.error(
            "judgment",
            f" = {_fmt(value)}, must be a class name (string), one of: {valid}; got {_json_type(value)}",
        )
    name = value.strip().lower()
    if name not in JUDGMENTS:
        raise where.error(
            "judgment", f' = "{value}": unknown class{_did_you_mean(name, JUDGMENTS)}; valid classes: {valid}'
        )
    return JUDGMENTS.index(name)


def _parse_options(where: _Where, value: Any) -> tuple[str, ...] | None:
    """Options: ``null`` or a list of non-empty strings."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise where.error(
            "options", f" = {_fmt(value)}, must be a list of strings or null, got {_json_type(value)}"
        )
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise where.error(f"options[{i}]", f" = {_fmt(item)}, must be a non-empty string")
        out.append(item)
    return tuple(out)
