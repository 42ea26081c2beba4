"""The original troubleshooting's four assignments change the run that follows them."""

from __future__ import annotations

import pytest

from orchestrator import HybridConfig, HybridDistributedTrainer
from redheart.config import load_config

pytestmark = pytest.mark.slow


def test_the_four_troubleshooting_assignments_change_the_run(tmp_path, corpus):
    config = HybridConfig(
        model={"preset": "tiny"},
        micro_batch_size=2,  # the original prototype's default, which its troubleshooting changes
        max_steps=1,
        log_every_n_steps=1,
        save_checkpoint_every=0,
        data={"path": str(corpus), "max_scenarios": 120},
        metrics={"enabled": False},
        orchestrator={"output_dir": str(tmp_path / "start"), "progress": "log"},
        regret={"num_workers": 1},
    )
    steps = [("batch_size", 4), ("micro_batch_size", 1), ("num_workers", 8), ("gpu_layers_ratio", 0.8)]
    for i, (name, value) in enumerate(steps):
        setattr(config, name, value)
        config.orchestrator.output_dir = str(tmp_path / f"run-{i}")
        report, _ = HybridDistributedTrainer(config).train()
        # What the services were started with: the resolved file written into the run directory.
        resolved = load_config(tmp_path / f"run-{i}" / "config.toml")
        for done_name, done_value in steps[: i + 1]:
            assert getattr(resolved, done_name) == done_value, (name, done_name)
        assert report["samples"] == 4  # batch_size 4 from the first assignment on, one step
        assert report["config"]["train"]["micro_batch_size"] == (1 if i >= 1 else 2)
        assert report["config"]["regret"]["num_workers"] == (8 if i >= 2 else 1)
        # tiny has 4 layers: ratio 0.6 keeps 2 on the CPU stage, 0.8 keeps 1.
        assert report["split"]["cpu_layers"] == (1 if i == 3 else 2)
        assert report["stages"]["cpu_stage"]["layers"] == (
            "embeddings + layers 0-0" if i == 3 else "embeddings + layers 0-1"
        )
