"""Synthetic corpus: determinism, schema validity, label masking, and that labels follow from the text."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from redheart.data.generate import DEFAULT_COUNT, generate_scenarios, main, write_jsonl
from redheart.data.schema import EMOTIONS, JUDGMENTS, load_jsonl

HANGUL = re.compile(r"[\uac00-\ud7a3]")


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return generate_scenarios(6000, seed=123, korean_fraction=0.4)


def english(corpus: list[dict]) -> list[dict]:
    return [r for r in corpus if "-en-" in r["source"]]


def korean(corpus: list[dict]) -> list[dict]:
    return [r for r in corpus if "-ko-" in r["source"]]


# ------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", 1500, 7, 0.3).read_bytes()
    b = write_jsonl(tmp_path / "b.jsonl", 1500, 7, 0.3).read_bytes()
    c = write_jsonl(tmp_path / "c.jsonl", 1500, 8, 0.3).read_bytes()
    assert a == b
    assert a != c
    assert a.endswith(b"\n") and b"\r" not in a
    first = a.split(b"\n", 1)[0].decode("utf-8")
    assert (
        first.startswith('{"bentham": ') or first.startswith('{"emotions": ') or first.startswith('{"id": ')
    )  # sorted keys


def test_output_is_canonical_utf8_not_escaped(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "k.jsonl", 50, 0, 1.0).read_text(encoding="utf-8")
    assert HANGUL.search(data) and "\\u" not in data


def test_independent_of_global_random_state() -> None:
    random.seed(1)
    state = random.getstate()
    first = generate_scenarios(300, seed=5)
    assert random.getstate() == state  # the generator never touches the global RNG
    random.seed(999)
    assert generate_scenarios(300, seed=5) == first


def test_shorter_corpus_is_a_prefix_of_a_longer_one() -> None:
    assert generate_scenarios(200, seed=3) == generate_scenarios(500, seed=3)[:200]


def test_default_size_is_fast_unique_and_valid(tmp_path: Path) -> None:
    start = time.perf_counter()
    path = write_jsonl(tmp_path / "full.jsonl", DEFAULT_COUNT, 0, 0.3)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"generating {DEFAULT_COUNT} scenarios took {elapsed:.1f}s"
    result = load_jsonl(path)  # every record passes the strict schema
    assert len(result.scenarios) == DEFAULT_COUNT == 28882
    ids = [s.id for s in result.scenarios]
    assert ids[0] == "gen-000000" and ids[123] == "gen-000123" and len(set(ids)) == DEFAULT_COUNT


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="count"):
        generate_scenarios(-1)
    with pytest.raises(ValueError, match="korean_fraction"):
        generate_scenarios(10, korean_fraction=1.5)
    assert generate_scenarios(0) == []


# ------------------------------------------------------------------ content and masking


def test_languages_follow_korean_fraction() -> None:
    assert not any(HANGUL.search(r["text"]) for r in generate_scenarios(300, 1, korean_fraction=0.0))
    all_ko = generate_scenarios(300, 1, korean_fraction=1.0)
    assert all(HANGUL.search(r["text"]) and "-ko-" in r["source"] for r in all_ko)
    mixed = generate_scenarios(3000, 1, korean_fraction=0.3)
    share = sum("-ko-" in r["source"] for r in mixed) / len(mixed)
    assert 0.26 < share < 0.34


def test_all_classes_sources_and_some_missing_labels(corpus: list[dict]) -> None:
    n = len(corpus)
    judgments = Counter(r.get("judgment") for r in corpus)
    assert set(JUDGMENTS) <= set(judgments)
    assert 0.02 < judgments["unclear"] / n < 0.10  # a small class
    sources = {r["source"] for r in corpus}
    assert len(sources) == 8 and all(
        re.fullmatch(r"generated-(en|ko)-(relationships|family|work|community)", s) for s in sources
    )
    for key, rate in (("emotions", 0.10), ("bentham", 0.10), ("judgment", 0.05), ("options", 0.15)):
        missing = sum(key not in r for r in corpus) / n
        assert abs(missing - rate) < 0.025, (key, missing)
    for r in corpus:
        if "options" in r:
            assert 2 <= len(r["options"]) <= 3 and len(set(r["options"])) == len(r["options"])
        if "bentham" in r:
            assert all(0 <= v <= 1 for k, v in r["bentham"].items() if k != "valence")
            assert -1 <= r["bentham"]["valence"] <= 1
        if "emotions" in r:
            assert set(r["emotions"]) == set(EMOTIONS) and set(r["emotions"].values()) <= {0, 1}


def test_every_emotion_occurs_and_some_rows_are_multi_label(corpus: list[dict]) -> None:
    labeled = [r["emotions"] for r in corpus if "emotions" in r]
    for e in EMOTIONS:
        assert sum(x[e] for x in labeled) / len(labeled) > 0.05, e
    assert sum(sum(x.values()) >= 2 for x in labeled) / len(labeled) > 0.15


# ------------------------------------------------------------------ labels follow from the text

WRONG_EN = re.compile(r"\b(lied to|broke a promise|stole|ignored|took credit|insulted|spread rumors|read)\b")


def decode_judgment_en(text: str) -> str:
    """A 10-line rule-based reader: who did something wrong, from the actor phrase and the verb."""
    if "can't tell whether" in text or "hard to say" in text:
        return "unclear"
    match = WRONG_EN.search(text)
    if match is None:
        return "nobody"
    subject = text[: match.start()].split()[-1]
    return {"I": "author", "both": "everybody"}.get(subject, "other")


WRONG_KO = (
    "거짓말을 했",
    "약속을 어겼",
    "돈을 훔쳤",
    "전화를 무시했",
    "성과를 가로챘",
    "모욕했",
    "소문을 퍼뜨렸",
    "몰래 읽었",
)


def decode_judgment_ko(text: str) -> str:
    if "누가 " in text:
        return "unclear"
    for sentence in re.split(r"(?<=[.?])\s+", text):
        if any(verb in sentence for verb in WRONG_KO):
            if "나는 둘 다" in sentence:
                return "everybody"
            if "나는 " in sentence or "내가 " in sentence:
                return "author"
            return "other"
    return "nobody"


@pytest.mark.parametrize(("pick", "decode"), [(english, decode_judgment_en), (korean, decode_judgment_ko)])
def test_rule_based_reader_recovers_judgment(corpus: list[dict], pick, decode) -> None:
    rows = [r for r in pick(corpus) if "judgment" in r]
    hits = sum(decode(r["text"]) == r["judgment"] for r in rows)
    accuracy = hits / len(rows)
    assert accuracy > 0.95, accuracy  # learnable from the words (in fact exact)
    # ... and not a trivial class prior: the majority class alone is far below that.
    assert max(Counter(r["judgment"] for r in rows).values()) / len(rows) < 0.5


FEAR_EN = ("afraid", "scared", "don't know how it will turn out", "waiting to see")
SURPRISE_EN = ("Unexpectedly", "To my surprise", "To my shock", "Out of nowhere")


def test_fear_and_surprise_follow_from_words(corpus: list[dict]) -> None:
    rows = [r for r in english(corpus) if "emotions" in r]
    for r in rows:
        text = r["text"]
        assert r["emotions"]["fear"] == int(any(w in text for w in FEAR_EN)), text
        apologizer = re.search(r"(\S+) apologized to", text)
        other_apologized = apologizer is not None and apologizer.group(1) not in ("I", "both")
        assert r["emotions"]["surprise"] == int(any(w in text for w in SURPRISE_EN) or other_apologized), text


TIMES_EN = (
    ("this morning", 0.95), ("today", 0.95), ("yesterday", 0.85), ("last week", 0.7),
    ("last month", 0.5), ("last year", 0.3), ("a few years ago", 0.15), ("when I was a kid", 0.05),
)  # fmt: skip


def test_propinquity_follows_time_words(corpus: list[dict]) -> None:
    rows = [r for r in english(corpus) if "bentham" in r]
    for r in rows:
        lowered = r["text"].lower()
        nominal = next(value for phrase, value in TIMES_EN if phrase.lower() in lowered)
        assert abs(r["bentham"]["propinquity"] - nominal) <= 0.0305, r["text"]


def test_extent_grows_with_who_was_affected(corpus: list[dict]) -> None:
    rows = [r for r in english(corpus) if "bentham" in r]
    community = [
        r["bentham"]["extent"]
        for r in rows
        if "our community" in r["text"] or "the whole neighborhood" in r["text"]
    ]
    to_me = [
        r["bentham"]["extent"]
        for r in rows
        if re.search(r"\b(lied to|insulted|apologized to|helped) me\b", r["text"])
    ]
    assert community and to_me
    assert min(community) > 0.85 > 0.15 > max(to_me)


def test_valence_sign_follows_action(corpus: list[dict]) -> None:
    rows = [r for r in english(corpus) if "bentham" in r]
    stole = [r["bentham"]["valence"] for r in rows if " stole money " in r["text"]]
    donated = [r["bentham"]["valence"] for r in rows if " donated to " in r["text"]]
    assert sum(stole) / len(stole) < -0.5 and sum(donated) / len(donated) > 0.4


def test_text_length_does_not_give_away_the_judgment(corpus: list[dict]) -> None:
    """A length-only classifier (majority class per length decile) must not beat the prior by much."""
    rows = [r for r in corpus if "judgment" in r]
    lengths = sorted(len(r["text"]) for r in rows)
    edges = [lengths[len(lengths) * k // 10] for k in range(1, 10)]

    def bin_of(r: dict) -> int:
        return sum(len(r["text"]) >= e for e in edges)

    fit, held = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    per_bin: dict[int, Counter] = {}
    for r in fit:
        per_bin.setdefault(bin_of(r), Counter())[r["judgment"]] += 1
    prior = Counter(r["judgment"] for r in fit).most_common(1)[0][0]
    length_acc = sum(
        per_bin.get(bin_of(r), Counter({prior: 1})).most_common(1)[0][0] == r["judgment"] for r in held
    ) / len(held)
    prior_acc = sum(r["judgment"] == prior for r in held) / len(held)
    assert length_acc < prior_acc + 0.05, (length_acc, prior_acc)


def test_korean_text_is_hangul_with_correct_particles(corpus: list[dict]) -> None:
    texts = [r["text"] for r in korean(corpus)]
    # 이/가, 을/를, 과/와 must agree with the name's final sound: "민수가", "지훈이", never "민수이", "지훈가".
    vowel_final = "민수|현우|유나|소희|준호"
    consonant_final = "지연|서준|하은|도윤|수빈|지훈|예린|태민|다은|성민|미진"
    bad = [
        t
        for t in texts
        if re.search(rf"({vowel_final})[이을과] ", t) or re.search(rf"({consonant_final})[가를와] ", t)
    ]
    assert not bad, bad[:3]
    assert any(re.search(rf"({vowel_final})가 ", t) for t in texts)
    assert any(re.search(rf"({consonant_final})이 ", t) for t in texts)
    assert all(t.rstrip().endswith((".", "?", "다")) for t in texts)


# ------------------------------------------------------------------ CLI


def test_cli_writes_file_and_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "s.jsonl"
    assert main(["--out", str(out), "--count", "40", "--seed", "2", "--korean-fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 40 scenarios to {out}" in printed and "judgment:" in printed
    assert out.read_bytes() == write_jsonl(tmp_path / "again.jsonl", 40, 2, 0.5).read_bytes()


@pytest.mark.parametrize(
    "argv",
    [["--count", "5"], ["--out", "x.jsonl", "--count", "0"], ["--out", "x.jsonl", "--korean-fraction", "2"]],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "redheart-make-data" in capsys.readouterr().err
