"""The bag-of-words ridge baseline: the closed form it claims, determinism, and that it reads text."""

from __future__ import annotations

import torch

from redheart.data.bow_baseline import RIDGE, BowBaseline, _design, _feature_index, fit_bow_baseline
from redheart.data.evaluation import bow_baseline_metrics, compare_with_baselines


def _keyword_task(n: int = 120, seed: int = 0):
    """Judgment = which of tokens 10/11/12 a row contains; bentham intensity rises with token 20."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(30, 60, (n, 12), generator=g)
    ids[:, 0] = 2  # [CLS]
    cls = torch.arange(n) % 3
    ids[:, 3] = 10 + cls
    lengths = torch.randint(6, 13, (n,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = ids * mask  # PAD = 0
    bentham = torch.full((n, 8), 0.5)
    bentham[:, 0] = 0.2 + 0.6 * (cls == 1).float()
    labels = {
        "labels.emotions": torch.nn.functional.one_hot(cls, 6).float(),
        "labels.emotions_mask": torch.ones(n, dtype=torch.bool),
        "labels.bentham": bentham,
        "labels.bentham_mask": torch.ones(n, dtype=torch.bool),
        "labels.judgment": cls.clone(),
    }
    labels["labels.judgment"][::7] = -100  # some rows unlabeled for judgment: their own Gram matrix
    return ids, mask, labels


def test_the_fit_is_the_ridge_closed_form():
    ids, mask, labels = _keyword_task()
    bow = fit_bow_baseline(ids, mask, labels)
    k = bow.features.numel()
    x = _design(_feature_index(bow.features, 64)[ids], mask.bool(), k)  # [N, K+1] dense counts
    penalty = torch.eye(k + 1, dtype=torch.float64) * RIDGE
    penalty[k, k] = 0.0  # the constant is not penalised
    rows = labels["labels.judgment"] != -100
    y = torch.nn.functional.one_hot(labels["labels.judgment"][rows], 5).double()
    want = torch.linalg.solve(x[rows].T @ x[rows] + penalty, x[rows].T @ y)
    assert torch.allclose(bow.weights["judgment"], want, atol=1e-10)
    assert (
        2 not in bow.features.tolist() and 0 not in bow.features.tolist()
    )  # special tokens are not features


def test_the_fit_is_deterministic_and_round_trips_through_tensors():
    ids, mask, labels = _keyword_task()
    a, b = fit_bow_baseline(ids, mask, labels), fit_bow_baseline(ids, mask, labels)
    assert torch.equal(a.features, b.features)
    assert all(torch.equal(a.weights[h], b.weights[h]) for h in a.weights)
    c = BowBaseline.from_tensors(a.to_tensors())
    assert all(torch.equal(c.predict(ids, mask)[k], a.predict(ids, mask)[k]) for k in a.predict(ids, mask))


def test_it_reads_the_text_where_a_constant_cannot():
    ids, mask, labels = _keyword_task(seed=0)
    bow = fit_bow_baseline(ids, mask, labels)
    vids, vmask, vlabels = _keyword_task(n=60, seed=1)
    metrics = bow_baseline_metrics(bow, vids, vmask, vlabels)
    assert metrics["baseline_bow_judgment_accuracy"] == 1.0
    assert metrics["baseline_bow_bentham_mae"] < 0.02
    pred = bow.predict(vids, vmask)
    assert float(pred["bentham"][:, :7].min()) >= 0 and float(pred["regret"].min()) >= 0


def test_a_model_that_loses_to_a_baseline_is_told_so():
    worse = compare_with_baselines(
        {"bentham_mae": 0.117, "judgment_accuracy": 0.9},
        {
            "baseline_bow_bentham_mae": 0.028,
            "baseline_bentham_mae": 0.2,
            "baseline_bow_judgment_accuracy": 0.8,
            "baseline_judgment_accuracy": 0.4,
        },
    )
    assert worse == ["bentham_mae 0.1170 is worse than the bag-of-words baseline (0.0280, lower is better)"]
    assert compare_with_baselines({"judgment_accuracy": 0.3}, {"baseline_judgment_accuracy": 0.4}) == [
        "judgment_accuracy 0.3000 is worse than the trivial baseline (0.4000, higher is better)"
    ]
