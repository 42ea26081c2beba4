"""Validation metrics and text-blind baselines: masking, hand-computed values, no NaN."""

from __future__ import annotations

import math

import pytest
import torch

from redheart.data.evaluation import baseline_metrics, compute_metrics


def labels(
    emotions: list[list[float]],
    emotions_mask: list[bool],
    bentham: list[list[float]],
    bentham_mask: list[bool],
    judgment: list[int],
    regret: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    out = {
        "labels.emotions": torch.tensor(emotions, dtype=torch.float32),
        "labels.emotions_mask": torch.tensor(emotions_mask),
        "labels.bentham": torch.tensor(bentham, dtype=torch.float32),
        "labels.bentham_mask": torch.tensor(bentham_mask),
        "labels.judgment": torch.tensor(judgment),
    }
    if regret is not None:
        out["regret_target"] = torch.tensor(regret)
    return out


def logits_from(probs: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(probs).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


N = 4
E = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
B = [[0.5] * 7 + [0.0], [0.2] * 7 + [-0.5], [1.0] * 7 + [1.0], [0.0] * 8]


def test_perfect_predictions() -> None:
    lab = labels(E, [True] * N, B, [True] * N, [0, 1, 2, 3], regret=[0.0, 0.1, 0.2, 0.3])
    pred = {
        "emotion_logits": logits_from([[0.99 if v else 0.01 for v in row] for row in E]),
        "bentham": torch.tensor(B),
        "judgment_logits": torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float(),
        "regret": torch.tensor([0.0, 0.1, 0.2, 0.3]),
    }
    m = compute_metrics(pred, lab)
    assert m == pytest.approx(
        {"judgment_accuracy": 1.0, "emotion_macro_f1": 1.0, "bentham_mae": 0.0, "regret_mae": 0.0}
    )


def test_hand_computed_values_and_masking() -> None:
    # Row 3 is unlabeled for every head and holds garbage predictions: it must not count.
    lab = labels(E, [True, True, True, False], B, [True, True, False, False], [0, 4, -100, -100])
    pred = {
        # Predict joy on rows 0 and 2, nothing else (row 3 predicts everything — masked out).
        "emotion_logits": torch.tensor(
            [[5.0, -5, -5, -5, -5, -5], [-5.0] * 6, [5.0, -5, -5, -5, -5, -5], [5.0] * 6]
        ),
        "bentham": torch.tensor([[0.6] * 7 + [0.0], [0.2] * 7 + [-0.1], [9.0] * 8, [9.0] * 8]),
        "judgment_logits": torch.tensor(
            [[3.0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0], [0, 3.0, 0, 0, 0]]
        ),
    }
    m = compute_metrics(pred, lab)
    assert m["judgment_accuracy"] == pytest.approx(0.5)  # row 0 right, row 1 wrong, rows 2-3 unlabeled
    # Labeled rows 0-2. joy: TP=1 (row 0), FP=1 (row 2), FN=1 (row 1) → F1 = 2/(2+1+1) = 0.5.
    # sadness: TP=0, FN=1 → 0. surprise: FN=1 → 0. anger/fear/disgust: no positives, no predictions → undefined, left out.
    assert m["emotion_macro_f1"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    # Rows 0-1: |0.6-0.5|*7 + 0 ; 0*7 + |−0.1+0.5| → (0.7 + 0.4) / 16.
    assert m["bentham_mae"] == pytest.approx(1.1 / 16)
    assert "regret_mae" not in m  # no regret target given


def test_keys_omitted_without_labeled_rows_and_never_nan() -> None:
    lab = labels(E, [False] * N, B, [False] * N, [-100] * N, regret=[float("nan")] * N)
    pred = {
        "emotion_logits": torch.zeros(N, 6),
        "bentham": torch.zeros(N, 8),
        "judgment_logits": torch.zeros(N, 5),
        "regret": torch.zeros(N),
    }
    assert compute_metrics(pred, lab) == {}
    # All-negative targets and all-negative predictions: every emotion's F1 is undefined → omitted.
    lab = labels([[0] * 6] * N, [True] * N, B, [False] * N, [-100] * N)
    assert compute_metrics({"emotion_logits": torch.full((N, 6), -3.0)}, lab) == {}


def test_regret_mae_skips_non_finite_targets() -> None:
    lab = labels(E, [False] * N, B, [False] * N, [-100] * N, regret=[1.0, float("nan"), 0.0, float("inf")])
    m = compute_metrics({"regret": torch.tensor([0.5, 100.0, 0.5, 100.0])}, lab)
    assert m == {"regret_mae": pytest.approx(0.5)}


def test_shape_errors_name_the_key() -> None:
    lab = labels(E, [True] * N, B, [True] * N, [0] * N)
    with pytest.raises(ValueError, match=r"judgment_logits has shape \(4, 3\), expected \(4, 5\)"):
        compute_metrics({"judgment_logits": torch.zeros(N, 3)}, lab)
    with pytest.raises(ValueError, match=r"bentham has shape \(3, 8\)"):
        compute_metrics({"bentham": torch.zeros(3, 8)}, lab)


def test_accepts_grad_tensors() -> None:
    lab = labels(E, [True] * N, B, [True] * N, [0] * N)
    logits = torch.zeros(N, 5, requires_grad=True)
    assert compute_metrics({"judgment_logits": logits * 2}, lab)["judgment_accuracy"] == 1.0


# ------------------------------------------------------------------ baselines


def test_baseline_metrics() -> None:
    # Train: judgment mostly 3; joy in 3/4 rows (majority → on), sadness in 1/4 (majority → off, best constant → on),
    # the other emotions never (both → off).
    train = labels(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
        [True, True, True, True, False],
        [[0.2] * 8, [0.4] * 8, [0.9] * 8, [0.9] * 8, [0.9] * 8],
        [True, True, False, False, False],
        [3, 3, 1, -100, 3],
        regret=[0.0, 1.0, 2.0, float("nan"), 3.0],
    )
    val = labels(
        [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
        [True, True, True],
        [[0.3] * 8, [0.3] * 8, [0.0] * 8],
        [True, True, False],
        [3, 1, 3],
        regret=[1.5, 1.5, 1.5],
    )
    m = baseline_metrics(train, val)
    assert set(m) == {
        "baseline_judgment_accuracy",
        "baseline_emotion_macro_f1",
        "baseline_emotion_macro_f1_majority",
        "baseline_emotion_macro_f1_best_constant",
        "baseline_bentham_mae",
        "baseline_regret_mae",
    }
    assert m["baseline_judgment_accuracy"] == pytest.approx(2 / 3)  # class 3 is the train majority
    # majority: joy on (val joy 2/3 → F1 = 2*2/(4+1) = 0.8), sadness off with 2 positives → 0 → mean 0.4.
    assert m["baseline_emotion_macro_f1_majority"] == pytest.approx(0.4)
    # best constant: joy on (0.8), sadness on (F1 = 2*2/(4+1) = 0.8) → 0.8.
    assert m["baseline_emotion_macro_f1_best_constant"] == pytest.approx(0.8)
    assert m["baseline_emotion_macro_f1"] == pytest.approx(0.8)  # the stronger of the two
    assert m["baseline_bentham_mae"] == pytest.approx(0.0)  # train mean 0.3 on labeled rows
    assert m["baseline_regret_mae"] == pytest.approx(0.0)  # mean of finite targets = 1.5

    # A tie in the train judgment counts goes to the lowest class index (deterministic).
    tie = dict(train, **{"labels.judgment": torch.tensor([3, 3, 1, -100, 1])})
    assert baseline_metrics(tie, val)["baseline_judgment_accuracy"] == pytest.approx(1 / 3)


def test_all_positive_baseline_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    n = 4000
    emotions = (torch.rand(n, 6, generator=g) < torch.tensor([0.35, 0.4, 0.2, 0.2, 0.1, 0.2])).float()
    lab = {"labels.emotions": emotions, "labels.emotions_mask": torch.ones(n, dtype=torch.bool)}
    m = baseline_metrics(lab, lab)
    p = emotions.mean(0).double()
    assert m["baseline_emotion_macro_f1_best_constant"] == pytest.approx(float((2 * p / (1 + p)).mean()))
    assert m["baseline_emotion_macro_f1_majority"] == 0.0  # every emotion below 50 % → "never"
    assert set(m) == {
        "baseline_emotion_macro_f1",
        "baseline_emotion_macro_f1_majority",
        "baseline_emotion_macro_f1_best_constant",
    }
    assert not any(math.isnan(v) for v in m.values())
