"""`lingbot evaluate` + gate + `lingbot promote --rollback` end to end on a real MLflow registry (tiny models)."""

from __future__ import annotations

import json

import mlflow
import pytest
from model_dirs import TASK, write_model_dir

from pipelines.cli import main
from pipelines.tracking_store import ensure_experiment
from pipelines.train.registry import log_and_register


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("LINGBOT_GATE_TRACKING_URI", uri)
    monkeypatch.setenv("LINGBOT_GATE_DATA_DIR", str(tmp_path))
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / "mlruns").exists(), "an artifact went to the cwd's ./mlruns, not the data dir"


def register(tmp_path, tag: str, **kw) -> str:
    model_dir = write_model_dir(tmp_path / tag, **kw)
    # an experiment of its own: the sqlite store's Default experiment keeps its artifacts in ./mlruns (the cwd)
    with mlflow.start_run(experiment_id=ensure_experiment("lingbot-posttrain", tmp_path)):
        return str(log_and_register(model_dir, registered_name=f"lingbot-va-{TASK}"))


def aliases() -> dict:
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(f"lingbot-va-{TASK}").aliases.items()}


def evaluate(tmp_path, capsys, *extra) -> tuple[int, str, dict]:
    out = tmp_path / "report.json"
    code = main(["evaluate", "--model", f"models:/lingbot-va-{TASK}@challenger", "--task", TASK, "--episodes", "2",
                 "--workers", "1", "--max-steps", "16", "--videos", "1", "--out", str(out), *extra])
    return code, capsys.readouterr().out, json.loads(out.read_text())


def test_gate_promotes_good_rejects_nan_and_rollback_restores(registry, capsys, monkeypatch):
    monkeypatch.setenv("LINGBOT_GATE_MIN_SUCCESS", "0.0")  # untrained tiny models never succeed; test the mechanics
    v1 = register(registry, "good")
    code, out, report = evaluate(registry, capsys)
    assert code == 0 and "PASS" in out and report["model_version"] == v1
    assert aliases() == {"challenger": v1, "champion": v1}

    v2 = register(registry, "nan", nan=True)  # a broken model: every chunk is NaN
    code, out, report = evaluate(registry, capsys)
    assert code == 1 and "FAIL" in out and "NaN" in out
    assert report["nan_episodes"] == 2
    assert aliases()["champion"] == v1  # unchanged

    v3 = register(registry, "good2", seed=1)
    code, out, _ = evaluate(registry, capsys)
    assert code == 0
    assert aliases()["champion"] == v3 and aliases()["previous-champion"] == v1
    assert main(["promote", "--rollback", "--task", TASK]) == 0
    assert aliases()["champion"] == v1 and aliases()["previous-champion"] == v3
    assert v2 not in (aliases()["champion"], aliases()["previous-champion"])
    runs = mlflow.search_runs(experiment_names=["lingbot-gate"])
    assert len(runs) == 3 and set(runs["tags.gate.decision"]) == {"pass", "fail"}


def test_gate_threshold_blocks_a_model_below_min_success(registry, capsys):
    v1 = register(registry, "weak")
    code, out, _ = evaluate(registry, capsys)  # default min_success 0.5; an untrained model succeeds 0 times
    assert code == 1 and "min" in out.lower()
    assert "champion" not in aliases() and aliases()["challenger"] == v1
    # pipelines (dvc evaluate@task) keep going on a rejection; the decision is in the report, the registry unchanged
    code, _, report = evaluate(registry, capsys, "--no-fail")
    assert code == 0 and report["gate"]["passed"] is False and report["gate"]["reasons"]
    assert "champion" not in aliases()


def test_bad_model_uri_is_a_clear_error(registry, capsys):
    assert main(["evaluate", "--model", "models:/lingbot-va-nope@challenger", "--task", TASK]) == 2
    assert "no such registered model version" in capsys.readouterr().err
