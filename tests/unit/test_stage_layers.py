"""model.stage_layers: the per-stage layer counts, their checks and the layer ranges they give."""

from __future__ import annotations

import pytest

from redheart.config import ConfigError, load_config
from redheart.model import resolve_model_shape, stage_layer_ranges


def _config(tmp_path, *overrides: str):
    path = tmp_path / "hybrid.toml"
    path.write_text('[model]\npreset = "tiny"\n')
    return load_config(str(path), overrides=list(overrides))


def test_default_is_the_two_stage_split(tmp_path):
    cfg = _config(tmp_path, "model.cpu_layers=1")
    assert stage_layer_ranges(cfg.model) == [range(0, 1), range(1, 4)]


def test_two_entries_set_the_cpu_layers(tmp_path):
    cfg = _config(tmp_path, "model.stage_layers=[0, 4]")
    assert cfg.model.stage_layers == [0, 4]
    assert resolve_model_shape(cfg.model).cpu_layers == 0
    assert stage_layer_ranges(cfg.model) == [range(0, 0), range(0, 4)]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("[1, 2]", "sums to 3, the model has 4 layers"),
        ("[1, 0, 3]", "stage_layers[1] = 0: every GPU stage needs at least 1 layer"),
        ("[-1, 5]", "stage_layers[0] = -1 (the CPU stage) must be >= 0"),
        ("[4]", "needs at least two stages"),
        ('[1, "x"]', "must be an integer"),
        ("3", "must be a list"),
    ],
)
def test_bad_values_name_the_key(tmp_path, value, words):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, f"model.stage_layers={value}")
    assert "stage_layers" in str(err.value)
    assert words in str(err.value)


def test_conflicting_cpu_layers_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.cpu_layers = 2 \(fix: drop model.cpu_layers\)"):
        _config(tmp_path, "model.stage_layers=[1, 3]", "model.cpu_layers=2")


def test_file_error_names_file_and_line(tmp_path):
    path = tmp_path / "hybrid.toml"
    path.write_text('[model]\npreset = "tiny"\nstage_layers = [1, 1]\n')
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "hybrid.toml" in str(err.value) and "stage_layers" in str(err.value)
