"""Encoded dataset tensors, the hash split, per-epoch order with source weights, batch counting."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from redheart.data.dataset import (
    IGNORE_INDEX,
    LABEL_KEYS,
    EncodedDataset,
    batches_per_epoch,
    encode_dataset,
    epoch_order,
    split_train_validation,
)
from redheart.data.schema import DataError, Scenario
from redheart.data.tokenizer import CLS_ID, train_tokenizer

EMO = (1.0, 0.0, 0.0, 1.0, 0.0, 0.5)
BEN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, -0.8)


def scenario(i: int, **labels: object) -> Scenario:
    return Scenario(
        id=f"s{i}", text=f"Scenario number {i}: I helped my friend.", source=f"src{i % 3}", **labels
    )


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(
        [f"Scenario number {i}: I helped my friend. 나는 친구를 도와주었다." for i in range(50)], 300
    )


@pytest.fixture(scope="module")
def rows() -> list[Scenario]:
    return [
        scenario(0, emotions=EMO, bentham=BEN, judgment=2),
        scenario(1),
        scenario(2, emotions=(0.0,) * 6, judgment=0),
        scenario(3, bentham=BEN),
    ]


def test_encode_dataset_shapes_dtypes_and_masks(tok: Tokenizer, rows: list[Scenario]) -> None:
    ds = encode_dataset(rows, tok, 24)
    assert (
        len(ds) == 4 and ds.ids == ["s0", "s1", "s2", "s3"] and ds.sources == ["src0", "src1", "src2", "src0"]
    )
    assert ds.input_ids.shape == ds.attention_mask.shape == (4, 24)
    assert ds.input_ids.dtype == ds.attention_mask.dtype == torch.long
    assert (ds.input_ids[:, 0] == CLS_ID).all()
    assert ds.emotions.dtype == ds.bentham.dtype == torch.float32
    assert ds.emotions.shape == (4, 6) and ds.bentham.shape == (4, 8)
    assert ds.emotions_mask.dtype == ds.bentham_mask.dtype == torch.bool
    assert ds.emotions_mask.tolist() == [True, False, True, False]
    assert ds.bentham_mask.tolist() == [True, False, False, True]
    assert ds.judgment.dtype == torch.long and ds.judgment.tolist() == [2, IGNORE_INDEX, 0, IGNORE_INDEX]
    assert IGNORE_INDEX == -100
    assert torch.allclose(ds.emotions[0], torch.tensor(EMO)) and torch.allclose(
        ds.bentham[3], torch.tensor(BEN)
    )
    assert (
        not ds.emotions[1].any() and not ds.bentham[1].any() and not ds.bentham[2].any()
    )  # zeros where missing
    assert ds.truncated == 0 and ds.max_length == 24


def test_truncation_is_counted_and_kept_through_subset(tok: Tokenizer, rows: list[Scenario]) -> None:
    ds = encode_dataset(rows, tok, 4)
    assert ds.truncated == 4
    assert ds.subset([1, 2]).truncated == 2


def test_subset_and_labels(tok: Tokenizer, rows: list[Scenario]) -> None:
    ds = encode_dataset(rows, tok, 24)
    sub = ds.subset([3, 0, 0])
    assert isinstance(sub, EncodedDataset) and len(sub) == 3
    assert sub.ids == ["s3", "s0", "s0"] and sub.sources == ["src0", "src0", "src0"]
    assert torch.equal(sub.input_ids[1], ds.input_ids[0]) and torch.equal(
        sub.judgment, torch.tensor([-100, 2, 2])
    )
    assert len(ds.subset(torch.tensor([2]))) == 1
    assert len(ds.subset([])) == 0

    labels = ds.labels([2, 0])
    assert tuple(labels) == LABEL_KEYS == (
        "labels.emotions", "labels.emotions_mask", "labels.bentham", "labels.bentham_mask", "labels.judgment",
    )  # fmt: skip
    assert labels["labels.emotions"].shape == (2, 6) and labels["labels.bentham"].shape == (2, 8)
    assert labels["labels.emotions_mask"].tolist() == [True, True]
    assert labels["labels.bentham_mask"].tolist() == [False, True]
    assert labels["labels.judgment"].tolist() == [0, 2]
    with pytest.raises(IndexError, match=r"in \[0, 4\)"):
        ds.labels([4])
    with pytest.raises(IndexError):
        ds.subset([-1])


def test_dataset_rejects_inconsistent_shapes(tok: Tokenizer, rows: list[Scenario]) -> None:
    ds = encode_dataset(rows, tok, 24)
    with pytest.raises(ValueError, match=r"EncodedDataset.bentham has shape \(4, 7\), expected \(4, 8\)"):
        EncodedDataset(**{**ds.__dict__, "bentham": torch.zeros(4, 7)})


# ------------------------------------------------------------------ split


def many(n: int, start: int = 0) -> list[Scenario]:
    return [scenario(i) for i in range(start, start + n)]


def test_split_is_deterministic_disjoint_and_about_the_fraction() -> None:
    data = many(2000)
    train, val = split_train_validation(data, 0.2, seed=1)
    assert (train, val) == split_train_validation(data, 0.2, seed=1)
    assert {s.id for s in train}.isdisjoint({s.id for s in val})
    assert len(train) + len(val) == 2000
    assert 0.17 < len(val) / 2000 < 0.23
    assert [s.id for s in train] == [s.id for s in data if s in set(train)]  # file order kept
    _, other_val = split_train_validation(data, 0.2, seed=2)
    assert {s.id for s in other_val} != {s.id for s in val}


def test_adding_scenarios_never_moves_existing_ones() -> None:
    base = many(500)
    _, val_small = split_train_validation(base, 0.1, seed=0)
    _, val_big = split_train_validation(many(300, start=10_000) + base[::-1], 0.1, seed=0)
    assert {s.id for s in val_small} == {s.id for s in val_big if s.id in {b.id for b in base}}


def test_split_does_not_use_python_hash() -> None:
    code = (
        "from redheart.data.dataset import split_train_validation; from redheart.data.schema import Scenario;"
        "d=[Scenario(id=f'x{i}', text='t', source='s') for i in range(200)];"
        "print(','.join(s.id for s in split_train_validation(d, 0.3, 5)[1]))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""}, cwd=Path(__file__).resolve().parents[2],
        ).stdout
        for seed in ("3", "4")
    }  # fmt: skip
    assert len(outs) == 1


def test_split_edge_cases() -> None:
    train, val = split_train_validation(many(3), 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2  # a tiny corpus still gets one validation row
    assert split_train_validation(many(5), 0.0, seed=0) == (many(5), [])
    assert split_train_validation([], 0.1, seed=0) == ([], [])
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="validation_fraction"):
            split_train_validation(many(5), bad, seed=0)
    with pytest.raises(DataError, match="left no training scenarios"):
        split_train_validation(many(3), 0.9999999, seed=0)


# ------------------------------------------------------------------ epoch order


def test_epoch_order_is_a_deterministic_permutation() -> None:
    sources = ["a"] * 50 + ["b"] * 30
    order = epoch_order(sources, epoch=0, seed=7)
    assert sorted(order) == list(range(80))
    assert order == epoch_order(sources, epoch=0, seed=7)
    assert order != epoch_order(sources, epoch=1, seed=7)
    assert order != epoch_order(sources, epoch=0, seed=8)
    # (seed, epoch) is hashed, not added: (1, 0) and (0, 1) differ.
    assert epoch_order(sources, epoch=0, seed=1) != epoch_order(sources, epoch=1, seed=0)
    assert epoch_order([], 0, 0) == []


def test_equal_weights_give_a_permutation_of_the_eligible_rows() -> None:
    sources = ["a", "b", "c"] * 20
    order = epoch_order(sources, 0, 0, {"a": 2.0, "b": 2.0, "c": 0.0})
    assert sorted(order) == [i for i, s in enumerate(sources) if s != "c"]
    assert sorted(epoch_order(sources, 0, 0, {})) == list(range(60))


def test_weights_scale_how_often_rows_are_drawn() -> None:
    sources = ["a"] * 1000 + ["b"] * 1000 + ["zero"] * 500
    order = epoch_order(sources, 3, 0, {"a": 3.0, "zero": 0})
    assert len(order) == 2000  # number of eligible rows
    counts = Counter(sources[i] for i in order)
    assert "zero" not in counts
    assert 2.6 < counts["a"] / counts["b"] < 3.4  # unlisted "b" weighs 1.0
    assert order == epoch_order(sources, 3, 0, {"a": 3.0, "zero": 0})


def test_weight_errors() -> None:
    sources = ["generated-en-work", "mine"]
    with pytest.raises(DataError, match="unknown source\\(s\\) typo; known sources: generated-en-work, mine"):
        epoch_order(sources, 0, 0, {"typo": 1.0})
    with pytest.raises(DataError, match="must be a finite number >= 0"):
        epoch_order(sources, 0, 0, {"mine": -1.0})
    with pytest.raises(DataError, match="exclude every source"):
        epoch_order(sources, 0, 0, {"mine": 0, "generated-en-work": 0})


# ------------------------------------------------------------------ batches


@pytest.mark.parametrize(("n", "b", "expected"), [(10, 3, 3), (9, 3, 3), (2, 3, 0), (0, 4, 0), (8, 1, 8)])
def test_batches_per_epoch_drops_the_incomplete_batch(n: int, b: int, expected: int) -> None:
    assert batches_per_epoch(n, b) == expected


def test_batches_per_epoch_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        batches_per_epoch(10, 0)
    with pytest.raises(ValueError, match="n_rows"):
        batches_per_epoch(-1, 2)
