"""Byte-level BPE tokenizer: special ids, exact English/Korean round trips, determinism, safe loading."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from redheart.data.generate import generate_scenarios
from redheart.data.schema import DataError
from redheart.data.tokenizer import (
    CLS_ID,
    MIN_VOCAB_SIZE,
    PAD_ID,
    SPECIAL_TOKENS,
    encode_texts,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [r["text"] for r in generate_scenarios(1500, seed=11, korean_fraction=0.4)]


@pytest.fixture(scope="module")
def tok(texts: list[str]) -> Tokenizer:
    return train_tokenizer(texts, 1200)


ROUND_TRIP = [
    "Yesterday, I lied to my friend Alex at the café.",
    "어제 회사에서 나는 팀장님에게 거짓말을 했다.",
    "Mixed 한국어 and English, with  double  spaces,\ttabs\nand newlines.",
    "  leading and trailing spaces  ",
    "Unseen scripts: 你好, Ελληνικά, emoji 🙂👍🏽, combining é (e + U+0301).",
    "Literal special tokens in text: [PAD] [CLS] [UNK] [SEP]",
    "ㅋㅋㅋ 자모만 있는 문장 ㅠㅠ",
]


def test_special_token_ids(tok: Tokenizer) -> None:
    assert (PAD_ID, CLS_ID) == (0, 2)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 1200


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trips_exactly(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_literal_special_tokens_in_text_are_not_special(tok: Tokenizer) -> None:
    ids = tok.encode("a [PAD] b [CLS]", add_special_tokens=False).ids
    assert not set(ids) & {0, 1, 2, 3}


def test_korean_is_learned_not_left_as_bytes(tok: Tokenizer) -> None:
    text = "나는 친구에게 거짓말을 했다."
    n_tokens = len(tok.encode(text, add_special_tokens=False).ids)
    assert n_tokens < len(text.encode("utf-8")) / 3  # frequent syllables/words merged


def test_training_is_deterministic_and_saved_as_json(texts: list[str], tmp_path: Path) -> None:
    path = tmp_path / "run" / "tokenizer.json"
    first = train_tokenizer(texts, 1200, path)
    second = train_tokenizer(list(texts), 1200)
    assert first.to_str() == second.to_str()
    assert tokenizer_sha256(first) == tokenizer_sha256(second)
    stored = json.loads(path.read_text(encoding="utf-8"))  # plain JSON on disk
    assert stored["model"]["type"] == "BPE"
    assert load_tokenizer(path).to_str() == first.to_str()


def test_training_is_deterministic_across_processes(tmp_path: Path) -> None:
    # A fresh interpreter (different hash seed) must produce the same vocabulary and merges.
    code = (
        "import sys; from redheart.data.generate import generate_scenarios;"
        "from redheart.data.tokenizer import train_tokenizer, tokenizer_sha256;"
        "t=[r['text'] for r in generate_scenarios(400, seed=2)];"
        "print(tokenizer_sha256(train_tokenizer(t, 600)))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""},
            cwd=Path(__file__).resolve().parents[2],
        ).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert len(outs) == 1


def test_train_argument_errors() -> None:
    with pytest.raises(ValueError, match=f">= {MIN_VOCAB_SIZE}"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", ""], 1000)


# ------------------------------------------------------------------ loading


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")


def test_load_refuses_files_over_the_cap(tok: Tokenizer, tmp_path: Path) -> None:
    path = save_tokenizer(tok, tmp_path / "t.json")
    size = path.stat().st_size
    with pytest.raises(DataError, match=rf"is {size} bytes, above the {size - 1}-byte limit"):
        load_tokenizer(path, max_bytes=size - 1)
    assert load_tokenizer(path, max_bytes=size).get_vocab_size() == tok.get_vocab_size()


def test_load_refuses_pickle_and_garbage(tmp_path: Path) -> None:
    pickled = tmp_path / "t.pkl"
    pickled.write_bytes(pickle.dumps({"model": "BPE"}))
    with pytest.raises(DataError, match="not a tokenizer JSON file|not a valid tokenizer JSON"):
        load_tokenizer(pickled)
    garbage = tmp_path / "g.json"
    garbage.write_text('{"hello": 1}')
    with pytest.raises(DataError, match="not a valid tokenizer JSON file"):
        load_tokenizer(garbage)


def test_load_refuses_a_tokenizer_with_other_special_ids(tmp_path: Path) -> None:
    from tokenizers import models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(
        ["hello world"] * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "[PAD]"])
    )
    path = tmp_path / "other.json"
    other.save(str(path))
    with pytest.raises(
        DataError, match=r"special token \[PAD\] has id 1, expected 0; this is not a Red Heart tokenizer"
    ):
        load_tokenizer(path)


# ------------------------------------------------------------------ encode_texts


def test_encode_texts_layout(tok: Tokenizer) -> None:
    texts = ["I helped my mom.", "나는 엄마를 도와주었다.", "x"]
    out = encode_texts(tok, texts, 32)
    assert out.input_ids.shape == out.attention_mask.shape == (3, 32)
    assert out.input_ids.dtype == out.attention_mask.dtype == torch.long
    assert out.truncated == 0
    assert (out.input_ids[:, 0] == CLS_ID).all()
    for row, text in enumerate(texts):
        n = int(out.attention_mask[row].sum())
        assert out.attention_mask[row, :n].all() and not out.attention_mask[row, n:].any()  # 1s then 0s
        assert (out.input_ids[row, n:] == PAD_ID).all()
        assert tok.decode(out.input_ids[row, 1:n].tolist()) == text  # the real tokens are the text


def test_encode_texts_truncates_and_counts(tok: Tokenizer) -> None:
    long = "I lied to my friend at the café yesterday and it ended badly. " * 5
    out = encode_texts(tok, [long, "short", long], 8)
    assert out.input_ids.shape == (3, 8)
    assert out.truncated == 2
    assert out.truncated_mask.tolist() == [True, False, True]
    assert out.attention_mask[0].all()
    full = tok.encode(long, add_special_tokens=False).ids
    assert out.input_ids[0, 1:].tolist() == full[:7]  # keeps the beginning


def test_encode_texts_exact_fit_is_not_truncation(tok: Tokenizer) -> None:
    n = len(tok.encode("I helped my mom.", add_special_tokens=False).ids)
    out = encode_texts(tok, ["I helped my mom."], n + 1)
    assert out.truncated == 0 and out.attention_mask.all()


def test_encode_texts_edge_cases(tok: Tokenizer) -> None:
    empty = encode_texts(tok, [], 16)
    assert empty.input_ids.shape == (0, 16) and empty.truncated == 0
    with pytest.raises(ValueError, match="max_length"):
        encode_texts(tok, ["x"], 1)
