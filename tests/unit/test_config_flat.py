"""HybridConfig's original flat attributes: read and assigned, validated like the constructor."""

from __future__ import annotations

import pytest

from redheart.config import ConfigError, HybridConfig

FLAT = {  # flat name -> (section, a valid new value)
    "batch_size": ("train", 4),
    "micro_batch_size": ("train", 1),
    "num_workers": ("regret", 8),
    "gpu_layers_ratio": ("model", 0.8),
    "epochs": ("train", 5),
    "use_mixed_precision": ("train", True),
    "target_params": ("model", 2_000_000),
    "gpu_memory_gb": ("gpu_stage", 4.0),
    "cpu_memory_gb": ("cpu_stage", 64.0),
    "regrets_per_step": ("regret", 5),
    "max_grad_norm": ("train", 0.5),
    "gradient_accumulation_steps": ("train", 2),
}


@pytest.mark.parametrize("name", sorted(FLAT))
def test_flat_attribute_reads_and_assigns_the_nested_value(name):
    section, value = FLAT[name]
    config = HybridConfig(model={"preset": "tiny"})
    assert getattr(config, name) == getattr(getattr(config, section), name)
    held = getattr(config, section)  # code that kept the section object sees the change too
    setattr(config, name, value)
    assert getattr(getattr(config, section), name) == value == getattr(config, name) == getattr(held, name)


def test_assignment_is_validated_like_the_constructor_and_leaves_the_config_unchanged():
    config = HybridConfig(model={"preset": "tiny"}, micro_batch_size=2)
    with pytest.raises(
        ConfigError, match=r"config.batch_size = 7.*not divisible by train.micro_batch_size = 2"
    ):
        config.batch_size = 7
    with pytest.raises(ConfigError, match=r"model.gpu_layers_ratio = 1.5 must be in \(0, 1\]"):
        config.gpu_layers_ratio = 1.5
    with pytest.raises(ConfigError, match="train.epochs = 'three' must be an integer"):
        config.epochs = "three"
    assert (config.batch_size, config.gpu_layers_ratio, config.epochs) == (8, 0.6, 3)
    config.gpu_memory_gb = 4  # coerced like the file's values: an integer for a float field
    assert isinstance(config.gpu_stage.gpu_memory_gb, float)


def test_unknown_attribute_names_the_close_one_and_is_an_attribute_error():
    config = HybridConfig()
    with pytest.raises(ConfigError, match="did you mean `batch_size`"):
        config.batch_sise = 4
    with pytest.raises(AttributeError, match="did you mean `micro_batch_size`"):
        config.micro_batchsize  # noqa: B018 - reading must fail the same way
    assert not hasattr(config, "no_such_setting")
    with pytest.raises(ConfigError, match=r"several sections \(regret, cpu_stage, gpu_stage\)"):
        config.port = 1
    with pytest.raises(AttributeError, match="derived"):
        config.micro_batches = 3
    assert config.to_dict() == HybridConfig().to_dict()  # nothing half-applied


def test_sections_stay_assignable_and_copies_work():
    import copy
    import pickle

    config = HybridConfig(batch_size=4, micro_batch_size=1)
    assert copy.deepcopy(config) == config == pickle.loads(pickle.dumps(config))
    config.train = copy.deepcopy(config.train)
    assert config.batch_size == 4


def test_an_automatic_micro_batch_size_follows_a_new_batch_size():
    config = HybridConfig(model={"preset": "tiny"})  # micro_batch_size 0: derived from the batch
    assert (config.batch_size, config.micro_batch_size) == (8, 1)
    config.batch_size = 32
    assert config.micro_batch_size == 4  # 8 micro-batches again, not 32 of the old size
    assert config.replace(batch_size=16).train.micro_batch_size == 2
    config.micro_batch_size = 8  # set by the user: kept from now on
    config.batch_size = 64
    assert config.micro_batch_size == 8
