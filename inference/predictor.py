"""RedHeartModel: an exported model folder in one process, no services.

    model = RedHeartModel.from_pretrained("runs/demo/model")
    for p in model.predict(["I broke my promise to my friend.", "친구와의 약속을 어겼다."]):
        print(p.judgment, p.explanation["best_counterfactual"])

The network is the pipeline's own modules with every layer in the first piece (CpuStageModule
holding layers [0, num_layers), GpuStageModule holding none), loaded by global parameter name, so
it computes exactly what the stages compute. The explanation is :func:`redheart.calculus.score`,
the function the regret service runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from redheart import calculus, model_folder
from redheart.data.schema import BENTHAM_KEYS, EMOTIONS, JUDGMENTS
from redheart.data.tokenizer import encode_texts, load_tokenizer
from redheart.model import CpuStageModule, GpuStageModule
from redheart.model_folder import ModelFolderError


@dataclass
class Prediction:
    """What the model says about one scenario, with the calculus' explanation."""

    text: str
    emotions: dict[str, float]
    """Probability of each of the 6 emotions (multi-label: they need not sum to 1)."""
    bentham: dict[str, float]
    """The 7 circumstances, each in [0, 1]."""
    valence: float
    """Pleasure (+1) vs pain (-1)."""
    judgment: str
    judgment_probabilities: dict[str, float]
    predicted_regret: float
    """The regret head's own estimate."""
    explanation: dict[str, Any]
    """From the calculus on the predicted Bentham vector: regret, best counterfactual (by name), the
    utility of the actual action and of every counterfactual, and per-perspective utilities of the
    actual and of the best action."""
    id: str | None = None
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["extra"]:
            del out["extra"]
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine (fix: --device auto or cpu)"
        )
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda or cuda:N): {exc}") from None


class RedHeartModel:
    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device) -> None:
        self.folder = folder
        self.config = config
        self.device = device
        # Every layer in the first piece: the unsplit model, under the same global names.
        self.shape = model_folder.shape_of(config)
        self.body = CpuStageModule(self.shape)
        self.heads = GpuStageModule(self.shape)
        expected = dict(self.body.global_named_parameters())
        expected.update(dict(self.heads.global_named_parameters()))
        tensors = model_folder.read_weights(folder, config, {n: tuple(p.shape) for n, p in expected.items()})
        model_folder.load_into(expected.items(), tensors)
        self.body.to(device).eval()
        self.heads.to(device).eval()
        tok_path = model_folder.verify_file(folder, config, model_folder.TOKENIZER_FILE)
        self.tokenizer = load_tokenizer(tok_path)
        if self.tokenizer.get_vocab_size() > self.shape.vocab_size:
            raise ModelFolderError(
                f"{tok_path} has {self.tokenizer.get_vocab_size()} tokens, the model's vocab_size is {self.shape.vocab_size}"
            )
        regret = config.get("regret") or {}
        self.regrets_per_step = int(regret.get("regrets_per_step", 7))
        self.bentham_per_regret = int(regret.get("bentham_per_regret", 3))
        calculus.check_counts(self.regrets_per_step, self.bentham_per_regret)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "auto") -> RedHeartModel:
        """Load an exported folder (checks config.json, every sha256, every parameter's name and shape)."""
        path = Path(folder)
        return cls(path, model_folder.read_config(path), resolve_device(device))

    # ---- tensors

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs for one batch [B, T] (on CPU, float32): the pipeline's eval outputs."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.heads(self.body(ids, mask), mask)
        return {k: v.float().cpu() for k, v in out.items()}

    def encode(self, texts: Sequence[str]):
        return encode_texts(self.tokenizer, list(texts), self.shape.max_seq_len)

    def outputs(
        self, texts: Sequence[str], batch_size: int = 32
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Head outputs for many texts, in input order: length-aware batches (sorted by length,
        each padded only to its longest row), since padding to max_seq_len wastes most compute."""
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} must be at least 1")
        enc = self.encode(texts)
        lengths = enc.attention_mask.sum(1)  # [N]
        order = torch.sort(lengths, stable=True).indices
        parts: dict[str, list[torch.Tensor]] = {}
        for lo in range(0, len(texts), batch_size):
            rows = order[lo : lo + batch_size]
            width = int(lengths[rows].max())
            out = self.forward(enc.input_ids[rows, :width], enc.attention_mask[rows, :width])  # [b, width] in
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        merged = {k: torch.cat(v) for k, v in parts.items()}
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return {k: v[inverse] for k, v in merged.items()}, enc.truncated_mask

    # ---- the user-facing API

    def predict(
        self, texts: Sequence[str], *, ids: Sequence[str | None] | None = None, batch_size: int = 32
    ) -> list[Prediction]:
        """One Prediction per text, in order. Texts must be non-empty strings."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is {text!r:.60}: every scenario needs a non-empty text")
        if not texts:
            return []
        out, truncated = self.outputs(texts, batch_size)
        scores = calculus.score(out["bentham"].numpy(), self.regrets_per_step, self.bentham_per_regret)
        emotion_p = torch.sigmoid(out["emotion_logits"])  # [N, 6]
        judgment_p = torch.softmax(out["judgment_logits"], dim=1)  # [N, 5]
        names = calculus.COUNTERFACTUALS[: self.regrets_per_step]
        views = calculus.PERSPECTIVES[: self.bentham_per_regret]
        result = []
        for i, text in enumerate(texts):
            b = out["bentham"][i].tolist()
            best = int(judgment_p[i].argmax())
            result.append(
                Prediction(
                    text=text,
                    emotions={e: float(emotion_p[i, j]) for j, e in enumerate(EMOTIONS)},
                    bentham={k: float(b[j]) for j, k in enumerate(BENTHAM_KEYS[:7])},
                    valence=float(b[7]),
                    judgment=JUDGMENTS[best],
                    judgment_probabilities={c: float(judgment_p[i, j]) for j, c in enumerate(JUDGMENTS)},
                    predicted_regret=float(out["regret"][i]),
                    explanation={
                        "regret": float(scores.regret[i]),
                        "best_counterfactual": scores.best_name[i],
                        "actual_utility": float(scores.actual_utility[i]),
                        "counterfactual_utilities": {
                            n: float(u) for n, u in zip(names, scores.counterfactual_utilities[i])
                        },
                        "actual_perspective_utilities": {
                            v: float(u) for v, u in zip(views, scores.actual_perspectives[i])
                        },
                        "best_perspective_utilities": {
                            v: float(u) for v, u in zip(views, scores.best_perspectives[i])
                        },
                    },
                    id=None if ids is None else ids[i],
                    truncated=bool(truncated[i]),
                )
            )
        return result

    def evaluate(self, path: str | Path, *, split: str = "all") -> dict[str, Any]:
        """Metrics, trivial and bag-of-words baselines on a labeled JSONL file (see inference/evaluate.py)."""
        from inference.evaluate import evaluate_file

        return evaluate_file(self, Path(path), split=split)
