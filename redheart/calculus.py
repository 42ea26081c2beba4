"""Bentham's felicific calculus and counterfactual regret: the one pure function everyone shares.

The regret service's workers, the GPU stage's in-process scorer and the single-process reference
all call :func:`score`, so an equivalence test can include regret and a batch split across worker
processes gives bit-identical numbers to the whole batch scored at once. docs/regret.md has the
same formulas with a worked example (tests/unit/test_calculus.py checks the doc's numbers).

Input: a Bentham vector per scenario, ``[B, 8]``::

    intensity, duration, certainty, propinquity, fecundity, purity, extent   in [0, 1]
    valence                                                                   in [-1, 1]

Hedonic value of a vector ``x`` from perspective ``p`` (Bentham, *Principles*, ch. IV: the value of
a sensation for one person is set by intensity, duration, certainty and propinquity; the tendency of
the act by fecundity and purity; the number of persons by extent)::

    h_p(x) = valence * intensity
             * time_p(duration, propinquity)            how long, and how soon, discounted
             * lerp(1, certainty, wc_p)                 lerp(1, y, w) = (1 - w) + w * y
             * (1 + rho_p * (fecundity + purity - 1))   secondary sensations: same kind with chance
                                                        `fecundity`, opposite kind with chance 1 - purity
             * (1 + kappa_p * extent)                   persons reached

    time_p(L, q) = (L / K) * sum_{j=0}^{K-1} 1 / (1 + k_p * (s + (j + 1/2) * L / K)),   s = 1 - q

The sensation starts at ``s = 1 - propinquity`` (propinquity 1: now; 0: one horizon away) and lasts
``L = duration`` horizons; each perspective discounts a moment ``t`` hyperbolically by
``1 / (1 + k_p t)`` (``k_p``: its impatience), summed over K = 32 equal moments of the sensation.
The sum, not the closed form ``ln(...) / k_p``, is the definition: it needs only ``+ * /``, which
keeps every number bit-identical however a batch is split (see below).

Every factor after ``valence * intensity`` is >= 0 (``rho_p <= 1``), so ``h_p`` rises with intensity
when the valence is positive and falls with it when the valence is negative.

Utility of an action = mean of ``h_p`` over the selected perspectives. Counterfactual actions are
per-field affine transforms of the predicted vector, clipped back into range (see
:data:`TRANSFORMS`). regret = max(0, best counterfactual utility - actual utility).

Determinism and chunking invariance: only elementwise ``+ - * /``, ``min``/``max`` and ``argmax``
over the counterfactual axis are used (no transcendental functions, no reductions across scenarios,
no randomness), so each scenario's numbers depend only on its own row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is only needed by score_tensor; the regret workers never import it
    import torch

__all__ = [
    "CIRCUMSTANCES",
    "FIELDS",
    "VECTOR_SIZE",
    "COUNTERFACTUALS",
    "TRANSFORMS",
    "PERSPECTIVES",
    "PERSPECTIVE_WEIGHTS",
    "PerspectiveWeights",
    "TIME_STEPS",
    "RegretResult",
    "hedonic_value",
    "score",
    "score_tensor",
    "validate_bentham",
    "check_counts",
]

CIRCUMSTANCES = ("intensity", "duration", "certainty", "propinquity", "fecundity", "purity", "extent")
FIELDS = CIRCUMSTANCES + ("valence",)
VECTOR_SIZE = len(FIELDS)  # 8
RANGE_TOLERANCE = 1e-6
"""Values outside [0, 1] / [-1, 1] by at most this much are accepted (and clipped): float32 heads
produce such values (e.g. a sigmoid's 1.0000001)."""

_I, _D, _C, _P, _F, _U, _E, _V = range(VECTOR_SIZE)


# ----------------------------------------------------------------------------- counterfactuals

# Each counterfactual maps the predicted vector x to x' = clip(scale * x + shift) field by field
# (circumstances clipped to [0, 1], valence to [-1, 1]). Fields not listed are unchanged
# (scale 1, shift 0). Order matters: regrets_per_step = N uses the first N.
_TRANSFORM_SPEC: tuple[tuple[str, str, dict[str, tuple[float, float]]], ...] = (
    (
        "inaction",
        "do nothing: the effect mostly does not happen and sets little in motion",
        {"intensity": (0.25, 0.0), "fecundity": (0.5, 0.0)},
    ),
    (
        "delay",
        "act later: the effect is further away and less sure; time to reflect removes some side effects",
        {"certainty": (0.9, 0.0), "propinquity": (0.5, 0.0), "purity": (0.9, 0.1)},
    ),
    (
        "rule_following",
        "follow the established rule: milder, more predictable, fewer side effects, valence pulled toward mildly good",
        {"intensity": (0.8, 0.0), "certainty": (0.7, 0.3), "purity": (0.8, 0.2), "valence": (0.8, 0.1)},
    ),
    (
        "bolder",
        "act more decisively: stronger, longer and wider, but less certain and less pure",
        {
            "intensity": (1.3, 0.0),
            "duration": (1.1, 0.0),
            "certainty": (0.8, 0.0),
            "purity": (0.85, 0.0),
            "extent": (1.2, 0.0),
        },
    ),
    (
        "consult_others",
        "consult the people concerned first: surer, more fruitful and reaching more people, but later and diluted",
        {
            "intensity": (0.9, 0.0),
            "certainty": (0.8, 0.2),
            "propinquity": (0.6, 0.0),
            "fecundity": (0.8, 0.2),
            "extent": (0.8, 0.2),
        },
    ),
    (
        "caution",
        "act cautiously: weaker and shorter, but surer and purer",
        {"intensity": (0.7, 0.0), "duration": (0.9, 0.0), "certainty": (0.6, 0.4), "purity": (0.7, 0.3)},
    ),
    (
        "reversal",
        "do the opposite: the same circumstances with the valence negated",
        {"valence": (-1.0, 0.0)},
    ),
)

COUNTERFACTUALS: tuple[str, ...] = tuple(name for name, _, _ in _TRANSFORM_SPEC)
TRANSFORMS: dict[str, dict[str, tuple[float, float]]] = {
    name: {f: spec.get(f, (1.0, 0.0)) for f in FIELDS} for name, _, spec in _TRANSFORM_SPEC
}
"""name -> field -> (scale, shift): x'[field] = clip(scale * x[field] + shift)."""
TRANSFORM_DESCRIPTIONS: dict[str, str] = {name: text for name, text, _ in _TRANSFORM_SPEC}

# [R, 8] scale and shift; row j is counterfactual j.
_SCALE = np.array([[TRANSFORMS[n][f][0] for f in FIELDS] for n in COUNTERFACTUALS], dtype=np.float64)
_SHIFT = np.array([[TRANSFORMS[n][f][1] for f in FIELDS] for n in COUNTERFACTUALS], dtype=np.float64)
_LOW = np.array([0.0] * 7 + [-1.0], dtype=np.float64)
_HIGH = np.ones(VECTOR_SIZE, dtype=np.float64)


# ----------------------------------------------------------------------------- perspectives


TIME_STEPS = 32
"""K: moments a sensation is divided into by time_p."""


@dataclass(frozen=True)
class PerspectiveWeights:
    """How one perspective counts the circumstances (see the module docstring for the formula)."""

    impatience: float
    """k >= 0: a moment t horizons away counts 1 / (1 + k t); 0 is indifferent to when it comes."""
    certainty: float
    """wc in [0, 1]: 0 ignores uncertainty, 1 multiplies by the certainty fully."""
    secondary: float
    """rho in [0, 1]: weight of the secondary sensations (fecundity and impurity)."""
    extent: float
    """kappa >= 0: each unit of extent adds kappa times the single-person value."""


PERSPECTIVES = ("agent", "affected", "society")
PERSPECTIVE_WEIGHTS: dict[str, PerspectiveWeights] = {
    # The agent feels its own sensation: impatient, counts the risk fully, pays moderate attention
    # to what follows and discounts how many others are reached.
    "agent": PerspectiveWeights(impatience=3.0, certainty=1.0, secondary=0.5, extent=0.25),
    # The people affected feel it as it comes but are less sure of the agent's odds; they care
    # more about what follows and count each other.
    "affected": PerspectiveWeights(impatience=1.5, certainty=0.75, secondary=0.75, extent=1.0),
    # Society is patient (remote effects count almost fully), pools risks, weighs fecundity and
    # purity most and multiplies by the number of people reached.
    "society": PerspectiveWeights(impatience=0.25, certainty=0.5, secondary=1.0, extent=3.0),
}


# ----------------------------------------------------------------------------- validation


def check_counts(regrets_per_step: int, bentham_per_regret: int) -> None:
    """Raise ValueError unless 1 <= regrets_per_step <= 7 and 1 <= bentham_per_regret <= 3."""
    if isinstance(regrets_per_step, bool) or not isinstance(regrets_per_step, (int, np.integer)):
        raise ValueError(f"regrets_per_step must be an integer, got {regrets_per_step!r}")
    if isinstance(bentham_per_regret, bool) or not isinstance(bentham_per_regret, (int, np.integer)):
        raise ValueError(f"bentham_per_regret must be an integer, got {bentham_per_regret!r}")
    if not 1 <= regrets_per_step <= len(COUNTERFACTUALS):
        raise ValueError(
            f"regrets_per_step = {regrets_per_step} must be in 1..{len(COUNTERFACTUALS)} "
            f"(counterfactuals: {', '.join(COUNTERFACTUALS)})"
        )
    if not 1 <= bentham_per_regret <= len(PERSPECTIVES):
        raise ValueError(
            f"bentham_per_regret = {bentham_per_regret} must be in 1..{len(PERSPECTIVES)} "
            f"(perspectives: {', '.join(PERSPECTIVES)})"
        )


def validate_bentham(array) -> None:
    """Raise ValueError naming the problem unless ``array`` is a finite [B, 8] Bentham batch in range.

    Circumstances must lie in [0, 1] and valence in [-1, 1], each within RANGE_TOLERANCE.
    The message names the row, the field and the value of the first offending entry.
    """
    try:
        arr = np.asarray(array)
    except Exception as exc:  # e.g. ragged nested lists
        raise ValueError(f"bentham is not an array: {exc}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValueError(f"bentham must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != VECTOR_SIZE:
        raise ValueError(
            f"bentham must have shape [B, {VECTOR_SIZE}] ({', '.join(FIELDS)}), got shape {list(arr.shape)}"
        )
    if arr.shape[0] == 0:
        return
    low = _LOW - RANGE_TOLERANCE
    high = _HIGH + RANGE_TOLERANCE
    # Fast path: one pass of comparisons (NaN compares False, so it fails too); rows are searched
    # for the message only on failure.
    if arr.dtype == np.float32:
        low, high = low.astype(np.float32), high.astype(np.float32)  # no float64 copy of the batch
    if np.logical_and(arr >= low, arr <= high).all():
        return
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            row, col = (int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(
                f"bentham row {row}, column {col} ({FIELDS[col]}) is {arr[row, col]} (must be finite)"
            )
    bad = (arr < low) | (arr > high)
    row, col = (int(i) for i in np.argwhere(bad)[0])
    bounds = "[-1, 1]" if col == _V else "[0, 1]"
    raise ValueError(f"bentham row {row}, field {FIELDS[col]} = {float(arr[row, col])!r} is outside {bounds}")


# ----------------------------------------------------------------------------- the calculus


def _lerp1(value: np.ndarray, weight: float) -> np.ndarray:
    # (1 - w) + w * y: the factor of a circumstance counted with weight w.
    return (1.0 - weight) + weight * value


def _time_value(duration: np.ndarray, propinquity: np.ndarray, impatience: float) -> np.ndarray:
    """time_p: (L / K) * sum_j 1 / (1 + k (s + (j + 1/2) L / K)), s = 1 - propinquity, L = duration."""
    start = 1.0 - propinquity
    base = 1.0 + impatience * start  # 1 + k s
    step = (impatience / TIME_STEPS) * duration  # k L / K
    total = np.zeros_like(duration)
    for j in range(TIME_STEPS):  # fixed order: the same sum for every row, however the batch is cut
        total += 1.0 / (base + (j + 0.5) * step)
    return total * (duration / TIME_STEPS)


def _hedonic(x: np.ndarray, weights: PerspectiveWeights) -> np.ndarray:
    """h_p for every vector of x [..., 8] (float64, in range) -> [...]. The one formula."""
    value = x[..., _V] * x[..., _I]
    value = value * _time_value(x[..., _D], x[..., _P], weights.impatience)
    value = value * _lerp1(x[..., _C], weights.certainty)
    value = value * (1.0 + weights.secondary * ((x[..., _F] + x[..., _U]) - 1.0))
    value = value * (1.0 + weights.extent * x[..., _E])
    return value


def _as_clipped_float64(bentham) -> np.ndarray:
    x = np.array(bentham, dtype=np.float64, copy=True)  # float32 -> float64 is exact
    np.clip(x, _LOW, _HIGH, out=x)  # removes the tolerated float32 overshoot
    return x


def _perspective(perspective: str | int) -> PerspectiveWeights:
    if isinstance(perspective, (int, np.integer)) and not isinstance(perspective, bool):
        if not 0 <= perspective < len(PERSPECTIVES):
            raise ValueError(f"perspective index {perspective} must be in 0..{len(PERSPECTIVES) - 1}")
        return PERSPECTIVE_WEIGHTS[PERSPECTIVES[perspective]]
    if perspective not in PERSPECTIVE_WEIGHTS:
        raise ValueError(f"unknown perspective {perspective!r}; choose one of {', '.join(PERSPECTIVES)}")
    return PERSPECTIVE_WEIGHTS[perspective]


def hedonic_value(vector: Sequence[float] | np.ndarray, perspective: str | int) -> float:
    """Hedonic value of one Bentham vector (8 numbers) from one perspective (name or index)."""
    x = np.asarray(vector, dtype=np.float64)
    if x.shape != (VECTOR_SIZE,):
        raise ValueError(
            f"a Bentham vector has {VECTOR_SIZE} numbers ({', '.join(FIELDS)}), got shape {list(x.shape)}"
        )
    weights = _perspective(perspective)
    validate_bentham(x[None, :])
    return float(_hedonic(_as_clipped_float64(x[None, :]), weights)[0])


@dataclass
class RegretResult:
    """Everything :func:`score` computes for a batch of B scenarios (R counterfactuals, P perspectives)."""

    regret: np.ndarray
    """float32 [B]: max(0, best counterfactual utility - actual utility)."""
    best_index: np.ndarray
    """int64 [B]: index into COUNTERFACTUALS of the best counterfactual (first one on ties)."""
    best_name: list[str]
    """[B] names of the best counterfactuals."""
    actual_utility: np.ndarray
    """float64 [B]: utility of the predicted (actual) action."""
    counterfactual_utilities: np.ndarray
    """float64 [B, R]: utility of each counterfactual."""
    actual_perspectives: np.ndarray
    """float64 [B, P]: hedonic value of the actual action from each perspective."""
    best_perspectives: np.ndarray
    """float64 [B, P]: hedonic value of the best counterfactual from each perspective."""
    regret_computations: int
    """B * R: one regret comparison per counterfactual."""
    bentham_evaluations: int
    """B * R * P: 21 per scenario by default. The actual action's P evaluations are the shared
    baseline of all R comparisons and are not counted, as the original design counted 7 x 3."""


def score(bentham: np.ndarray, regrets_per_step: int = 7, bentham_per_regret: int = 3) -> RegretResult:
    """Counterfactual regret of a batch of Bentham vectors [B, 8] (validated; see the module docstring)."""
    check_counts(regrets_per_step, bentham_per_regret)
    validate_bentham(bentham)
    x = _as_clipped_float64(bentham)  # [B, 8]
    batch = x.shape[0]
    r, p = int(regrets_per_step), int(bentham_per_regret)
    actual_persp = np.empty((batch, p), dtype=np.float64)  # [B, P]
    cf_persp = np.empty((batch, r, p), dtype=np.float64)  # [B, R, P]
    actual_utility = np.empty(batch, dtype=np.float64)  # [B]
    cf_utility = np.empty((batch, r), dtype=np.float64)  # [B, R]
    # Rows are independent, so working through the batch in blocks changes no number; it keeps
    # the temporaries in the CPU cache (whole-batch temporaries of a 20k batch are ~10 MB each).
    for lo in range(0, batch, _BLOCK_ROWS):
        hi = min(lo + _BLOCK_ROWS, batch)
        _score_block(
            x[lo:hi], r, p, actual_persp[lo:hi], cf_persp[lo:hi], actual_utility[lo:hi], cf_utility[lo:hi]
        )

    best = np.argmax(cf_utility, axis=1).astype(np.int64)  # [B], first maximum on ties
    rows = np.arange(batch)
    best_utility = cf_utility[rows, best]  # [B]
    regret = np.maximum(best_utility - actual_utility, 0.0).astype(np.float32)  # [B]
    return RegretResult(
        regret=regret,
        best_index=best,
        best_name=[COUNTERFACTUALS[i] for i in best.tolist()],
        actual_utility=actual_utility,
        counterfactual_utilities=cf_utility,
        actual_perspectives=actual_persp,
        best_perspectives=cf_persp[rows, best, :],
        regret_computations=batch * r,
        bentham_evaluations=batch * r * p,
    )


_BLOCK_ROWS = 512


def _score_block(x, r, p, actual_persp, cf_persp, actual_utility, cf_utility) -> None:
    """Fill the output views for rows x [b, 8] (float64, clipped)."""
    # Counterfactual vectors: [b, R, 8] = clip(x[:, None, :] * scale + shift).
    cf = x[:, None, :] * _SCALE[None, :r, :]
    cf += _SHIFT[None, :r, :]
    np.clip(cf, _LOW, _HIGH, out=cf)
    actual_sum = np.zeros(x.shape[0], dtype=np.float64)  # [b]
    cf_sum = np.zeros(cf.shape[:2], dtype=np.float64)  # [b, R]
    for k in range(p):  # summed in perspective order, then divided: the documented mean
        weights = PERSPECTIVE_WEIGHTS[PERSPECTIVES[k]]
        actual_persp[:, k] = _hedonic(x, weights)
        cf_persp[:, :, k] = _hedonic(cf, weights)
        actual_sum += actual_persp[:, k]
        cf_sum += cf_persp[:, :, k]
    np.divide(actual_sum, p, out=actual_utility)
    np.divide(cf_sum, p, out=cf_utility)


def score_tensor(
    bentham: torch.Tensor, regrets_per_step: int = 7, bentham_per_regret: int = 3
) -> torch.Tensor:
    """In-process regret for a torch batch [B, 8]: float32 [B] on the input's device.

    Detaches first: regret is a training target, never a path for gradients.
    """
    import torch

    values = bentham.detach().to(device="cpu", dtype=torch.float32).numpy()
    result = score(values, regrets_per_step, bentham_per_regret)
    return torch.from_numpy(result.regret).to(bentham.device)
