"""The honest yardstick: a bag-of-words linear model per head, fitted in closed form on the train split.

A trained transformer that cannot beat a ridge regression on token counts has not learned the text;
the trivial (text-blind) baselines cannot show that. Per head, on that head's labeled train rows:

* features: counts of the ``MAX_FEATURES`` most frequent non-special tokens (document frequency,
  ties to the lower id) plus a constant; rows ``[CLS] t1 t2 ...`` as the model sees them;
* ridge regression ``W = (X^T X + RIDGE * I') ^-1 X^T Y`` in float64 (the constant is not penalised);
* emotion: targets 0/1 (soft labels binarised at 0.5), reported as logits ``p - 0.5`` so that
  "positive" means ``p > 0.5``; bentham: the 8 values, clipped into their ranges; judgment: one-hot
  targets, the class is the argmax ("logistic-ish least squares"); regret: the calculus' regret of the
  labeled Bentham vectors (what the regret head would learn from a perfect Bentham head), >= 0.

Deterministic: ``X^T X`` is counted exactly in integers (bincount over token pairs), the solve is
one float64 LU factorisation; no random state, no iteration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from redheart.data.schema import JUDGMENTS
from redheart.data.tokenizer import SPECIAL_TOKENS

MAX_FEATURES = 2048
"""Vocabulary cap: the Gram matrix is (K+1)^2 float64 (32 MiB at 2048), whatever the model's vocab."""
RIDGE = 1.0
"""Ridge penalty on the token weights (counts are O(1) per row, so 1.0 is a mild penalty)."""
_CHUNK = 2048  # rows per chunk of pair counting: [chunk, L, L] int64 pair indices stay ~64 MiB at L=64
HEADS = ("emotion", "bentham", "judgment", "regret")


@dataclass
class BowBaseline:
    """Token-id -> feature index map and one [K+1, out] float64 weight matrix per head (last row: bias)."""

    features: torch.Tensor  # int64 [K] token ids, feature k is token features[k]
    weights: dict[str, torch.Tensor]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"bow.features": self.features.contiguous()}
        out.update({f"bow.{head}": w.contiguous() for head, w in self.weights.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> BowBaseline | None:
        if "bow.features" not in tensors:
            return None
        features = tensors["bow.features"].long()
        weights = {h: tensors[f"bow.{h}"].double() for h in HEADS if f"bow.{h}" in tensors}
        for head, w in weights.items():
            if w.ndim != 2 or w.shape[0] != features.numel() + 1:
                raise ValueError(
                    f"bow.{head} has shape {tuple(w.shape)}, expected [{features.numel() + 1}, out]"
                )
        return cls(features, weights)

    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model-shaped predictions for rows [N, L]: the keys compute_metrics reads."""
        vocab = int(max(int(input_ids.max()) + 1 if input_ids.numel() else 1, int(self.features.max()) + 1))
        index = _feature_index(self.features, vocab)
        out: dict[str, list[torch.Tensor]] = {}
        for lo in range(0, input_ids.shape[0], _CHUNK):
            x = _design(
                index[input_ids[lo : lo + _CHUNK]],
                attention_mask[lo : lo + _CHUNK].bool(),
                self.features.numel(),
            )
            for head, w in self.weights.items():
                out.setdefault(head, []).append(x @ w)  # [c, out]
        raw = {h: torch.cat(v) for h, v in out.items()}
        pred: dict[str, torch.Tensor] = {}
        if "emotion" in raw:
            pred["emotion_logits"] = (raw["emotion"] - 0.5).float()  # [N, 6]: > 0 iff p > 0.5
        if "bentham" in raw:
            b = raw["bentham"]
            pred["bentham"] = torch.cat(
                [b[:, :7].clamp(0, 1), b[:, 7:].clamp(-1, 1)], dim=1
            ).float()  # [N, 8]
        if "judgment" in raw:
            pred["judgment_logits"] = raw["judgment"].float()  # [N, 5]
        if "regret" in raw:
            pred["regret"] = raw["regret"][:, 0].clamp_min(0).float()  # [N]
        return pred


def _feature_index(features: torch.Tensor, vocab: int) -> torch.Tensor:
    """LongTensor [vocab]: feature index of each token id, -1 for tokens that are not features."""
    index = torch.full((vocab,), -1, dtype=torch.long)
    index[features] = torch.arange(features.numel())
    return index


def _design(feat: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Counts [c, K+1] float64 (last column: 1) from feature indices [c, L] (-1: not a feature)."""
    keep = mask & (feat >= 0)  # [c, L]
    rows = torch.arange(feat.shape[0])[:, None].expand_as(feat)  # [c, L]
    x = torch.zeros(feat.shape[0], k + 1, dtype=torch.float64)  # [c, K+1]
    x.index_put_((rows[keep], feat[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    x[:, k] = 1.0
    return x


def _solve(feat: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Ridge weights [K+1, out] for rows feat/mask [n, L] and targets y [n, out]."""
    kk = k + 1
    gram = torch.zeros(kk * kk, dtype=torch.int64)  # flattened [K+1, K+1], exact integer counts
    xty = torch.zeros(kk, y.shape[1], dtype=torch.float64)  # [K+1, out]
    for lo in range(0, feat.shape[0], _CHUNK):
        f, m = feat[lo : lo + _CHUNK], mask[lo : lo + _CHUNK]
        f = torch.where(m & (f >= 0), f, torch.full_like(f, -1))
        # The constant feature sits in an extra column so pair counting covers bias terms too.
        f = torch.cat([f, torch.full((f.shape[0], 1), k, dtype=torch.long)], dim=1)  # [c, L+1]
        valid = f >= 0
        pairs = f[:, :, None] * kk + f[:, None, :]  # [c, L+1, L+1]
        both = valid[:, :, None] & valid[:, None, :]  # [c, L+1, L+1]
        gram += torch.bincount(pairs[both], minlength=kk * kk)
        xty += _design(f[:, :-1], valid[:, :-1], k).T @ y[lo : lo + _CHUNK].double()
    a = gram.view(kk, kk).double()  # [K+1, K+1]
    a[torch.arange(k), torch.arange(k)] += RIDGE
    return torch.linalg.solve(a, xty)


def fit_bow_baseline(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    *,
    regrets_per_step: int = 7,
    bentham_per_regret: int = 3,
) -> BowBaseline:
    """Fit every head that has labeled rows in `labels` (the keys of EncodedDataset.labels)."""
    mask = attention_mask.bool()
    ids = input_ids.long()
    vocab = int(ids.max()) + 1 if ids.numel() else len(SPECIAL_TOKENS)
    doc_freq = torch.zeros(vocab, dtype=torch.long)
    for lo in range(0, ids.shape[0], _CHUNK):
        present = torch.zeros(min(_CHUNK, ids.shape[0] - lo), vocab, dtype=torch.bool)  # [c, V]
        rows = torch.arange(present.shape[0])[:, None].expand_as(ids[lo : lo + _CHUNK])
        m = mask[lo : lo + _CHUNK]
        present[rows[m], ids[lo : lo + _CHUNK][m]] = True
        doc_freq += present.sum(0)
    doc_freq[: len(SPECIAL_TOKENS)] = 0  # [CLS] is in every row: the constant already covers it
    # Stable sort on -frequency keeps ties in token-id order: the same features on every machine.
    order = torch.sort(-doc_freq, stable=True).indices
    features = order[:MAX_FEATURES][doc_freq[order[:MAX_FEATURES]] > 0]
    k = features.numel()
    feat = _feature_index(features, vocab)[ids]  # [N, L]
    targets: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (head, row mask [N], targets [M, out])
    emo_rows = labels["labels.emotions_mask"].bool()
    if bool(emo_rows.any()):
        targets.append(("emotion", emo_rows, (labels["labels.emotions"][emo_rows] >= 0.5).double()))  # [M, 6]
    ben_rows = labels["labels.bentham_mask"].bool()
    if bool(ben_rows.any()):
        bentham = labels["labels.bentham"][ben_rows]  # [M, 8]
        targets.append(("bentham", ben_rows, bentham.double()))
        from redheart import calculus

        regret = calculus.score(bentham.float().numpy(), regrets_per_step, bentham_per_regret).regret
        targets.append(("regret", ben_rows, torch.from_numpy(regret).double()[:, None]))  # [M, 1]
    jud = labels["labels.judgment"].long()
    jud_rows = jud != -100
    if bool(jud_rows.any()):
        targets.append(
            ("judgment", jud_rows, torch.nn.functional.one_hot(jud[jud_rows], len(JUDGMENTS)).double())
        )
    # Heads labeled on the same rows share one Gram matrix and one solve (the bundled corpus labels
    # every head on every row): the solve is linear in the targets, so this changes no number's meaning.
    weights: dict[str, torch.Tensor] = {}
    groups: list[tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]] = []
    for head, rows, y in targets:
        for group_rows, members in groups:
            if torch.equal(group_rows, rows):
                members.append((head, y))
                break
        else:
            groups.append((rows, [(head, y)]))
    for rows, members in groups:
        solved = _solve(
            feat[rows], mask[rows], torch.cat([y for _h, y in members], dim=1), k
        )  # [K+1, sum(out)]
        col = 0
        for head, y in members:
            weights[head] = solved[:, col : col + y.shape[1]].clone()
            col += y.shape[1]
    return BowBaseline(features, weights)


# ---- the baselines file (checkpoint and model folder): what the baselines need from the train split

_LABEL_PREFIX = "train."
_REGRET_MEAN = "train.regret_target_mean"


def baselines_tensors(
    train_labels: Mapping[str, torch.Tensor], bow: BowBaseline | None, regret_target_mean: float | None
) -> dict[str, torch.Tensor]:
    """Tensors of baselines.safetensors: train-split labels, the bow fit, the run's mean regret target."""
    out = {_LABEL_PREFIX + k: v.contiguous() for k, v in train_labels.items() if k != "regret_target"}
    if bow is not None:
        out.update(bow.to_tensors())
    if regret_target_mean is not None:
        out[_REGRET_MEAN] = torch.tensor([regret_target_mean], dtype=torch.float64)
    return out


def read_baselines_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], BowBaseline | None]:
    """(train labels as the trainer's baselines see them, bow fit) from baselines.safetensors."""
    labels = {
        k[len(_LABEL_PREFIX) :]: v
        for k, v in tensors.items()
        if k.startswith(_LABEL_PREFIX) and k != _REGRET_MEAN
    }
    if "labels.judgment" not in labels:
        raise ValueError("baselines.safetensors holds no train labels")
    if _REGRET_MEAN in tensors:
        # The same construction as the trainer: a float32 column of the mean it kept.
        labels["regret_target"] = torch.full(
            (labels["labels.judgment"].shape[0],), float(tensors[_REGRET_MEAN][0])
        )
    return labels, BowBaseline.from_tensors(tensors)
