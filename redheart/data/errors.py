"""Data errors with ``file:line``, field and fix (re-exported by :mod:`redheart.data.schema`).

:class:`DataError` is the one exception for bad input data; ``_Where`` formats the messages of one
location, and the small helpers spell offending values and suggestions the same way everywhere.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with input data, with a message meant for the person who owns the data.

    The message always says where (``file:line`` when a line is involved), which field, what is
    wrong and, where obvious, how to fix it. The same facts are kept as attributes so callers can
    act on them without parsing the message.

    Attributes:
        path: the file involved, as the caller spelled it (or ``None``).
        line: 1-based line number (or ``None`` for whole-file problems).
        field: dotted field name such as ``"bentham.intensity"`` (or ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


def _fmt(value: Any) -> str:
    """Render an offending value compactly for an error message (JSON spelling, truncated)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for 'must be X, got Y' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """' (did you mean "x"?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


class _Where:
    """Formats messages for one location (``file:line``) and raises :class:`DataError`."""

    def __init__(self, path: str, line: int | None) -> None:
        self.path = path
        self.line = line

    @property
    def loc(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else self.path

    def error(self, field_name: str | None, problem: str) -> DataError:
        # Callers spell the separator: `field = value, problem` or `field: problem`.
        text = f"{self.loc}: {problem}" if field_name is None else f"{self.loc}: {field_name}{problem}"
        return DataError(text, path=self.path, line=self.line, field=field_name)
