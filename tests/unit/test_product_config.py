"""data.validation_path and model.init_from: refused early, with the file and the fix."""

from __future__ import annotations

import json

import pytest

from orchestrator.data import prepare_data
from orchestrator.run_products import check_init_from
from redheart.config import ConfigError, HybridConfig
from redheart.data import DataError
from redheart.model_folder import ModelFolderError


def test_validating_on_the_training_file_itself_is_refused(corpus):
    with pytest.raises(ConfigError, match="data.validation_path = .* is data.path itself"):
        HybridConfig(data={"path": str(corpus), "validation_path": str(corpus)})


def test_a_validation_file_sharing_ids_with_the_training_file_is_refused(corpus, tmp_path):
    first = corpus.read_text(encoding="utf-8").splitlines()[:3]
    other = tmp_path / "val.jsonl"
    other.write_text("\n".join(first) + "\n", encoding="utf-8")
    config = HybridConfig(model={"preset": "tiny"}, data={"path": str(corpus), "validation_path": str(other)})
    with pytest.raises(DataError, match=rf"{other}: 3 scenario id\(s\) are also in"):
        prepare_data(config, tmp_path)
    renamed = [dict(json.loads(line), id=f"v{i}") for i, line in enumerate(first)]
    other.write_text("".join(json.dumps(r) + "\n" for r in renamed), encoding="utf-8")
    data = prepare_data(config, tmp_path)
    assert len(data.validation) == 3 and len(data.train) == 600 and data.validation.ids == ["v0", "v1", "v2"]


def test_init_from_a_folder_that_is_not_an_export_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    config = HybridConfig(model={"preset": "tiny", "init_from": str(tmp_path / "notes")})
    with pytest.raises(ModelFolderError, match=r"notes/config\.json is missing: .* is not a model folder"):
        check_init_from(config)
    assert check_init_from(HybridConfig(model={"preset": "tiny"})) is None
