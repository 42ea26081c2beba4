"""Scenario JSONL schema: valid forms, and one test per error with the message the user sees."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redheart.data.schema import (
    BENTHAM_KEYS,
    EMOTIONS,
    JUDGMENTS,
    DataError,
    Scenario,
    load_jsonl,
    scenario_from_dict,
)

HANGUL_RE = re.compile(r"[\uac00-\ud7a3]")

BENTHAM_OK = {
    "intensity": 0.6,
    "duration": 0.5,
    "certainty": 0.8,
    "propinquity": 0.85,
    "fecundity": 0.3,
    "purity": 0.3,
    "extent": 0.25,
    "valence": -0.5,
}


def write(tmp_path: Path, *lines: object, name: str = "data.jsonl") -> Path:
    """Write lines (dicts are JSON-encoded, str written verbatim) to a file, one per line."""
    path = tmp_path / name
    text = "".join((json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    return info.value


def row(**fields: object) -> dict:
    base: dict = {"id": "s1", "text": "I lied to my friend."}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


# ------------------------------------------------------------------ valid input


def test_constants_match_design() -> None:
    assert EMOTIONS == ("joy", "sadness", "anger", "fear", "disgust", "surprise")
    assert BENTHAM_KEYS == (
        "intensity", "duration", "certainty", "propinquity", "fecundity", "purity", "extent", "valence",
    )  # fmt: skip
    assert JUDGMENTS == ("author", "other", "everybody", "nobody", "unclear")
    assert issubclass(DataError, ValueError)


def test_loads_full_row_english_and_korean(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        row(source="mine", emotions=["fear", "sadness"], bentham=BENTHAM_OK, judgment="author", options=["a", "b"]),
        row(id=7, text="어제 나는 친구에게 거짓말을 했다.", emotions={e: 0 for e in EMOTIONS} | {"joy": 0.5},
            judgment="Nobody"),
    )  # fmt: skip
    result = load_jsonl(path)
    assert result.skipped == 0 and result.errors == []
    first, second = result.scenarios
    assert first == Scenario(
        id="s1",
        text="I lied to my friend.",
        source="mine",
        emotions=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
        bentham=tuple(BENTHAM_OK[k] for k in BENTHAM_KEYS),
        judgment=0,
        options=("a", "b"),
    )
    assert second.id == "7"  # integer ids are accepted and stored as strings
    assert second.text == "어제 나는 친구에게 거짓말을 했다."
    assert second.source == "data"  # default: the file's stem
    assert second.emotions == (0.5, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert second.judgment == JUDGMENTS.index("nobody")  # case-insensitive
    assert second.bentham is None and second.options is None


def test_labels_may_be_null_or_absent_and_meta_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, row(emotions=None, bentham=None, judgment=None, options=None, meta={"x": 1}))
    (s,) = load_jsonl(path).scenarios
    assert (s.emotions, s.bentham, s.judgment, s.options) == (None, None, None, None)


def test_blank_lines_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    body = "\ufeff" + json.dumps(row(id="a")) + "\r\n\r\n   \n" + json.dumps(row(id="b")) + "\r\n"
    path.write_bytes(body.encode("utf-8"))
    assert [s.id for s in load_jsonl(path).scenarios] == ["a", "b"]


def test_empty_emotion_list_means_labeled_with_no_emotion(tmp_path: Path) -> None:
    (s,) = load_jsonl(write(tmp_path, row(emotions=[]))).scenarios
    assert s.emotions == (0.0,) * 6


def test_emotion_object_accepts_booleans(tmp_path: Path) -> None:
    emotions = {e: False for e in EMOTIONS} | {"anger": True}
    (s,) = load_jsonl(write(tmp_path, row(emotions=emotions))).scenarios
    assert s.emotions == (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------ file-level errors


def test_missing_file(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope.jsonl")
    assert "nope.jsonl: file not found" in str(err)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert "no scenarios" in str(load_error(path))
    path.write_text("\n  \n\n")
    assert "no scenarios" in str(load_error(path))


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(row(id="a")).encode() + b"\n" + b'{"id": "b", "text": "caf\xe9"}\n')
    err = load_error(path)
    assert str(err).startswith(f"{path}:2: not valid UTF-8")
    assert "0xe9" in str(err) and "UTF-8" in str(err)
    assert err.line == 2


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, row(id="a"), '{"id": "b", "text": "x",}')
    err = load_error(path)
    assert str(err).startswith(f"{path}:2: invalid JSON at column 25: Expecting property name")
    assert "pretty-printed" not in str(err)  # the hint is only for lines that are not a whole object
    assert err.line == 2


def test_pretty_printed_json_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "pretty.jsonl"
    path.write_text('{\n  "id": "a",\n  "text": "x"\n}\n')
    assert "one complete JSON object" in str(load_error(path))


def test_nan_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '{"id": "a", "text": "x", "bentham": {"intensity": NaN}}')
    assert "NaN is not valid JSON" in str(load_error(path))


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '{"id": "a", "text": "x", "text": "y"}')
    assert 'duplicate key "text"' in str(load_error(path))


@pytest.mark.parametrize(
    ("line", "expected"), [("[1, 2]", "got array"), ('"text"', "got string"), ("3", "got number")]
)
def test_line_must_be_an_object(tmp_path: Path, line: str, expected: str) -> None:
    err = str(load_error(write(tmp_path, line)))
    assert err.startswith(f"{tmp_path / 'data.jsonl'}:1: expected a JSON object per line")
    assert expected in err


# ------------------------------------------------------------------ field errors (message, field attribute)

FIELD_ERRORS = [
    (row(text=...), "text", "text: missing"),
    (row(text="   "), "text", "text: is empty"),
    (row(text=5), "text", "text = 5, must be a string, got number"),
    (row(id=...), "id", "id: missing"),
    (row(id=""), "id", "id: is empty"),
    (row(id=1.5), "id", "id = 1.5, must be a string or integer"),
    (row(id=True), "id", "id = true, must be a string or integer"),
    (row(source=""), "source", "source = \"\", must be a non-empty string"),
    (row(emotions="joy"), "emotions", 'emotions = "joy", must be an object with all six emotions'),
    (row(emotions=["joy", "hapiness"]), "emotions[1]", 'emotions[1] = "hapiness": unknown emotion'),
    (row(emotions=["joy", "joy"]), "emotions[1]", "listed twice"),
    (row(emotions=[1]), "emotions[0]", "must be an emotion name (string)"),
    (row(emotions={"joy": 1}), "emotions", "emotions: missing key(s) sadness, anger, fear, disgust, surprise"),
    (row(emotions={e: 0 for e in EMOTIONS} | {"love": 1}), "emotions.love", "emotions.love: unknown emotion key"),
    (row(emotions={e: 0 for e in EMOTIONS} | {"fear": 2}), "emotions.fear", "emotions.fear = 2, must be in [0, 1]"),
    (row(bentham=[0.1] * 8), "bentham", "bentham = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], must be an object"),
    (row(bentham=BENTHAM_OK | {"intensity": 1.7}), "bentham.intensity", "bentham.intensity = 1.7, must be in [0, 1]"),
    (row(bentham=BENTHAM_OK | {"valence": -1.5}), "bentham.valence", "bentham.valence = -1.5, must be in [-1, 1]"),
    (row(bentham=BENTHAM_OK | {"extent": "0.5"}), "bentham.extent", 'bentham.extent = "0.5", must be a number in [0, 1], got string'),
    (row(bentham=BENTHAM_OK | {"purity": True}), "bentham.purity", "not a boolean"),
    (row(bentham={k: v for k, v in BENTHAM_OK.items() if k != "extent"}), "bentham", "bentham: missing key(s) extent"),
    (row(bentham=BENTHAM_OK | {"intensty": 0.1}), "bentham.intensty", 'unknown key (did you mean "intensity"?)'),
    (row(judgment="guilty"), "judgment", 'judgment = "guilty": unknown class'),
    (row(judgment=0), "judgment", "judgment = 0, must be a class name (string)"),
    (row(options="be nice"), "options", 'options = "be nice", must be a list of strings'),
    (row(options=["ok", ""]), "options[1]", "options[1] = \"\", must be a non-empty string"),
    (row(emotion=["joy"]), "emotion", 'emotion: unknown key (did you mean "emotions"?)'),
    (row(meta=[1]), "meta", "meta = [1], must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "field", "fragment"), FIELD_ERRORS, ids=[f[2][:40] for f in FIELD_ERRORS])
def test_field_errors_name_file_line_field_and_problem(
    tmp_path: Path, obj: dict, field: str, fragment: str
) -> None:
    path = write(tmp_path, row(id="ok"), obj)
    err = load_error(path)
    assert str(err).startswith(f"{path}:2: "), str(err)
    assert fragment in str(err), str(err)
    assert (err.path, err.line, err.field) == (str(path), 2, field)


def test_unknown_judgment_lists_the_valid_classes(tmp_path: Path) -> None:
    err = str(load_error(write(tmp_path, row(judgment="autor"))))
    assert 'did you mean "author"?' in err
    assert "valid classes: author, other, everybody, nobody, unclear" in err


def test_unknown_emotion_lists_the_valid_ones(tmp_path: Path) -> None:
    err = str(load_error(write(tmp_path, row(emotions=["rage"]))))
    assert "valid emotions: joy, sadness, anger, fear, disgust, surprise" in err


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, row(id="a"), row(id="b"), "", row(id="a"))
    err = load_error(path)
    assert str(err).startswith(f'{path}:4: id = "a": duplicate id (first used on line 1)')


def test_integer_and_string_ids_collide(tmp_path: Path) -> None:
    assert "duplicate id" in str(load_error(write(tmp_path, row(id=1), row(id="1"))))


# ------------------------------------------------------------------ skip_invalid


def test_skip_invalid_keeps_good_rows_and_reports_bad_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        row(id="a"),
        "{broken",
        row(id="b", judgment="bogus"),
        "",
        row(id="a"),  # duplicate of line 1: skipped, the first one wins
        row(id="c", text="둘 다 잘못했다."),
    )
    result = load_jsonl(path, skip_invalid=True)
    assert [s.id for s in result.scenarios] == ["a", "c"]
    assert result.skipped == 3
    assert [e.split(": ")[0] for e in result.errors] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    with pytest.raises(DataError, match=r":2: invalid JSON"):
        load_jsonl(path)  # without skip_invalid the FIRST invalid line raises


def test_skip_invalid_with_nothing_valid_still_fails(tmp_path: Path) -> None:
    path = write(tmp_path, "{broken", row(text=""))
    with pytest.raises(
        DataError,
        match=r"no valid scenarios \(2 invalid line\(s\) skipped\); first error: .*:1: invalid JSON",
    ):
        load_jsonl(path, skip_invalid=True)


# ------------------------------------------------------------------ Scenario object


def test_scenario_rejects_misshaped_labels() -> None:
    with pytest.raises(ValueError, match="emotions must have 6"):
        Scenario(id="a", text="x", source="s", emotions=(1.0,))
    with pytest.raises(ValueError, match="bentham must have 8"):
        Scenario(id="a", text="x", source="s", bentham=(0.0,) * 7)
    with pytest.raises(ValueError, match="judgment index"):
        Scenario(id="a", text="x", source="s", judgment=5)
    with pytest.raises(ValueError, match="text must be non-empty"):
        Scenario(id="a", text=" ", source="s")


def test_scenario_from_dict_uses_the_location_in_errors() -> None:
    with pytest.raises(DataError, match=r"^row 3: judgment"):
        scenario_from_dict({"id": "a", "text": "x", "judgment": "maybe"}, location="row 3")


unit = st.floats(0.0, 1.0, allow_nan=False, width=32)
signed = st.floats(-1.0, 1.0, allow_nan=False, width=32)
scenarios = st.builds(
    Scenario,
    id=st.text(min_size=1, max_size=12).filter(str.strip),
    text=st.text(min_size=1, max_size=60).filter(str.strip),
    source=st.text(min_size=1, max_size=10).filter(str.strip),
    emotions=st.none() | st.tuples(*[unit] * 6),
    bentham=st.none() | st.tuples(*[unit] * 7, signed),
    judgment=st.none() | st.integers(0, 4),
    options=st.none() | st.lists(st.text(min_size=1, max_size=10).filter(str.strip), max_size=3).map(tuple),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios)
def test_to_dict_round_trips_through_a_file(tmp_path: Path, scenario: Scenario) -> None:
    path = tmp_path / "rt.jsonl"
    path.write_text(json.dumps(scenario.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
    (loaded,) = load_jsonl(path).scenarios
    assert loaded == scenario


def test_documented_examples_are_valid(tmp_path: Path) -> None:
    """Every full example line in docs/data.md must load (the docs must not drift from the code)."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "data.md"
    lines = [ln for ln in doc.read_text(encoding="utf-8").splitlines() if ln.startswith('{"id": ')]
    assert len(lines) >= 6
    path = tmp_path / "examples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = load_jsonl(path).scenarios
    assert len(loaded) == len(lines)
    assert any(HANGUL_RE.search(s.text) for s in loaded) and any(s.text.isascii() for s in loaded)
