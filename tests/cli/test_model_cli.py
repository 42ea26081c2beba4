"""redheart-export / redheart-predict / redheart-evaluate as a user runs them."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from model_fixtures import make_checkpoint

from redheart.calculus import TRANSFORM_DESCRIPTIONS


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("cli")
    step = make_checkpoint(tmp, corpus)
    result = run_cli(
        ["inference.cli", "export", "--checkpoint", str(step.parents[1]), "--out", str(tmp / "model")]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported step 0 of run run-fixture" in result.stdout
    return tmp / "model"


def test_predict_texts_and_a_jsonl_file_to_jsonl(exported, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        json.dumps({"id": "ko-1", "text": "동생의 숙제를 대신 해 주었다."}, ensure_ascii=False)
        + "\n\n"
        + json.dumps({"text": "I told my boss the truth."})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    result = run_cli(
        [
            "inference.cli",
            "predict",
            "--model",
            str(exported),
            "I skipped my friend's wedding.",
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [None, "ko-1", None]
    assert rows[1]["text"] == "동생의 숙제를 대신 해 주었다."
    for r in rows:
        assert set(r) >= {
            "emotions",
            "bentham",
            "valence",
            "judgment",
            "judgment_probabilities",
            "predicted_regret",
            "explanation",
        }
        assert set(r["explanation"]) >= {
            "regret",
            "best_counterfactual",
            "actual_perspective_utilities",
            "best_perspective_utilities",
        }


def test_predict_prints_a_table_when_asked(exported):
    result = run_cli(
        ["inference.cli", "predict", "--model", str(exported), "--format", "table", "나는 거짓말을 했다."]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "best counterfactual" in result.stdout
        and "나는 거짓말을 했다." in result.stdout
        and "society" in result.stdout
    )
    best = json.loads(
        run_cli(["inference.cli", "predict", "--model", str(exported), "나는 거짓말을 했다."]).stdout
    )["explanation"]["best_counterfactual"]
    assert TRANSFORM_DESCRIPTIONS[best] in result.stdout  # the table says what the counterfactual means


def test_an_input_line_without_text_names_file_and_line_and_writes_nothing(exported, tmp_path):
    inputs = tmp_path / "bad.jsonl"
    inputs.write_text('{"text": "fine"}\n{"id": "x", "txt": "typo"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli(
        ["inference.cli", "predict", "--model", str(exported), "--input", str(inputs), "--output", str(out)]
    )
    assert result.returncode == 1
    assert f'error: {inputs}:2: "text" missing' in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [inputs]


def test_evaluate_without_baselines_says_so_and_bad_data_names_the_line(exported, tmp_path, corpus):
    out = tmp_path / "eval.json"
    result = run_cli(
        ["inference.cli", "evaluate", "--model", str(exported), "--data", str(corpus), "--output", str(out)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert evaluated["scenarios"] == 600 and set(evaluated["metrics"]) == {
        "judgment_accuracy",
        "emotion_macro_f1",
        "bentham_mae",
        "regret_mae",
    }
    assert evaluated["baseline"] == {} and "no baselines.safetensors" in evaluated["notes"][0]
    assert "judgment_accuracy" in result.stdout  # the table
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        corpus.read_text(encoding="utf-8").splitlines()[0]
        + "\n"
        + '{"id": "y", "text": "t", "judgment": "villain"}\n'
    )
    result = run_cli(["inference.cli", "evaluate", "--model", str(exported), "--data", str(bad)])
    assert result.returncode == 1 and f"{bad}:2" in result.stderr and "villain" in result.stderr


def test_export_of_an_incomplete_checkpoint_fails_cleanly(tmp_path):
    step = tmp_path / "step-00000004"
    (step / "cpu").mkdir(parents=True)
    (step / "cpu" / "stage.json").write_text("{}")
    result = run_cli(["inference.cli", "export", "--checkpoint", str(step), "--out", str(tmp_path / "m")])
    assert result.returncode == 1 and f"{step}/manifest.json is missing" in result.stderr
    assert not (tmp_path / "m").exists()
