import textwrap

import pytest

from redheart.config import ConfigError, HybridConfig, load_config, parse_override


def write(tmp_path, text):
    p = tmp_path / "hybrid.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_load_and_example_config_is_valid():
    cfg = load_config("examples/hybrid.toml", env={})
    assert cfg.launch.mode == "local"
    assert cfg.micro_batches == cfg.train.batch_size // cfg.train.micro_batch_size
    assert HybridConfig().train.epochs == 3


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(
        tmp_path,
        """
        [train]
        batch_size = 8
        learnig_rate = 0.1
    """,
    )
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    msg = str(err.value)
    assert f"{p}:4" in msg and "unknown key `learnig_rate`" in msg and "did you mean `learning_rate`" in msg


def test_unknown_section(tmp_path):
    p = write(tmp_path, "[trian]\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\] \(did you mean `train`\?\)"):
        load_config(p, env={})


def test_wrong_type_names_the_key(tmp_path):
    p = write(tmp_path, '[train]\nepochs = "three"\n')
    with pytest.raises(ConfigError, match=r":2: train.epochs = 'three' must be an integer"):
        load_config(p, env={})


def test_batch_not_divisible_by_micro_batch_gives_values_and_fix(tmp_path):
    p = write(tmp_path, "[train]\nbatch_size = 10\nmicro_batch_size = 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    assert "batch_size = 10 is not divisible by train.micro_batch_size = 4" in str(err.value)
    assert "fix:" in str(err.value)


def test_fewer_micro_batches_than_stages(tmp_path):
    p = write(tmp_path, "[train]\nbatch_size = 4\nmicro_batch_size = 4\n")
    with pytest.raises(ConfigError, match="1 micro-batches .* fewer than the 2 pipeline stages"):
        load_config(p, env={})


def test_choices_and_ranges(tmp_path):
    with pytest.raises(ConfigError, match="train.schedule = 'zero' is not one of 1f1b, gpipe"):
        load_config(write(tmp_path, '[train]\nschedule = "zero"\n'), env={})
    with pytest.raises(ConfigError, match="gpu_layers_ratio = 1.5 must be in"):
        load_config(write(tmp_path, "[model]\ngpu_layers_ratio = 1.5\n"), env={})
    with pytest.raises(ConfigError, match="hidden_size = 100 is not divisible by model.num_heads = 3"):
        load_config(write(tmp_path, "[model]\nhidden_size = 100\nnum_heads = 3\n"), env={})


def test_precedence_cli_over_env_over_file(tmp_path):
    p = write(tmp_path, "[train]\nepochs = 2\nmax_steps = 5\n")
    env = {"REDHEART_TRAIN__EPOCHS": "4", "REDHEART_TRAIN__MAX_STEPS": "7"}
    cfg = load_config(p, overrides=["train.epochs=6"], env=env)
    assert cfg.train.epochs == 6  # flag beats environment
    assert cfg.train.max_steps == 7  # environment beats file
    assert load_config(p, env={}).train.max_steps == 5


def test_set_overrides_strings_and_errors(tmp_path):
    p = write(tmp_path, "")
    cfg = load_config(
        p, overrides=['gpu_stage.device="cpu"', "launch.mode=remote", "data.source_weights={a = 2.0}"], env={}
    )
    assert cfg.gpu_stage.device == "cpu" and cfg.launch.mode == "remote"
    assert cfg.data.source_weights == {"a": 2.0}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("train.epochs")
    with pytest.raises(
        ConfigError, match=r"--set 'tran.epochs=1': unknown section `tran` \(did you mean `train`\?\)"
    ):
        load_config(p, overrides=["tran.epochs=1"], env={})
    with pytest.raises(ConfigError, match=r"--set train.epochs=x: train.epochs = 'x' must be an integer"):
        load_config(p, overrides=["train.epochs=x"], env={})


def test_hybrid_config_flat_constructor_like_the_original():
    cfg = HybridConfig(
        target_params=200_000_000,
        gpu_memory_gb=8.0,
        cpu_memory_gb=128.0,
        regrets_per_step=7,
        epochs=3,
        batch_size=8,
        num_workers=4,
        use_mixed_precision=True,
    )
    assert cfg.model.target_params == 200_000_000 and cfg.gpu_stage.gpu_memory_gb == 8.0
    assert cfg.regret.num_workers == 4 and cfg.train.use_mixed_precision
    with pytest.raises(ConfigError, match="exists in several sections"):
        HybridConfig(port=1)
    with pytest.raises(ConfigError, match="did you mean `epochs`"):
        HybridConfig(epoch=3)


def test_to_toml_round_trips(tmp_path):
    cfg = HybridConfig(model={"preset": "tiny"}, train={"epochs": 5}, data={"source_weights": {"x": 0.5}})
    p = tmp_path / "resolved.toml"
    p.write_text(cfg.to_toml())
    assert load_config(p, env={}) == cfg


def test_remote_mode_needs_addresses(tmp_path):
    with pytest.raises(ConfigError, match='launch.mode = "remote" needs cpu_stage.address'):
        load_config(write(tmp_path, '[launch]\nmode = "remote"\n[cpu_stage]\nport = 0\n'), env={})


def test_config_reference_is_current_and_lists_every_key():
    from pathlib import Path

    from redheart.config import SECTIONS
    from redheart.tools.config_doc import render

    text = Path("docs/config.md").read_text()
    assert text == render(), (
        "docs/config.md is stale: run `python -m redheart.tools.config_doc > docs/config.md`"
    )
    import dataclasses

    for section, cls in SECTIONS.items():
        assert f"## `[{section}]`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text
