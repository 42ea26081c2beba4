"""RedHeartModel on an exported (untrained) model folder: outputs, batching, explanations, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import make_checkpoint

from inference import RedHeartModel, export_checkpoint
from redheart import calculus, model_folder
from redheart.model_folder import ModelFolderError

TEXTS = [
    "I returned the wallet I found to its owner.",
    "내 친구가 약속을 어겨서 화가 났다.",
    "My coworker took credit for my report and I said nothing about it for weeks, which I regret.",
    "ok",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("predictor")
    return export_checkpoint(make_checkpoint(tmp, corpus), tmp / "model")


def test_predictions_name_every_output_and_explain_with_the_calculus(folder):
    model = RedHeartModel.from_pretrained(folder, device="cpu")
    predictions = model.predict(TEXTS, ids=["a", "b", None, "d"])
    assert [p.text for p in predictions] == TEXTS and [p.id for p in predictions] == ["a", "b", None, "d"]
    outputs, _ = model.outputs(TEXTS)
    scores = calculus.score(outputs["bentham"].numpy(), 7, 3)
    for i, p in enumerate(predictions):
        assert list(p.emotions) == ["joy", "sadness", "anger", "fear", "disgust", "surprise"]
        assert list(p.bentham) == list(calculus.CIRCUMSTANCES) and -1 <= p.valence <= 1
        assert sum(p.judgment_probabilities.values()) == pytest.approx(1.0)
        assert p.judgment == max(p.judgment_probabilities, key=p.judgment_probabilities.get)
        e = p.explanation
        assert e["best_counterfactual"] == scores.best_name[i] and e["regret"] == pytest.approx(
            float(scores.regret[i])
        )
        assert list(e["counterfactual_utilities"]) == list(calculus.COUNTERFACTUALS)
        assert list(e["actual_perspective_utilities"]) == ["agent", "affected", "society"]
        assert e["regret"] == pytest.approx(
            max(0.0, max(e["counterfactual_utilities"].values()) - e["actual_utility"])
        )
        json.dumps(p.to_dict(), ensure_ascii=False)  # JSONL-ready


def test_length_aware_batches_give_each_row_what_it_gets_alone(folder):
    model = RedHeartModel.from_pretrained(folder, device="cpu")
    together, _ = model.outputs(TEXTS * 3, batch_size=5)
    for i, text in enumerate(TEXTS * 3):
        alone, _ = model.outputs([text], batch_size=1)
        for key, value in alone.items():
            assert torch.allclose(together[key][i], value[0], atol=1e-6, rtol=0), (i, key)


def test_empty_texts_and_bad_devices_are_refused(folder):
    model = RedHeartModel.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match="text 1 is '  ': every scenario needs a non-empty text"):
        model.predict(["fine", "  "])
    with pytest.raises(ValueError, match="--device"):
        RedHeartModel.from_pretrained(folder, device="tpu")


def test_a_folder_of_another_shape_or_with_a_corrupt_file_is_refused_naming_the_file(folder, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["hidden_size"] = 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFolderError, match=rf"{other}/model\.safetensors: embeddings\.token\.weight is .* the model has"
    ):
        RedHeartModel.from_pretrained(other)
    shutil.copyfile(folder / "config.json", other / "config.json")
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (other / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=rf"{other}/model\.safetensors is corrupt"):
        RedHeartModel.from_pretrained(other)
    (other / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=rf"{other}/config\.json is missing"):
        RedHeartModel.from_pretrained(other)


def test_a_stage_loads_its_own_part_of_a_folder_at_any_split(folder):
    from cpu_stage.logic import CpuStagePart
    from gpu_stage.logic import GpuStagePart
    from redheart.model import ModelShape
    from redheart.stage.errors import StageError
    from redheart.stage.runtime import StageRuntime

    config = model_folder.read_config(folder)
    spec = {"path": str(folder), "sha256": config["files"]["model.safetensors"]["sha256"]}
    whole = RedHeartModel.from_pretrained(folder, device="cpu")
    reference = dict(whole.body.global_named_parameters()) | dict(whole.heads.global_named_parameters())
    for cpu_layers in (0, 2, 3):
        shape = ModelShape(**{**model_folder.shape_of(config).__dict__, "cpu_layers": cpu_layers})
        for factory in (lambda s=shape: CpuStagePart(s), lambda s=shape: GpuStagePart(s, device="cpu")):
            runtime = StageRuntime(factory, shape)
            runtime.start_run(
                "r",
                {"regret": {"enabled": False}, "init_from": spec},
                reinitialize=True,
                first_step=0,
                regret_address="",
            )
            for name, p in runtime.part.module.global_named_parameters():
                assert torch.equal(p.detach(), reference[name]), (cpu_layers, name)
    runtime = StageRuntime(lambda: CpuStagePart(shape), shape)
    before = {n: p.detach().clone() for n, p in runtime.part.module.global_named_parameters()}
    with pytest.raises(StageError, match="changed since the orchestrator checked it"):
        runtime.start_run(
            "r",
            {"init_from": dict(spec, sha256="0" * 64)},
            reinitialize=True,
            first_step=0,
            regret_address="",
        )
    assert all(torch.equal(p.detach(), before[n]) for n, p in runtime.part.module.global_named_parameters())
