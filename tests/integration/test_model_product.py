"""The trained model as a product, end to end on real runs of the orchestrator (5-layer tiny-width model).

Run 1 trains 2 steps at split 2/3 and is exported. Run 2 starts from that export at split 3/2
(model.init_from) and validates on a separate file whose judgment labels differ
(data.validation_path); it is exported too. Each export must predict what the pipeline computed,
and redheart-evaluate must reproduce each report's final validation numbers exactly.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from cpu_stage.logic import CpuStagePart
from gpu_stage.logic import GpuStagePart
from inference import RedHeartModel, export_checkpoint
from orchestrator import HybridConfig, HybridDistributedTrainer
from redheart.model import resolve_model_shape
from redheart.stage.runtime import StageRuntime

pytestmark = pytest.mark.slow

TOML = """
[model]
preset = "custom"
hidden_size = 64
num_layers = 5
num_heads = 4
ffn_size = 128
vocab_size = 1024
max_seq_len = 48
cpu_layers = {cpu_layers}
init_from = "{init_from}"
[train]
batch_size = 8
micro_batch_size = 2
learning_rate = 1e-3
max_steps = {steps}
log_every_n_steps = 1
[data]
path = "{data}"
max_scenarios = 300
validation_path = "{validation}"
[regret]
address = "inprocess"
[checkpoint]
save_checkpoint_every = 0
[orchestrator]
output_dir = "{out}"
progress = "log"
[metrics]
enabled = false
"""


def _config(
    tmp: Path,
    name: str,
    corpus: Path,
    *,
    cpu_layers: int,
    steps: int,
    init_from: str = "",
    validation: str = "",
) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        textwrap.dedent(
            TOML.format(
                cpu_layers=cpu_layers,
                init_from=init_from,
                steps=steps,
                data=corpus,
                validation=validation,
                out=tmp / name,
            )
        )
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("product")
    first = _config(tmp, "run1", corpus, cpu_layers=2, steps=2)
    report1, ckpt1 = HybridDistributedTrainer(HybridConfig.from_toml(first)).train()
    model1 = export_checkpoint(ckpt1, tmp / "model1")
    # A validation file whose labels differ from anything the training file says about these texts.
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()[400:440]]
    validation = tmp / "other-labels.jsonl"
    validation.write_text(
        "".join(
            json.dumps(dict(r, id=f"val-{r['id']}", judgment="unclear"), ensure_ascii=False) + "\n"
            for r in rows
        ),
        encoding="utf-8",
    )
    second = _config(
        tmp, "run2", corpus, cpu_layers=3, steps=1, init_from=str(model1), validation=str(validation)
    )
    report2, ckpt2 = HybridDistributedTrainer(HybridConfig.from_toml(second)).train()
    model2 = export_checkpoint(ckpt2, tmp / "model2")
    return {
        "run1": dict(
            config=first, report=report1, checkpoint=ckpt1, model=model1, data=corpus, split="validation"
        ),
        "run2": dict(
            config=second, report=report2, checkpoint=ckpt2, model=model2, data=validation, split="all"
        ),
        "validation": validation,
    }


def _stage_forward(run: dict, texts: list[str], model: RedHeartModel) -> dict[str, torch.Tensor]:
    """The pipeline's own forward: both stage parts, loaded from their shards by the stages' loader."""
    config = HybridConfig.from_toml(run["config"])
    shape = resolve_model_shape(config.model)
    parts = []
    for name, factory in (
        ("cpu", lambda: CpuStagePart(shape)),
        ("gpu", lambda: GpuStagePart(shape, device="cpu")),
    ):
        runtime = StageRuntime(factory, shape)
        runtime.load("", run["report"]["steps"], run["checkpoint"] / name, 1 << 30)
        parts.append(runtime.part.module.eval())
    enc = model.encode(texts)
    outputs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for lo in range(0, len(texts), config.train.micro_batch_size):
            m = config.train.micro_batch_size
            ids, mask = enc.input_ids[lo : lo + m], enc.attention_mask[lo : lo + m]  # [m, L]
            for k, v in parts[1](parts[0](ids, mask), mask).items():
                outputs.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in outputs.items()}


@pytest.mark.parametrize("name, split", [("run1", "2/3"), ("run2", "3/2")])
def test_export_then_predict_equals_the_pipelines_forward(runs, name, split):
    run = runs[name]
    assert run["report"]["split"]["cpu_layers"] == int(split[0])
    model = RedHeartModel.from_pretrained(run["model"], device="cpu")
    explanations = [
        json.loads(line)
        for line in (run["checkpoint"].parents[1] / "explanations.jsonl").read_text().splitlines()
    ]
    by_id = {s.id: s.text for s in model_scenarios(run)}
    texts = [by_id[e["scenario_id"]] for e in explanations]
    predictions = model.predict(texts, batch_size=5)  # length-aware batches, not the pipeline's layout
    # The run's final validation went through the real gRPC pipeline: its Bentham and regret outputs.
    assert torch.allclose(
        torch.tensor([list(p.bentham.values()) + [p.valence] for p in predictions]),
        torch.tensor([e["predicted_bentham"] for e in explanations]),
        atol=1e-6,
        rtol=0,
    )
    assert torch.allclose(
        torch.tensor([p.predicted_regret for p in predictions]),
        torch.tensor([e["predicted_regret"] for e in explanations]),
        atol=1e-6,
        rtol=0,
    )
    assert [p.explanation["best_counterfactual"] for p in predictions] == [
        e["best_counterfactual"] for e in explanations
    ]
    # Every head against the stage modules loaded from the checkpoint's shards.
    ours, _ = model.outputs(texts, batch_size=5)
    theirs = _stage_forward(run, texts, model)
    for key in ("emotion_logits", "bentham", "judgment_logits", "regret"):
        assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=0), key


def model_scenarios(run: dict):
    from redheart.data import load_jsonl

    return load_jsonl(run["data"]).scenarios


@pytest.mark.parametrize("name", ["run1", "run2"])
def test_evaluate_reproduces_the_reports_final_validation_exactly(runs, name, tmp_path):
    run = runs[name]
    out = tmp_path / "eval.json"
    result = run_cli(
        [
            "inference.cli",
            "evaluate",
            "--model",
            str(run["model"]),
            "--data",
            str(run["data"]),
            "--split",
            run["split"],
            "--output",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    final = run["report"]["final_validation"]
    assert evaluated["scenarios"] == run["report"]["data"]["validation_scenarios"]
    assert evaluated["metrics"] == final["metrics"]
    assert (
        evaluated["baseline"] == final["baseline"]
    )  # trivial and bag-of-words, from the checkpoint's baselines file
    assert "baseline_bow_bentham_mae" in evaluated["baseline"]
    assert evaluated["worse_than_baselines"] == final["worse_than_baselines"]
    assert "bag-of-words" in result.stdout  # the short table


def test_training_with_validation_path_validates_on_that_file(runs):
    report = runs["run2"]["report"]
    assert report["data"]["validation_scenarios"] == 40
    assert report["data"]["train_scenarios"] == 300  # all of data.path trains: no hash split
    # Every label in the file is "unclear", which no training scenario's majority is: the trivial
    # baseline scores 0 there, and the model's accuracy is its share of "unclear" predictions.
    assert report["final_validation"]["baseline"]["baseline_judgment_accuracy"] == 0.0
    model = RedHeartModel.from_pretrained(runs["run2"]["model"], device="cpu")
    texts = [s.text for s in model_scenarios(runs["run2"])]
    share = sum(p.judgment == "unclear" for p in model.predict(texts)) / len(texts)
    assert report["final_validation"]["metrics"]["judgment_accuracy"] == pytest.approx(share)


def test_a_run_from_an_exported_model_at_another_split_has_the_original_first_step_loss(runs, tmp_path):
    """Run 2 (split 3/2, from run 1's export) against the single-process reference of the exported
    weights at run 1's split 2/3, on the same first batch."""
    from safetensors.torch import load_file

    from orchestrator.data import StepBatches, prepare_data
    from orchestrator.reference import SingleProcessTrainer
    from orchestrator.trainer import learning_rate_at
    from redheart.model_folder import WEIGHTS_FILE

    config = HybridConfig.from_toml(runs["run2"]["config"]).replace(**{"model.cpu_layers": 2})
    reference = SingleProcessTrainer(config)
    weights = load_file(str(runs["run1"]["model"] / WEIGHTS_FILE))
    with torch.no_grad():
        for name, p in reference.named_parameters().items():
            p.copy_(weights[name])
    data = prepare_data(config, tmp_path, tokenizer_path=runs["run1"]["model"] / "tokenizer.json")
    batches = StepBatches(config, data.train)
    out = reference.step(0, batches.rounds(0), learning_rate_at(0, batches.total_steps, config.train))
    first = runs["run2"]["report"]["loss_history"][0]
    assert first["step"] == 1 and runs["run2"]["report"]["init_from"]["path"] == str(
        runs["run1"]["model"].resolve()
    )
    assert first["loss"] == pytest.approx(
        sum(out["micro_batch_losses"]) / len(out["micro_batch_losses"]), rel=1e-5, abs=4e-5
    )
    for head, value in out["losses"].items():
        assert first["losses"][head] == pytest.approx(value, rel=1e-5, abs=4e-5), head
    # Not the seeded initialisation: a fresh model's first loss is another number.
    fresh = SingleProcessTrainer(config).step(
        0, batches.rounds(0), learning_rate_at(0, batches.total_steps, config.train)
    )
    assert abs(sum(fresh["micro_batch_losses"]) / len(fresh["micro_batch_losses"]) - first["loss"]) > 1e-3


def test_init_from_a_folder_of_another_shape_is_refused_naming_the_key(runs, tmp_path, corpus):

    path = tmp_path / "other.toml"
    path.write_text(
        _config(tmp_path, "other", corpus, cpu_layers=2, steps=1, init_from=str(runs["run1"]["model"]))
        .read_text()
        .replace("hidden_size = 64", "hidden_size = 32")
    )
    result = run_cli(["orchestrator.cli", "--config", str(path)])
    assert result.returncode != 0
    assert "another shape" in result.stderr and "hidden_size: 64 in the folder, 32 here" in result.stderr
    assert not (tmp_path / "other" / "report.json").exists()
