"""The Python API of the original prototype, and training on a user's own JSONL file."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import run_cli

from orchestrator import HybridConfig, HybridDistributedTrainer

pytestmark = pytest.mark.slow


def test_train_returns_report_and_checkpoint(tmp_path, corpus):
    config = HybridConfig(
        model={"preset": "tiny"},
        epochs=1,
        batch_size=8,
        micro_batch_size=2,
        regrets_per_step=7,
        num_workers=2,
        use_mixed_precision=False,
        max_steps=3,
        log_every_n_steps=1,
        data={"path": str(corpus), "max_scenarios": 200},
        metrics={"enabled": False},
        orchestrator={"output_dir": str(tmp_path / "api"), "progress": "log"},
    )
    report, checkpoint = HybridDistributedTrainer(config).train()
    assert report["steps"] == 3
    assert checkpoint.name == "step-00000003" and (checkpoint / "manifest.json").exists()
    assert json.loads((tmp_path / "api" / "report.json").read_text())["run_id"] == report["run_id"]
    assert report["regret"]["computations_per_scenario"] == 7
    assert report["regret"]["bentham_evaluations_per_scenario"] == 21


def test_mixed_precision_bf16_on_cpu_trains_without_nan(tmp_path, corpus):
    config = HybridConfig(
        model={"preset": "tiny"},
        batch_size=8,
        micro_batch_size=2,
        use_mixed_precision=True,
        max_steps=6,
        log_every_n_steps=1,
        data={"path": str(corpus), "max_scenarios": 200},
        metrics={"enabled": False},
        regret={"address": "inprocess"},
        orchestrator={"output_dir": str(tmp_path / "bf16"), "progress": "log"},
    )
    report, _ = HybridDistributedTrainer(config).train()
    losses = [h["loss"] for h in report["loss_history"]]
    assert len(losses) == 6 and all(loss == loss and loss < 100 for loss in losses)  # finite (NaN != NaN)
    assert report["skipped_steps"] == 0


def test_the_orchestrator_metrics_endpoint_closes_with_the_run(tmp_path, corpus):
    config = HybridConfig(
        model={"preset": "tiny"},
        batch_size=4,
        micro_batch_size=2,
        max_steps=1,
        data={"path": str(corpus), "max_scenarios": 100},
        regret={"address": "inprocess"},
        orchestrator={"output_dir": str(tmp_path / "m"), "progress": "log"},
    )
    trainer = HybridDistributedTrainer(config)
    trainer.train()
    assert trainer.metrics_port > 0  # it was served during the run
    # An in-process caller that trains again must not find the first run's port still taken.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", trainer.metrics_port), timeout=2).close()


USER_JSONL = [
    {
        "id": "u1",
        "text": "I returned the wallet I found to its owner.",
        "source": "my-forum",
        "judgment": "nobody",
        "emotions": ["joy"],
        "bentham": {
            "intensity": 0.4,
            "duration": 0.3,
            "certainty": 0.9,
            "propinquity": 0.9,
            "fecundity": 0.5,
            "purity": 0.8,
            "extent": 0.2,
            "valence": 0.7,
        },
    },
    {
        "id": "u2",
        "text": "내 친구가 약속을 어겨서 화가 났다.",
        "source": "my-forum-ko",
        "judgment": "other",
        "emotions": ["anger"],
    },
    {"id": "u3", "text": "My coworker took credit for my report.", "source": "my-forum", "judgment": "other"},
    {
        "id": "u4",
        "text": "I forgot my sister's birthday and she cried.",
        "source": "my-forum",
        "judgment": "author",
        "emotions": ["sadness"],
    },
]


def test_the_demo_command_trains_on_a_users_own_jsonl(tmp_path, tiny_toml):
    data = tmp_path / "mine.jsonl"
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(12) for r in USER_JSONL]  # 48 scenarios
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            f'data.path="{data}"',
            "--set",
            "train.max_steps=3",
            "--output-dir",
            str(tmp_path / "mine"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "mine" / "report.json").read_text())
    assert set(report["data"]["sources"]) <= {"my-forum", "my-forum-ko"}
    assert report["data"]["train_scenarios"] + report["data"]["validation_scenarios"] == 48


def test_an_invalid_line_stops_the_run_naming_file_line_and_field(tmp_path, tiny_toml):
    data = tmp_path / "bad.jsonl"
    good = [json.dumps(dict(USER_JSONL[0], id=f"ok-{i}")) for i in range(40)]
    data.write_text(
        "\n".join(good) + "\n" + json.dumps({"id": "x", "text": "t", "judgment": "villain"}) + "\n"
    )
    result = run_cli(["orchestrator.cli", "--config", str(tiny_toml), "--set", f'data.path="{data}"'])
    assert result.returncode == 1
    assert f"{data}:41" in result.stderr and "judgment" in result.stderr and "villain" in result.stderr
