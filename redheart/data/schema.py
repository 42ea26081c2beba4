"""The JSONL scenario schema: label vocabularies, the :class:`Scenario` record and a strict loader.

One line of a scenario file is one JSON object (JSON Lines)::

    {"id": "s-1", "text": "Yesterday I lied to my friend Mina.", "source": "my-corpus",
     "emotions": ["fear"], "judgment": "author",
     "bentham": {"intensity": 0.6, "duration": 0.5, "certainty": 0.8, "propinquity": 0.85,
                 "fecundity": 0.3, "purity": 0.3, "extent": 0.25, "valence": -0.5},
     "options": ["tell the truth", "say nothing"]}

``id`` and ``text`` are required; every label is optional (absent or ``null`` = "not labeled", the
head then contributes no loss for that row). See ``docs/data.md`` for the full reference.

The loader is strict on purpose: a typo in a label key would otherwise silently turn a labeled
row into an unlabeled one and the run would train on less data than the user thinks. Every error
names ``file:line``, the field, the problem and, where there is an obvious one, the fix.

The vocabularies live in :mod:`redheart.data.vocabularies`, :class:`DataError` and its message helpers
in :mod:`redheart.data.errors`, the label checks in :mod:`redheart.data.label_checks`; every name is
importable from here as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redheart.data.errors import DataError, _did_you_mean, _fmt, _json_type, _Where
from redheart.data.label_checks import _parse_bentham, _parse_emotions, _parse_judgment, _parse_options
from redheart.data.vocabularies import BENTHAM_KEYS, EMOTIONS, JUDGMENTS, TOP_LEVEL_KEYS

__all__ = [
    "EMOTIONS",
    "BENTHAM_KEYS",
    "JUDGMENTS",
    "TOP_LEVEL_KEYS",
    "DataError",
    "Scenario",
    "LoadResult",
    "load_jsonl",
    "scenario_from_dict",
]


@dataclass(frozen=True)
class Scenario:
    """One validated scenario. Labels are ``None`` when absent (that head gets no loss for it).

    Attributes:
        id: unique id within the corpus (JSON string or integer; always stored as ``str``).
        text: the scenario text (non-empty), kept exactly as written.
        source: corpus/source name used for per-source sampling weights; defaults to the file stem.
        emotions: 6 values in [0, 1] in :data:`EMOTIONS` order (multi-label targets), or ``None``.
        bentham: 8 values in :data:`BENTHAM_KEYS` order (7 in [0, 1], valence in [-1, 1]), or ``None``.
        judgment: index into :data:`JUDGMENTS`, or ``None``.
        options: alternative actions the actor could have taken, or ``None``.
    """

    id: str
    text: str
    source: str
    emotions: tuple[float, ...] | None = None
    bentham: tuple[float, ...] | None = None
    judgment: int | None = None
    options: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Cheap structural checks so a hand-built Scenario cannot produce a mis-shaped tensor later.
        if not self.id:
            raise ValueError("Scenario.id must be a non-empty string")
        if not self.text or not self.text.strip():
            raise ValueError(f"Scenario {self.id!r}: text must be non-empty")
        if self.emotions is not None and len(self.emotions) != len(EMOTIONS):
            raise ValueError(f"Scenario {self.id!r}: emotions must have {len(EMOTIONS)} values")
        if self.bentham is not None and len(self.bentham) != len(BENTHAM_KEYS):
            raise ValueError(f"Scenario {self.id!r}: bentham must have {len(BENTHAM_KEYS)} values")
        if self.judgment is not None and not 0 <= self.judgment < len(JUDGMENTS):
            raise ValueError(f"Scenario {self.id!r}: judgment index must be in [0, {len(JUDGMENTS)})")

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form (object forms for labels), accepted back by the loader."""
        out: dict[str, Any] = {"id": self.id, "text": self.text, "source": self.source}
        if self.emotions is not None:
            out["emotions"] = dict(zip(EMOTIONS, self.emotions))
        if self.bentham is not None:
            out["bentham"] = dict(zip(BENTHAM_KEYS, self.bentham))
        if self.judgment is not None:
            out["judgment"] = JUDGMENTS[self.judgment]
        if self.options is not None:
            out["options"] = list(self.options)
        return out


@dataclass
class LoadResult:
    """What :func:`load_jsonl` read.

    Attributes:
        scenarios: the valid scenarios, in file order.
        skipped: number of invalid (non-blank) lines skipped; always 0 unless ``skip_invalid``.
        errors: the error message of each skipped line, in file order.
    """

    scenarios: list[Scenario]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Validation of one decoded object
# --------------------------------------------------------------------------------------------


def _parse_object(where: _Where, obj: Any, default_source: str) -> Scenario:
    """Validate one decoded JSON value into a :class:`Scenario` (raises :class:`DataError`)."""
    if not isinstance(obj, dict):
        hint = ""
        if isinstance(obj, list):
            hint = " (a JSON array: if the whole file is one array, write one object per line instead)"
        raise where.error(None, f"expected a JSON object per line, got {_json_type(obj)}{hint}")

    unknown = [k for k in obj if k not in TOP_LEVEL_KEYS]
    if unknown:
        k = unknown[0]
        raise where.error(
            k,
            f": unknown key{_did_you_mean(k, TOP_LEVEL_KEYS)}; valid keys: {', '.join(TOP_LEVEL_KEYS)} "
            '(put extra data under "meta")',
        )

    if "id" not in obj or obj["id"] is None:
        raise where.error("id", ': missing; every scenario needs a unique "id" (string or integer)')
    raw_id = obj["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise where.error("id", f" = {_fmt(raw_id)}, must be a string or integer, got {_json_type(raw_id)}")
    sid = str(raw_id)
    if not sid.strip():
        raise where.error("id", ": is empty; give every scenario a unique non-empty id")

    if "text" not in obj or obj["text"] is None:
        raise where.error("text", ': missing; every scenario needs a non-empty "text"')
    text = obj["text"]
    if not isinstance(text, str):
        raise where.error("text", f" = {_fmt(text)}, must be a string, got {_json_type(text)}")
    if not text.strip():
        raise where.error("text", ": is empty; every scenario needs a non-empty text")

    source = obj.get("source")
    if source is None:
        source = default_source
    elif not isinstance(source, str) or not source.strip():
        raise where.error(
            "source", f" = {_fmt(source)}, must be a non-empty string (or omit it to use the file name)"
        )

    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise where.error("meta", f" = {_fmt(meta)}, must be an object, got {_json_type(meta)}")

    return Scenario(
        id=sid,
        text=text,
        source=source,
        emotions=_parse_emotions(where, obj.get("emotions")),
        bentham=_parse_bentham(where, obj.get("bentham")),
        judgment=_parse_judgment(where, obj.get("judgment")),
        options=_parse_options(where, obj.get("options")),
    )


def scenario_from_dict(
    obj: Mapping[str, Any], *, default_source: str = "unknown", location: str = "<dict>"
) -> Scenario:
    """Validate one already-decoded scenario object (e.g. built in Python) exactly as the loader does.

    ``location`` stands in for ``file:line`` in error messages.
    """
    return _parse_object(_Where(location, None), dict(obj), default_source)


# --------------------------------------------------------------------------------------------
# File reading
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity although they are not JSON; a NaN label would poison the
    # loss, so refuse them at parse time.
    raise ValueError(f"{name} is not valid JSON (use a finite number or null)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicated keys silently; a duplicated "text" or label is
    # almost always a merge mistake, so make it an error.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f'duplicate key "{key}" in object')
        out[key] = value
    return out


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes without the newline), streaming the file."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            yield number, raw.rstrip(b"\n").rstrip(b"\r")


def _decode_line(where: _Where, raw: bytes) -> Any:
    """bytes → JSON value, with errors that give the column."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise where.error(
            None,
            f"not valid UTF-8 (byte 0x{bad} at byte column {exc.start + 1}); re-save the file as UTF-8",
        ) from None
    if where.line == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark written by some editors; harmless
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        stripped = text.strip()
        hint = ""
        if not (stripped.startswith("{") and stripped.endswith("}")):
            # Usually a pretty-printed object split over several lines, or a JSON array file.
            hint = " (each line must hold one complete JSON object; pretty-printed multi-line objects are not JSON Lines)"
        raise where.error(None, f"invalid JSON at column {exc.colno}: {exc.msg}{hint}") from None
    except ValueError as exc:  # from the hooks above
        raise where.error(None, f"invalid JSON: {exc}") from None


_BLANK = object()


def load_jsonl(path: str | Path, *, skip_invalid: bool = False) -> LoadResult:
    """Read and validate a JSONL scenario file.

    Blank lines are ignored. ``source`` defaults to the file's stem. Ids must be unique.

    Args:
        path: the ``.jsonl`` file.
        skip_invalid: if False (default) the FIRST invalid line raises :class:`DataError`; if True
            invalid lines are skipped, counted in ``LoadResult.skipped`` and their messages kept in
            ``LoadResult.errors``.

    Raises:
        DataError: file missing / unreadable, no scenarios at all, or (without ``skip_invalid``)
            the first invalid line. The message names ``file:line``, the field and the fix.
    """
    shown = str(path)
    file_path = Path(path)
    if not file_path.exists():
        raise DataError(f"{shown}: file not found (check the path; cwd is {Path.cwd()})", path=shown)
    if not file_path.is_file():
        raise DataError(f"{shown}: not a regular file", path=shown)

    default_source = file_path.stem or "unknown"
    scenarios: list[Scenario] = []
    errors: list[str] = []
    first_line_of: dict[str, int] = {}  # id → line where it first appeared, for duplicate messages
    nonblank = 0
    try:
        for number, raw in _iter_lines(file_path):
            where = _Where(shown, number)
            try:
                obj = _decode_line(where, raw)
                if obj is _BLANK:
                    continue
                nonblank += 1
                scenario = _parse_object(where, obj, default_source)
                if scenario.id in first_line_of:
                    raise where.error(
                        "id",
                        f' = "{scenario.id}": duplicate id (first used on line {first_line_of[scenario.id]}); '
                        "ids must be unique",
                    )
            except DataError as exc:
                if not skip_invalid:
                    raise
                errors.append(str(exc))
                continue
            first_line_of[scenario.id] = number
            scenarios.append(scenario)
    except OSError as exc:
        raise DataError(f"{shown}: cannot read file: {exc.strerror or exc}", path=shown) from exc

    if not scenarios:
        if nonblank == 0:
            raise DataError(f"{shown}: no scenarios (the file is empty or has only blank lines)", path=shown)
        raise DataError(
            f"{shown}: no valid scenarios ({len(errors)} invalid line(s) skipped); first error: {errors[0]}",
            path=shown,
        )
    return LoadResult(scenarios=scenarios, skipped=len(errors), errors=errors)
