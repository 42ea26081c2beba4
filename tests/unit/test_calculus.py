"""The felicific calculus: the documented worked example, properties, validation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from redheart import calculus
from redheart.calculus import COUNTERFACTUALS, FIELDS, PERSPECTIVES, TRANSFORMS

DOC = Path(__file__).resolve().parents[2] / "docs" / "regret.md"
PROPERTY = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------- strategies


@st.composite
def bentham_rows(draw, min_rows: int = 1, max_rows: int = 40) -> np.ndarray:
    rows = draw(st.integers(min_rows, max_rows))
    unit = st.floats(0.0, 1.0, width=32, allow_nan=False)
    circumstances = draw(arrays(np.float32, (rows, 7), elements=unit))
    valence = draw(arrays(np.float32, (rows, 1), elements=st.floats(-1.0, 1.0, width=32, allow_nan=False)))
    return np.concatenate([circumstances, valence], axis=1)


def one_vector(**fixed) -> st.SearchStrategy:
    parts = []
    for name in FIELDS:
        if name in fixed:
            value = fixed[name]
            parts.append(value if isinstance(value, st.SearchStrategy) else st.just(value))
        else:
            lo = -1.0 if name == "valence" else 0.0
            parts.append(st.floats(lo, 1.0, allow_nan=False))
    return st.tuples(*parts).map(lambda t: np.array(t, dtype=np.float64))


# ----------------------------------------------------------------------------- the worked example


def _doc_example() -> dict:
    text = DOC.read_text(encoding="utf-8")
    marker = text.index("<!-- regret-example")
    block = text[marker:].split("```text", 1)[1].split("```", 1)[0]
    example: dict = {"rows": {}}
    for line in block.strip().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("input "):
            example["input"] = np.array([float(v) for v in line.split()[1:]])
        elif line.startswith("best "):
            example["best"] = line.split()[1]
        elif line.startswith("regret "):
            example["regret"] = float(line.split()[1])
        else:
            head, persp, utility = (part.split() for part in line.split("|"))
            example["rows"][head[0]] = (
                np.array([float(v) for v in head[1:]]),
                np.array([float(v) for v in persp]),
                float(utility[0]),
            )
    return example


def test_doc_example_matches_the_calculus():
    ex = _doc_example()
    x = ex["input"]
    assert list(ex["rows"]) == ["actual", *COUNTERFACTUALS], "the doc lists every action in order"
    result = calculus.score(x[None, :])  # float64: the doc works in decimals

    vector, persp, utility = ex["rows"]["actual"]
    np.testing.assert_allclose(vector, x, atol=1e-12)
    np.testing.assert_allclose(result.actual_perspectives[0], persp, atol=5e-7)
    assert result.actual_utility[0] == pytest.approx(utility, abs=5e-7)
    for j, name in enumerate(COUNTERFACTUALS):
        vector, persp, utility = ex["rows"][name]
        # The documented transformed vector is what the transform table gives.
        expected = [
            min(
                max(TRANSFORMS[name][f][0] * x[i] + TRANSFORMS[name][f][1], -1.0 if f == "valence" else 0.0),
                1.0,
            )
            for i, f in enumerate(FIELDS)
        ]
        np.testing.assert_allclose(vector, expected, atol=1e-12, err_msg=name)
        for k, perspective in enumerate(PERSPECTIVES):
            assert calculus.hedonic_value(vector, perspective) == pytest.approx(persp[k], abs=5e-7), (
                name,
                perspective,
            )
        assert result.counterfactual_utilities[0, j] == pytest.approx(utility, abs=5e-7), name
    assert result.best_name == [ex["best"]]
    assert COUNTERFACTUALS[int(result.best_index[0])] == ex["best"]
    assert float(result.regret[0]) == pytest.approx(ex["regret"], abs=5e-7)
    np.testing.assert_allclose(result.best_perspectives[0], ex["rows"][ex["best"]][1], atol=5e-7)


def test_time_factor_hand_sums():
    # The doc's closed forms for propinquity 1, duration 0.5: 2·Σ1/(131+6j), 4·Σ1/(259+6j), 8·Σ1/(513+2j).
    assert calculus.TIME_STEPS == 32
    base = np.array([1.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0])  # intensity, valence, certainty 1; no extent
    hand = {
        "agent": 2 * sum(1 / (131 + 6 * j) for j in range(32)),
        "affected": 4 * sum(1 / (259 + 6 * j) for j in range(32)),
        "society": 8 * sum(1 / (513 + 2 * j) for j in range(32)),
    }
    for perspective, value in hand.items():
        assert calculus.hedonic_value(base, perspective) == pytest.approx(value, rel=1e-12)


# ----------------------------------------------------------------------------- structure


def test_names_counts_and_shapes():
    assert len(COUNTERFACTUALS) >= 7 and len(set(COUNTERFACTUALS)) == len(COUNTERFACTUALS)
    assert COUNTERFACTUALS[:7] == (
        "inaction",
        "delay",
        "rule_following",
        "bolder",
        "consult_others",
        "caution",
        "reversal",
    )
    assert PERSPECTIVES == ("agent", "affected", "society")
    assert calculus.CIRCUMSTANCES == (
        "intensity",
        "duration",
        "certainty",
        "propinquity",
        "fecundity",
        "purity",
        "extent",
    )
    x = np.random.default_rng(0).random((5, 8)).astype(np.float32)
    for r in range(1, len(COUNTERFACTUALS) + 1):
        for p in range(1, 4):
            res = calculus.score(x, r, p)
            assert res.regret.dtype == np.float32 and res.regret.shape == (5,)
            assert res.best_index.dtype == np.int64 and res.best_index.max() < r
            assert res.counterfactual_utilities.shape == (5, r)
            assert res.actual_perspectives.shape == (5, p) and res.best_perspectives.shape == (5, p)
            assert res.regret_computations == 5 * r and res.bentham_evaluations == 5 * r * p
            assert res.best_name == [COUNTERFACTUALS[i] for i in res.best_index]
    assert calculus.score(x).bentham_evaluations == 5 * 21  # 21 per scenario, as designed


def test_fewer_counterfactuals_are_a_prefix():
    x = np.random.default_rng(1).random((20, 8)).astype(np.float32)
    full = calculus.score(x, 7, 3)
    part = calculus.score(x, 3, 3)
    np.testing.assert_array_equal(part.counterfactual_utilities, full.counterfactual_utilities[:, :3])
    np.testing.assert_array_equal(part.actual_utility, full.actual_utility)


def test_empty_batch():
    res = calculus.score(np.zeros((0, 8), np.float32))
    assert res.regret.shape == (0,) and res.regret_computations == 0 and res.best_name == []


def test_score_tensor_matches_score_and_detaches():
    x = torch.rand(6, 8, requires_grad=True)
    out = calculus.score_tensor(x)
    assert out.dtype == torch.float32 and out.shape == (6,) and not out.requires_grad
    assert out.device == x.device
    np.testing.assert_array_equal(out.numpy(), calculus.score(x.detach().numpy()).regret)


# ----------------------------------------------------------------------------- properties


@PROPERTY
@given(bentham_rows())
def test_regret_is_nonnegative_and_finite(x):
    res = calculus.score(x)
    assert np.all(res.regret >= 0) and np.all(np.isfinite(res.regret))
    best = res.counterfactual_utilities.max(axis=1)
    np.testing.assert_allclose(res.regret, np.maximum(best - res.actual_utility, 0).astype(np.float32))


@PROPERTY
@given(
    one_vector(
        intensity=st.floats(0.9, 1.0),
        duration=1.0,
        certainty=1.0,
        propinquity=st.floats(0.05, 1.0),
        fecundity=1.0,
        purity=1.0,
        extent=1.0,
        valence=1.0,
    )
)
def test_zero_regret_when_the_actual_action_beats_every_counterfactual(x):
    # Full duration, certainty, purity, fecundity, extent and valence and near-full intensity: every transform
    # takes away more than it adds (bolder gains at most 1/0.9 in intensity but loses at least 15%
    # in certainty and purity; the others lose intensity, a sooner start or the valence).
    res = calculus.score(x[None, :])
    assert np.all(res.counterfactual_utilities[0] < res.actual_utility[0])
    assert res.regret[0] == 0.0


def test_zero_regret_constructed_case():
    res = calculus.score(np.array([[1.0, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32))
    assert res.regret[0] == 0.0
    assert np.all(res.counterfactual_utilities[0] < res.actual_utility[0])


@PROPERTY
@given(
    one_vector(valence=st.floats(0.01, 1.0)),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.sampled_from(PERSPECTIVES),
)
def test_value_rises_with_intensity_for_pleasure(x, a, b, perspective):
    lo, hi = sorted((a, b))
    low, high = x.copy(), x.copy()
    low[0], high[0] = lo, hi
    assert calculus.hedonic_value(high, perspective) >= calculus.hedonic_value(low, perspective)
    # Utility too (mean over the perspectives).
    res = calculus.score(np.stack([low, high]))
    assert res.actual_utility[1] >= res.actual_utility[0]


@PROPERTY
@given(
    one_vector(valence=st.floats(-1.0, -0.01)),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.sampled_from(PERSPECTIVES),
)
def test_value_falls_with_intensity_for_pain(x, a, b, perspective):
    lo, hi = sorted((a, b))
    low, high = x.copy(), x.copy()
    low[0], high[0] = lo, hi
    assert calculus.hedonic_value(high, perspective) <= calculus.hedonic_value(low, perspective)


@PROPERTY
@given(
    one_vector(
        intensity=st.floats(0.0, 0.9),
        duration=st.floats(0.05, 1),
        certainty=st.floats(0.05, 1),
        propinquity=st.floats(0.05, 1),
        purity=st.floats(0.05, 1),
        valence=st.sampled_from([-0.7, 0.7]),
    ),
    st.sampled_from(PERSPECTIVES),
)
def test_strictly_monotone_in_intensity_in_the_interior(x, perspective):
    # Away from the degenerate corners (no duration, no certainty, or society's factor
    # 1 + (fecundity + purity - 1) = 0) every other factor is > 0, so the change is strict.
    higher = x.copy()
    higher[0] += 0.1
    if x[7] > 0:
        assert calculus.hedonic_value(higher, perspective) > calculus.hedonic_value(x, perspective)
    else:
        assert calculus.hedonic_value(higher, perspective) < calculus.hedonic_value(x, perspective)


@PROPERTY
@given(bentham_rows())
def test_same_input_same_output(x):
    a, b = calculus.score(x), calculus.score(x.copy())
    np.testing.assert_array_equal(a.regret, b.regret)
    np.testing.assert_array_equal(a.best_index, b.best_index)
    np.testing.assert_array_equal(a.counterfactual_utilities, b.counterfactual_utilities)


@PROPERTY
@given(bentham_rows(min_rows=2, max_rows=60), st.data())
def test_chunking_invariance(x, data):
    whole = calculus.score(x)
    # Every row alone ...
    for i in range(x.shape[0]):
        alone = calculus.score(x[i : i + 1])
        assert alone.regret[0] == whole.regret[i]
        np.testing.assert_array_equal(alone.counterfactual_utilities[0], whole.counterfactual_utilities[i])
        np.testing.assert_array_equal(alone.actual_perspectives[0], whole.actual_perspectives[i])
    # ... and any contiguous split, as the worker pool makes.
    cut = data.draw(st.integers(1, x.shape[0] - 1))
    parts = [calculus.score(x[:cut]), calculus.score(x[cut:])]
    np.testing.assert_array_equal(np.concatenate([p.regret for p in parts]), whole.regret)
    np.testing.assert_array_equal(np.concatenate([p.best_index for p in parts]), whole.best_index)
    np.testing.assert_array_equal(
        np.concatenate([p.best_perspectives for p in parts]), whole.best_perspectives
    )


def test_chunking_invariance_across_internal_blocks():
    # Larger than the calculus's internal block, cut at odd places and embedded in other batches.
    rng = np.random.default_rng(7)
    x = rng.random((1500, 8)).astype(np.float32)
    x[:, 7] = x[:, 7] * 2 - 1
    whole = calculus.score(x)
    other = rng.random((333, 8)).astype(np.float32)
    mixed = calculus.score(np.concatenate([other, x[700:1100]]))
    np.testing.assert_array_equal(mixed.regret[333:], whole.regret[700:1100])
    np.testing.assert_array_equal(
        mixed.counterfactual_utilities[333:], whole.counterfactual_utilities[700:1100]
    )
    for lo, hi in ((0, 513), (513, 1029), (1029, 1500)):
        np.testing.assert_array_equal(calculus.score(x[lo:hi]).regret, whole.regret[lo:hi])


def test_float32_and_float64_inputs_agree():
    x = np.random.default_rng(3).random((10, 8)).astype(np.float32)
    np.testing.assert_array_equal(calculus.score(x).regret, calculus.score(x.astype(np.float64)).regret)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros(8), "shape [B, 8]"),
        (np.zeros((3, 7)), "got shape [3, 7]"),
        (np.zeros((2, 3, 8)), "got shape [2, 3, 8]"),
        (np.array([["a"] * 8]), "real numbers"),
    ],
)
def test_validation_of_shape_and_type(array, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        calculus.validate_bentham(array)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        calculus.score(array)


@pytest.mark.parametrize(
    "row, col, value, fragment",
    [
        (1, 5, np.nan, "row 1, column 5 (purity) is nan"),
        (2, 0, np.inf, "row 2, column 0 (intensity) is inf"),
        (0, 7, -np.inf, "row 0, column 7 (valence) is -inf"),
        (0, 2, 1.5, "row 0, field certainty = 1.5 is outside [0, 1]"),
        (2, 6, -0.25, "row 2, field extent = -0.25 is outside [0, 1]"),
        (1, 7, -1.25, "row 1, field valence = -1.25 is outside [-1, 1]"),
    ],
)
def test_validation_names_row_field_and_value(row, col, value, fragment):
    x = np.full((3, 8), 0.5, np.float32)
    x[row, col] = value
    with pytest.raises(ValueError, match=re.escape(fragment)):
        calculus.validate_bentham(x)


def test_validation_tolerates_float32_overshoot_and_clips_it():
    x = np.full((2, 8), 0.5, np.float32)
    x[0, 0] = np.float32(1.0000005)
    x[1, 7] = np.float32(-1.0000005)
    calculus.validate_bentham(x)
    exact = x.copy()
    exact[0, 0], exact[1, 7] = 1.0, -1.0
    np.testing.assert_array_equal(calculus.score(x).regret, calculus.score(exact).regret)
    x[0, 0] = np.float32(1.00001)
    with pytest.raises(ValueError, match="intensity"):
        calculus.validate_bentham(x)


def test_counts_and_perspective_arguments_are_checked():
    x = np.full((1, 8), 0.5)
    with pytest.raises(ValueError, match="regrets_per_step = 8 must be in 1..7"):
        calculus.score(x, regrets_per_step=8)
    with pytest.raises(ValueError, match="regrets_per_step = 0"):
        calculus.score(x, regrets_per_step=0)
    with pytest.raises(ValueError, match="bentham_per_regret = 4 must be in 1..3"):
        calculus.score(x, bentham_per_regret=4)
    with pytest.raises(ValueError, match="unknown perspective 'god'"):
        calculus.hedonic_value(x[0], "god")
    with pytest.raises(ValueError, match="8 numbers"):
        calculus.hedonic_value([0.5] * 7, "agent")
    assert calculus.hedonic_value(x[0], 2) == calculus.hedonic_value(x[0], "society")
