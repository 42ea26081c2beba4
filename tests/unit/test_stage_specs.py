"""The stage list of a run (orchestrator.stages) and what follows from it: names, shards, the
overrides each GPU stage process is started with, its threads, its shard directory in a
checkpoint, and the checks of the GPU stage lists against model.stage_layers."""

from __future__ import annotations

import pytest

from orchestrator.launcher import stage_threads
from orchestrator.stages import STAGES, short_name, stage_links, stage_specs
from redheart import model_folder
from redheart.config import ConfigError, load_config


def _config(tmp_path, *overrides: str):
    path = tmp_path / "hybrid.toml"
    path.write_text('[model]\npreset = "tiny"\n[gpu_stage]\ndevice = "cpu"\n')
    return load_config(str(path), overrides=list(overrides))


def test_two_stages_by_default_and_for_two_entries(tmp_path):
    assert stage_specs(_config(tmp_path)) == STAGES
    assert stage_specs(_config(tmp_path, "model.stage_layers=[1, 3]")) == STAGES
    assert [s.overrides() for s in STAGES] == [[], []]


def test_four_stages_names_shards_ranks_and_overrides(tmp_path):
    specs = stage_specs(_config(tmp_path, "model.stage_layers=[1, 1, 1, 1]"))
    assert [s.name for s in specs] == ["cpu_stage", "gpu_stage_1", "gpu_stage_2", "gpu_stage"]
    assert [s.shard for s in specs] == ["cpu", "gpu1", "gpu2", "gpu"]
    assert [s.rank for s in specs] == [0, 1, 2, 3]
    assert [s.config_section for s in specs] == ["cpu_stage", "gpu_stage", "gpu_stage", "gpu_stage"]
    assert [s.overrides() for s in specs] == [
        [],
        ["gpu_stage.rank=1"],
        ["gpu_stage.rank=2"],
        ["gpu_stage.rank=3"],
    ]
    assert [short_name(s.label) for s in specs] == ["cpu", "gpu1", "gpu2", "gpu"]
    # The checkpoint format names the same directories from the stage names alone.
    assert [model_folder.shard_directory(s.name) for s in specs] == [s.shard for s in specs]
    links = stage_links(["a", "b", "c", "d"], "r")
    assert [(x["prev_address"], x["next_address"], x["regret_address"]) for x in links] == [
        ("", "b", ""),
        ("a", "c", ""),
        ("b", "d", ""),
        ("c", "", "r"),
    ]


def test_remote_addresses_come_from_the_gpu_stage_list(tmp_path):
    cfg = _config(
        tmp_path,
        "model.stage_layers=[1, 1, 2]",
        'launch.mode="remote"',
        'cpu_stage.address="h0:1"',
        'gpu_stage.addresses=["h1:2", "h2:3"]',
    )
    assert [s.address(cfg) for s in stage_specs(cfg)] == ["h0:1", "h1:2", "h2:3"]


def test_remote_replicas_addresses_replica_by_replica(tmp_path):
    cfg = _config(
        tmp_path,
        "parallel.data_parallel=2",
        'launch.mode="remote"',
        'cpu_stage.addresses=["a:1", "b:1"]',
        'gpu_stage.addresses=["a:2", "b:2"]',
    )
    specs = stage_specs(cfg)
    assert [s.name for s in specs] == ["cpu_stage", "gpu_stage", "cpu_stage_r1", "gpu_stage_r1"]
    assert [s.address(cfg) for s in specs] == ["a:1", "a:2", "b:1", "b:2"]
    assert [s.metric_label for s in specs] == ["cpu", "gpu", "cpu_r1", "gpu_r1"]
    assert [short_name(s.label) for s in specs] == ["cpu", "gpu", "cpu_r1", "gpu_r1"]


def test_checkpoint_stages_in_pipeline_order():
    shards = {"gpu_stage": {}, "gpu_stage_10": {}, "cpu_stage": {}, "gpu_stage_2": {}}
    assert model_folder.checkpoint_stages({"shards": shards}) == [
        "cpu_stage",
        "gpu_stage_2",
        "gpu_stage_10",
        "gpu_stage",
    ]
    assert model_folder.checkpoint_stages({}) == ["cpu_stage", "gpu_stage"]  # older manifests


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
def test_threads_one_per_stage_proportional_to_layers(tmp_path, cores):
    two = stage_threads(_config(tmp_path, "model.cpu_layers=1"), cores)
    assert len(two) == 2 and min(two) >= 1 and (cores == 1 or sum(two) == cores)
    four = stage_threads(_config(tmp_path, "model.stage_layers=[0, 1, 1, 2]"), cores)
    assert len(four) == 4 and min(four) >= 1
    assert sum(four) == max(cores, 4) if cores > 1 else four == (1, 1, 1, 1)
    if cores >= 8:
        assert four[3] > four[1], "the last stage has twice the layers and the heads"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model.stage_layers=[1, 1, 2]", "gpu_stage.rank=3"], "gpu_stage.rank = 3 must be in 1..2"),
        (["gpu_stage.rank=2"], "gpu_stage.rank = 2 must be in 1..1"),
        (["model.stage_layers=[1, 1, 2]", 'gpu_stage.devices=["cpu"]'], "gpu_stage.devices has 1 entries"),
        (['gpu_stage.devices=["tpu"]'], "gpu_stage.devices[0] = 'tpu' must be"),
        (["model.stage_layers=[1, 1, 2]", 'launch.ports="fixed"'], 'need launch.ports = "auto"'),
        (
            ["model.stage_layers=[1, 1, 2]", 'launch.mode="remote"', 'cpu_stage.address="h:1"'],
            "needs gpu_stage.addresses",
        ),
        (
            ["parallel.data_parallel=2", 'launch.mode="remote"', 'cpu_stage.address="h:1"'],
            "needs cpu_stage.addresses",
        ),
        (
            ["parallel.data_parallel=2", 'gpu_stage.addresses=["a:1"]'],
            "gpu_stage.addresses has 1 entries; 2 replica(s)",
        ),
        (
            ["parallel.data_parallel=2", 'cpu_stage.addresses=["a:1"]'],
            "cpu_stage.addresses has 1 entries for 2",
        ),
    ],
)
def test_gpu_stage_lists_checked_against_the_stage_count(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, *overrides)
    assert words in str(err.value)
