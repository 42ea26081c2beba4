"""redheart-export's checks: a clean checkpoint exports; every broken one is refused naming the file,
and nothing is left at the destination."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import copy_checkpoint, make_checkpoint
from safetensors.torch import load_file

from inference.export import export_checkpoint, full_model_parameters
from redheart import model_folder
from redheart.model_folder import ModelFolderError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), corpus)


@pytest.fixture
def broken(checkpoint, tmp_path):
    return copy_checkpoint(checkpoint, tmp_path / "copy")


def test_export_merges_both_shards_under_the_unsplit_names(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint.parents[1], tmp_path / "model")  # the run directory: newest checkpoint
    config = model_folder.read_config(out)
    weights = load_file(str(out / model_folder.WEIGHTS_FILE))
    shape = model_folder.shape_of(config)
    assert set(weights) == set(full_model_parameters(shape))
    assert {
        "embeddings.token.weight",
        "layers.0.attn.qkv.weight",
        "layers.2.ffn_out.bias",
        "heads.bentham.weight",
    } <= set(weights)
    cpu = load_file(str(checkpoint / "cpu" / "weights.safetensors"))
    gpu = load_file(str(checkpoint / "gpu" / "weights.safetensors"))
    for name, tensor in {**cpu, **gpu}.items():
        assert torch.equal(weights[name], tensor), name
    assert config["trained_split"] == {"cpu_layers": 1}
    assert config["heads"]["emotion"]["labels"] == ["joy", "sadness", "anger", "fear", "disgust", "surprise"]
    assert (
        len(config["heads"]["bentham"]["labels"]) == 8
        and config["heads"]["judgment"]["labels"][0] == "author"
    )
    assert (out / "tokenizer.json").read_bytes() == (checkpoint.parents[1] / "tokenizer.json").read_bytes()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the temp folder was renamed away
    export_checkpoint(checkpoint, out)  # exporting again replaces a model folder


def _refused(step_dir, out, match):
    with pytest.raises(ModelFolderError, match=match):
        export_checkpoint(step_dir, out)
    assert not out.exists()


def test_a_checkpoint_without_manifest_is_refused(broken, tmp_path):
    (broken / "manifest.json").unlink()
    _refused(broken, tmp_path / "m", rf"{broken}/manifest\.json is missing.*not a complete checkpoint")


def test_a_missing_shard_is_refused_naming_it(broken, tmp_path):
    import shutil

    shutil.rmtree(broken / "gpu")
    _refused(
        broken, tmp_path / "m", rf"{broken}/gpu/stage\.json is missing: the gpu stage shard is incomplete"
    )


def test_a_wrong_checksum_is_refused_naming_the_file(broken, tmp_path):
    path = broken / "cpu" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    _refused(broken, tmp_path / "m", rf"{path} is corrupt")


def test_a_shard_of_another_step_is_refused(broken, tmp_path):
    meta = json.loads((broken / "gpu" / "stage.json").read_text())
    (broken / "gpu" / "stage.json").write_text(json.dumps(dict(meta, step=7)))
    _refused(broken, tmp_path / "m", r"gpu/stage\.json: step 7 differs from the manifest's 0")


def test_a_changed_tokenizer_is_refused(broken, tmp_path):
    manifest = json.loads((broken / "manifest.json").read_text())
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    (broken / "manifest.json").write_text(json.dumps(dict(manifest, tokenizer=str(tok))))
    _refused(broken, tmp_path / "m", r"tok\.json differs from the one .* was trained with")


def test_an_existing_directory_that_is_not_a_model_folder_is_never_replaced(checkpoint, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFolderError, match="exists and is not a model folder"):
        export_checkpoint(checkpoint, out)
    assert (out / "notes.txt").read_text() == "keep me"
