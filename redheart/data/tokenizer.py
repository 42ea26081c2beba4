"""Byte-level BPE tokenizer (HF ``tokenizers``), trained offline from the corpus and stored as JSON.

Byte-level means every UTF-8 byte is in the base alphabet, so no text is ever out of vocabulary:
Korean (3 bytes per Hangul syllable) works from the first merge, and frequent syllables and words
become single tokens as the vocabulary grows. There is deliberately no normalizer (no NFC/NFKC,
no lower-casing), so ``decode(encode(text)) == text`` exactly, for English and Korean alike.

Special tokens have fixed ids that the model code relies on: ``[PAD]`` = 0 (padding, masked out),
``[UNK]`` = 1 (never produced by byte-level BPE, kept for format compatibility), ``[CLS]`` = 2
(prefixed to every sequence; pool from it), ``[SEP]`` = 3 (reserved).

The tokenizer is saved as the ``tokenizers`` JSON format only — never pickle — so a run directory
or checkpoint can be loaded without executing code from it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from redheart.data.schema import DataError

__all__ = [
    "PAD_ID",
    "UNK_ID",
    "CLS_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "MIN_VOCAB_SIZE",
    "EncodedTexts",
    "train_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_sha256",
    "encode_texts",
]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
"""Smallest useful vocabulary: the 4 special tokens plus the 256-symbol byte alphabet."""


@dataclass
class EncodedTexts:
    """Fixed-length token ids for a batch of texts.

    Attributes:
        input_ids: LongTensor [N, max_length]; ``[CLS]`` first, then tokens, then ``PAD_ID`` padding.
        attention_mask: LongTensor [N, max_length]; 1 for real tokens (including ``[CLS]``), 0 for padding.
        truncated: how many texts did not fit (``[CLS]`` + tokens > max_length) and were cut.
            Not an error: report it so the user can raise ``max_length`` if it is large.
        truncated_mask: BoolTensor [N], True for the rows that were cut.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: int
    truncated_mask: torch.Tensor | None = None


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (offline; deterministic for the same texts).

    Args:
        texts: the training corpus (iterated once).
        vocab_size: target vocabulary size including the 4 special tokens and 256 byte symbols
            (>= :data:`MIN_VOCAB_SIZE`). The result can be smaller if the corpus has fewer merges.
        path: if given, the tokenizer is saved there as JSON (parent directories created).

    Returns:
        The trained ``tokenizers.Tokenizer``; special tokens at ids 0–3.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (4 special tokens + 256 bytes), got {vocab_size!r}"
        )
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty texts)")

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    # add_prefix_space=False: adding a space would break exact round-trips of the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is memorisation, not vocabulary
        special_tokens=list(SPECIAL_TOKENS),  # added first, in order → ids 0..3
        # The full byte alphabet, so bytes absent from the training corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    _check_special_ids(tokenizer, "trained tokenizer")
    _treat_special_tokens_in_text_as_text(tokenizer)
    if path is not None:
        save_tokenizer(tokenizer, path)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Save as JSON atomically (temp file + rename) so a crash never leaves a truncated file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(tokenizer.to_str())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """Hex SHA-256 of the tokenizer's JSON: record it with a checkpoint to detect a swapped tokenizer."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _check_special_ids(tokenizer: Tokenizer, what: str) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise DataError(
                f"{what}: special token {token} has id {got}, expected {expected}; "
                "this is not a Red Heart tokenizer (train one with train_tokenizer)"
            )


def _treat_special_tokens_in_text_as_text(tokenizer: Tokenizer) -> None:
    # By default a literal "[PAD]" or "[CLS]" inside a scenario would be encoded as the special id,
    # so user text could forge padding or a second [CLS]. Encode it as ordinary bytes instead.
    # This flag is not stored in the JSON, hence it is set on every train and load.
    tokenizer.encode_special_tokens = True


def load_tokenizer(path: str | Path, *, max_bytes: int = 64 << 20) -> Tokenizer:
    """Load a tokenizer saved by :func:`train_tokenizer` (JSON only; never unpickles anything).

    Args:
        path: the ``tokenizer.json`` file.
        max_bytes: refuse larger files (a 64 MiB JSON is far beyond any sane vocabulary; the cap
            keeps a wrong or hostile path from exhausting memory).

    Raises:
        DataError: missing file, file over the cap, not UTF-8 / not a tokenizer JSON, or special
            tokens not at ids 0–3.
    """
    shown = str(path)
    file_path = Path(path)
    if not file_path.is_file():
        raise DataError(f"{shown}: tokenizer file not found", path=shown)
    size = file_path.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"{shown}: tokenizer file is {size} bytes, above the {max_bytes}-byte limit "
            "(wrong file? raise max_bytes only if you trust it)",
            path=shown,
        )
    try:
        text = file_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{shown}: not a tokenizer JSON file (not UTF-8 text)", path=shown) from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception subclass for malformed JSON
        raise DataError(f"{shown}: not a valid tokenizer JSON file: {exc}", path=shown) from None
    _check_special_ids(tokenizer, shown)
    _treat_special_tokens_in_text_as_text(tokenizer)
    return tokenizer


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> EncodedTexts:
    """Tokenize to fixed-length id tensors: ``[CLS] tokens… [PAD]…``, truncating long texts.

    Args:
        tokenizer: a tokenizer from :func:`train_tokenizer` / :func:`load_tokenizer`.
        texts: N texts.
        max_length: sequence length L including ``[CLS]`` (>= 2).

    Returns:
        :class:`EncodedTexts` with ``input_ids`` and ``attention_mask`` of shape [N, L].
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"max_length must be an integer >= 2 ([CLS] + at least one token), got {max_length!r}"
        )
    n = len(texts)
    if n == 0:
        empty = torch.zeros((0, max_length), dtype=torch.long)
        return EncodedTexts(empty, empty.clone(), 0, torch.zeros(0, dtype=torch.bool))
    # Special tokens are added here, not by a post-processor, so the stored tokenizer stays a
    # plain text<->ids mapping and the sequence layout lives in one place.
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    room = max_length - 1  # one slot is [CLS]
    rows: list[list[int]] = []
    lengths: list[int] = []
    cut: list[bool] = []
    for enc in encodings:
        ids = enc.ids
        cut.append(len(ids) > room)
        if len(ids) > room:
            ids = ids[:room]
        rows.append([CLS_ID, *ids] + [PAD_ID] * (room - len(ids)))
        lengths.append(len(ids) + 1)
    input_ids = torch.tensor(rows, dtype=torch.long)  # [N, L]
    # The mask comes from lengths, not from `ids != PAD_ID`, so it is right by construction.
    positions = torch.arange(max_length).unsqueeze(0)  # [1, L]
    attention_mask = (positions < torch.tensor(lengths).unsqueeze(1)).long()  # [N, L]
    truncated_mask = torch.tensor(cut, dtype=torch.bool)  # [N]
    return EncodedTexts(input_ids, attention_mask, int(truncated_mask.sum()), truncated_mask)
