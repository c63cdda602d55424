"""Simulation-evaluation gate: statistics, the promotion rule, aliases in a real registry, rollback, the gate run.

One module-scoped fixture registers a tiny model three times (versions 1-3) in a sqlite tracking store under a
temporary data dir; each test starts from a registry without gate aliases or tags. Reports are hand-made dicts
(the rollout engine is tested in test_rollout.py); network access is refused for the whole module.
"""

import os

# before mlflow is imported: its telemetry client is created at import time
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from model_dirs import write_model_dir  # this folder's self-contained tiny model directories
from pydantic import ValidationError

from pipelines.evaluate.decision import TAG_LIMIT, decide, regression_allowance, wilson_interval
from pipelines.evaluate.gate import (
    CHAMPION,
    GATE_EXPERIMENT,
    PREVIOUS_CHAMPION,
    GateSettings,
    apply_decision,
    candidate_ref,
    champion_report,
    compact_report,
    gate,
    promote,
    rollback,
)
from pipelines.lineage import data_version, data_versions, log_data_inputs
from pipelines.settings import default_tracking_uri
from pipelines.tracking_store import ensure_experiment
from pipelines.train.registry import log_and_register

NAME = "lingbot-va-gate-test"
TASK = "reach-v3"


def _refuse_network(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError(f"test tried to reach the network: {address}")
    return _connect(self, address, *args, **kwargs)


_connect = socket.socket.connect


def _report(version, success: float, episodes: int = 50, nan: int = 0, errors: int = 0, tasks=(TASK,)) -> dict:
    """An evaluator report of ``version`` with the same success rate on every task, ``episodes`` per task."""
    per_task = {t: {"episodes": episodes, "successes": round(success * episodes), "success_rate": success,
                    "progress": min(1.0, success + 0.1), "steps_to_success": 85.0 if success > 0 else None,
                    "episode_wall_s": 3.1, "nan_episodes": nan, "errors": errors} for t in tasks}
    return {"model_uri": f"models:/{NAME}@challenger", "registered_name": NAME, "model_version": str(version),
            "mode": "sync", "seeds": [0, 1], "tasks": per_task, "avg_success": success,
            "episodes": episodes * len(tasks), "nan_episodes": nan * len(tasks), "errors": errors * len(tasks)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Versions 1, 2 and 3 of NAME (the same tiny model) in a sqlite store; settings pointing at it."""
    tmp = tmp_path_factory.mktemp("gate")
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        mp.setattr(socket.socket, "connect", _refuse_network)
        mlflow.telemetry.set_telemetry_client()  # re-reads the variable in case mlflow was imported earlier
        model_dir = write_model_dir(tmp / "m")
        data_dir = tmp / "data"
        (data_dir / "episodes").mkdir(parents=True)
        (data_dir / "episodes" / "frames.bin").write_bytes(b"recorded demonstrations")
        uri = default_tracking_uri(data_dir)
        mlflow.set_tracking_uri(uri)
        try:
            # the training run: its data as DVC-hashed dataset inputs, like the trainer logs them
            versions = data_versions(data_dir, ("episodes",))
            with mlflow.start_run(experiment_id=ensure_experiment("lingbot-gate-test", data_dir),
                                  tags={"dvc.episodes": versions["episodes"].md5}) as training:
                log_data_inputs(versions, context="training")
                versions = [str(log_and_register(model_dir, registered_name=NAME)) for _ in range(3)]
            yield SimpleNamespace(tmp=tmp, data_dir=data_dir, uri=uri, versions=versions, training=training.info.run_id,
                                  settings=GateSettings(tracking_uri=uri, data_dir=data_dir))
        finally:
            mlflow.set_tracking_uri(previous_uri)  # None unsets the global URI and MLFLOW_TRACKING_URI


@pytest.fixture
def reg(store):
    """The store with no champion/previous-champion aliases and no gate tags on any version."""
    mlflow.set_tracking_uri(store.uri)
    client = mlflow.MlflowClient(tracking_uri=store.uri)
    for alias in (CHAMPION, PREVIOUS_CHAMPION):
        if alias in client.get_registered_model(NAME).aliases:
            client.delete_registered_model_alias(NAME, alias)
    for v in store.versions:
        for key in client.get_model_version(NAME, v).tags:
            if key.startswith("gate."):
                client.delete_model_version_tag(NAME, v, key)
    store.client = client
    return store


def _aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def _assert_consistent(client) -> None:
    """Every alias points to an existing version."""
    for alias, version in _aliases(client).items():
        assert str(client.get_model_version(NAME, version).version) == version, alias


# ---------------------------------------------------------------------------------------------------------------
# Statistics and settings


def test_wilson_interval_hand_computed():
    # z = 1.959964, p = 0.62, n = 50: center (p + z²/2n)/(1 + z²/n) = 0.611438, half-width 0.129934
    low, high = wilson_interval(31, 50, 0.95)
    assert low == pytest.approx(0.481504, abs=1e-5) and high == pytest.approx(0.741372, abs=1e-5)
    assert wilson_interval(0, 20, 0.95) == pytest.approx((0.0, 3.841459 / (20 + 3.841459)), abs=1e-6)
    assert wilson_interval(20, 20, 0.95)[1] == pytest.approx(1.0)
    wide, narrow = wilson_interval(31, 50, 0.99), wilson_interval(31, 50, 0.9)
    assert wide[0] < low < narrow[0] and narrow[1] < high < wide[1]


def test_regression_allowance_hand_computed():
    # one-sided z(0.95) = 1.644854; pooled 0.89 -> sqrt(0.89 * 0.11 * (1/50 + 1/50)) = 0.062578
    assert regression_allowance(0.88, 50, 0.90, 50, 0.95) == pytest.approx(0.102932, abs=1e-5)
    # pooled 0.75 -> 1.644854 * sqrt(0.1875 * 0.04) = 0.142449
    assert regression_allowance(0.6, 50, 0.9, 50, 0.95) == pytest.approx(0.142449, abs=1e-5)
    # unequal counts at 90%: pooled (80 + 28) / 140, z = 1.281552
    assert regression_allowance(0.8, 100, 0.7, 40, 0.9) == pytest.approx(0.100677, abs=1e-5)
    assert regression_allowance(1.0, 50, 1.0, 80) == 0.0


@pytest.mark.parametrize(("call", "match"), [
    (lambda: wilson_interval(0, 0), "n must be a positive whole number"),
    (lambda: wilson_interval(5, 4), r"successes must be in \[0, n=4\]"),
    (lambda: wilson_interval(1, 4, 1.0), r"confidence must be in \(0, 1\)"),
    (lambda: regression_allowance(0.5, 0, 0.5, 10), "n_candidate must be a positive whole number"),
    (lambda: regression_allowance(0.5, 10, 0.5, 0), "n_champion must be a positive whole number"),
    (lambda: regression_allowance(math.nan, 10, 0.5, 10), r"p_candidate must be a success rate in \[0, 1\]"),
    (lambda: regression_allowance(0.5, 10, 1.2, 10), "p_champion must be a success rate"),
])
def test_statistics_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_settings_env_and_ranges(monkeypatch, tmp_path):
    monkeypatch.setenv("LINGBOT_GATE_MIN_SUCCESS", "0.7")
    monkeypatch.setenv("LINGBOT_GATE_REQUIRE_NO_NAN", "false")
    settings = GateSettings(data_dir=tmp_path)
    assert settings.min_success == 0.7 and settings.require_no_nan is False and settings.confidence == 0.95
    assert settings.mlflow_uri == default_tracking_uri(tmp_path)
    for bad in ({"confidence": 0.5}, {"confidence": 1.0}, {"min_success": 1.1}, {"max_regression": -0.1}):
        with pytest.raises(ValidationError):
            GateSettings(**bad)


# ---------------------------------------------------------------------------------------------------------------
# The rule (no registry)


def test_decide_collects_every_reason_and_never_raises_on_nan():
    settings = GateSettings(tracking_uri="sqlite:///unused.db")
    report = _report(1, 0.3, nan=2, errors=1)
    decision = decide(report, None, settings)
    assert not decision.passed and len(decision.reasons) == 3
    assert "NaN/inf actions in 2 episodes" in decision.reasons[0]
    assert "errors in 1 episodes" in decision.reasons[1]
    assert "average success 0.300 is below the minimum 0.500" in decision.reasons[2]
    assert decision.to_tags()["gate.decision"] == "fail"

    nan = decide({**_report(1, 0.8), "avg_success": math.nan}, _report(2, 0.9), settings)
    assert not nan.passed and math.isnan(nan.candidate_success) and nan.allowance is None
    assert any("avg_success is nan" in r for r in nan.reasons)
    assert decide({**_report(1, 0.8), "episodes": 0}, None, settings).reasons == (
        "no episodes were evaluated (0 episodes)",)
    assert "not a finite number" in decide({**_report(1, 0.8), "nan_episodes": math.nan}, None, settings).reasons[0]
    assert decide(_report(1, 0.8, nan=1), None, GateSettings(require_no_nan=False, tracking_uri="x")).passed
    # a champion report that cannot be compared with fails the check instead of being skipped
    broken = decide(_report(1, 0.8), {"model_version": "1", "avg_success": None, "episodes": 50}, settings)
    assert not broken.passed and "cannot compare with the champion" in broken.reasons[0]


def test_decide_regression_uses_the_allowance():
    settings = GateSettings(tracking_uri="sqlite:///unused.db")
    champion = {**_report(1, 0.9), "model_version": "1"}
    slight = decide(_report(2, 0.88), champion, settings)
    assert slight.passed and slight.allowance == pytest.approx(0.102932, abs=1e-5)
    worse = decide(_report(2, 0.6), champion, settings)
    assert not worse.passed and len(worse.reasons) == 1
    assert worse.reasons[0].startswith("success regressed from 0.900 (champion v1, 50 episodes) to 0.600")
    # 0.9 -> 0.75 with 50 episodes each: drop 0.15 < 0.05 + 0.1335; with 2000 episodes each the allowance shrinks
    assert decide(_report(2, 0.75), champion, settings).passed
    assert not decide(_report(2, 0.75, episodes=2000), {**champion, "episodes": 2000}, settings).passed
    tags = slight.to_tags()
    assert tags["gate.decision"] == "pass" and tags["gate.champion_version"] == "1"
    assert tags["gate.champion_success"] == "0.9000" and tags["gate.min_success"] == "0.5"


def test_compact_report_fits_a_tag():
    text = compact_report(_report(3, 0.62, tasks=[f"task-{i:02d}-v3" for i in range(50)]))
    data = json.loads(text)
    assert data["avg_success"] == 0.62 and data["episodes"] == 2500 and data["model_version"] == "3"
    assert data["tasks"]["task-07-v3"] == {"success_rate": 0.62, "episodes": 50}
    assert json.loads(compact_report({**_report(1, 0.5), "avg_success": math.nan}))["avg_success"] is None
    with pytest.raises(ValueError, match="over MLflow's tag value limit"):
        compact_report(_report(1, 0.5, tasks=[f"t{i}-{'x' * 40}" for i in range(TAG_LIMIT // 40)]))


def test_candidate_ref():
    assert candidate_ref(_report(3, 0.5)) == (NAME, "3")
    assert candidate_ref({"model_uri": "models:/lingbot-va-base/7"}) == ("lingbot-va-base", "7")
    with pytest.raises(ValueError, match="does not name the evaluated model version"):
        candidate_ref({"model_uri": "models:/lingbot-va-base@challenger"})


# ---------------------------------------------------------------------------------------------------------------
# Registry: promotion, rejection, rollback


def test_candidate_below_min_success_is_not_promoted(reg):
    v1, _, _ = reg.versions
    before = _aliases(reg.client)
    decision = gate(_report(v1, 0.3), reg.settings)
    assert not decision.passed and decision.champion_version is None
    assert any("below the minimum" in r for r in decision.reasons)
    assert _aliases(reg.client) == before and CHAMPION not in before
    tags = reg.client.get_model_version(NAME, v1).tags
    assert tags["gate.decision"] == "fail" and json.loads(tags["gate.report"])["avg_success"] == 0.3


def test_nan_candidate_fails_and_keeps_the_champion(reg):
    v1, v2, _ = reg.versions
    assert gate(_report(v1, 0.7), reg.settings).passed
    decision = gate(_report(v2, 0.95, nan=3), reg.settings)
    assert not decision.passed and decision.reasons == ("model produced NaN/inf actions in 3 episodes",)
    assert decision.champion_version == v1
    assert _aliases(reg.client)[CHAMPION] == v1 and PREVIOUS_CHAMPION not in _aliases(reg.client)
    # NaN numbers in the report are a failed check with a reason, not an exception
    nan = gate({**_report(v2, 0.95), "avg_success": math.nan}, reg.settings)
    assert not nan.passed and any("nan" in r for r in nan.reasons)
    assert _aliases(reg.client)[CHAMPION] == v1


def test_promotion_regression_and_rollback(reg):
    v1, v2, v3 = reg.versions
    client = reg.client
    assert champion_report(client, NAME) == (None, None)

    first = gate(_report(v1, 0.8), reg.settings)  # no champion yet: becomes the champion
    assert first.passed and first.champion_success is None
    assert _aliases(client)[CHAMPION] == v1 and PREVIOUS_CHAMPION not in _aliases(client)

    better = gate(_report(v2, 0.9), reg.settings)
    assert better.passed and better.champion_version == v1 and better.champion_success == pytest.approx(0.8)
    assert _aliases(client)[CHAMPION] == v2 and _aliases(client)[PREVIOUS_CHAMPION] == v1
    version, stored = champion_report(client, NAME)
    assert version == v2 and stored["avg_success"] == 0.9 and stored["episodes"] == 50

    worse = gate(_report(v3, 0.6), reg.settings)  # 0.9 -> 0.6 at 50 episodes: beyond 0.05 + 0.142
    assert not worse.passed and "regressed from 0.900" in worse.reasons[0]
    assert _aliases(client)[CHAMPION] == v2 and _aliases(client)[PREVIOUS_CHAMPION] == v1

    slight = gate(_report(v3, 0.88), reg.settings)  # re-evaluated: within the allowance
    assert slight.passed and slight.champion_version == v2
    assert _aliases(client)[CHAMPION] == v3 and _aliases(client)[PREVIOUS_CHAMPION] == v2
    assert client.get_model_version(NAME, v3).tags["gate.decision"] == "pass"
    _assert_consistent(client)

    assert rollback(client, NAME) == v2  # swap
    assert _aliases(client)[CHAMPION] == v2 and _aliases(client)[PREVIOUS_CHAMPION] == v3
    _assert_consistent(client)
    assert rollback(client, NAME) == v3  # and back
    assert _aliases(client)[CHAMPION] == v3 and _aliases(client)[PREVIOUS_CHAMPION] == v2


def test_rollback_needs_a_previous_champion(reg):
    with pytest.raises(ValueError, match="has no 'previous-champion' alias: nothing to roll back to"):
        rollback(reg.client, NAME)
    assert gate(_report(reg.versions[0], 0.8), reg.settings).passed
    with pytest.raises(ValueError, match="has no 'previous-champion' alias"):
        rollback(reg.client, NAME)
    with pytest.raises(ValueError, match="no registered model named 'lingbot-va-nope'"):
        rollback(reg.client, "lingbot-va-nope")
    assert champion_report(reg.client, "lingbot-va-nope") == (None, None)


def test_reevaluated_champion_keeps_previous_champion(reg):
    v1, v2, _ = reg.versions
    assert gate(_report(v1, 0.8), reg.settings).passed and gate(_report(v2, 0.85), reg.settings).passed
    assert gate(_report(v2, 0.86), reg.settings).passed  # the champion itself, evaluated again
    assert _aliases(reg.client)[CHAMPION] == v2 and _aliases(reg.client)[PREVIOUS_CHAMPION] == v1


def test_failed_decision_leaves_aliases(reg):
    v1, v2, _ = reg.versions
    assert gate(_report(v1, 0.8), reg.settings).passed
    decision = decide(_report(v2, 0.1), champion_report(reg.client, NAME)[1], reg.settings)
    apply_decision(reg.client, NAME, v2, decision, _report(v2, 0.1))
    assert _aliases(reg.client) == {"challenger": reg.versions[-1], CHAMPION: v1}


# ---------------------------------------------------------------------------------------------------------------
# The gate run


def version_experiment(reg, version) -> str:
    return reg.client.get_run(version.run_id).info.experiment_id


def test_gate_run_in_experiment(reg):
    v1 = reg.versions[0]
    video = reg.tmp / "reach-v3_seed0.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    table = reg.tmp / "episodes.csv"
    table.write_text("task,seed,success\nreach-v3,0,1\n")
    report = _report(v1, 0.62, tasks=(TASK, "push-v3"))
    report["tasks"]["push-v3"]["steps_to_success"] = None
    decision = gate(report, reg.settings, videos=[video], table_path=table)
    assert decision.passed

    run_id = reg.client.get_model_version(NAME, v1).tags["gate.run_id"]
    run = reg.client.get_run(run_id)
    assert run.info.experiment_id == reg.client.get_experiment_by_name(GATE_EXPERIMENT).experiment_id
    assert run.data.tags["gate.decision"] == "pass" and json.loads(run.data.tags["gate.report"])["avg_success"] == 0.62
    metrics = run.data.metrics
    assert metrics["avg_success"] == pytest.approx(0.62) and metrics[f"success/{TASK}"] == pytest.approx(0.62)
    assert metrics[f"progress/{TASK}"] == pytest.approx(0.72) and metrics[f"episode_wall_s/{TASK}"] == 3.1
    assert metrics[f"steps_to_success/{TASK}"] == 85.0 and "steps_to_success/push-v3" not in metrics
    params = run.data.params
    # the version judged, not the alias that moves on
    assert params["model_uri"] == f"models:/{NAME}/{v1}" and params["model_version"] == v1
    assert params["requested_model_uri"] == f"models:/{NAME}@challenger"
    # lineage: version -> LoggedModel -> training run -> its data (DVC hash), and the code's commit
    version = reg.client.get_model_version(NAME, v1)
    assert run.data.tags["training_run_id"] == reg.training == version.run_id
    model_id = version.source.removeprefix("models:/")  # the LoggedModel the version was registered from
    assert run.data.tags["model_id"] == model_id and run.inputs.model_inputs[0].model_id == model_id
    expected = data_version(reg.data_dir / "episodes")
    assert expected.md5.endswith(".dir") and expected.source == "computed"
    assert [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] == [("episodes", expected.md5)]
    assert run.data.tags["dvc.episodes"] == expected.md5 and len(run.data.tags["git_commit"]) == 40
    # the gate's numbers are the LoggedModel's metrics too
    found = mlflow.search_logged_models(experiment_ids=[version_experiment(reg, version)],
                                        filter_string="metrics.avg_success > 0.5", output_format="list")
    assert model_id in {m.model_id for m in found}
    logged = {(m.key, round(m.value, 4), m.run_id) for m in mlflow.get_logged_model(model_id).metrics}
    assert ("avg_success", 0.62, run_id) in logged and (f"success/{TASK}", 0.62, run_id) in logged
    assert params["mode"] == "sync" and params["episodes"] == "100" and params["gate.min_success"] == "0.5"
    artifacts = {a.path for d in ("", "videos", "gate", "tables") for a in reg.client.list_artifacts(run_id, d)}
    assert {"videos/reach-v3_seed0.mp4", "gate/tasks.json", "tables/episodes.csv"} <= artifacts
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="gate/tasks.json", dst_path=str(reg.tmp))
    rows = json.loads(Path(path).read_text())
    assert rows["columns"][0] == "task" and [r[0] for r in rows["data"]] == [TASK, "push-v3"]

    with pytest.raises(ValueError, match="do not exist"):
        gate(report, reg.settings, videos=[reg.tmp / "missing.mp4"])


def test_promote_by_hand_and_show(reg, capsys):
    from pipelines.cli import main

    v1, v2 = reg.versions[:2]
    assert promote(reg.client, NAME, v1) is None
    assert promote(reg.client, NAME, v2) == v1  # the replaced champion is kept for a rollback
    assert _aliases(reg.client)[CHAMPION] == v2 and _aliases(reg.client)[PREVIOUS_CHAMPION] == v1
    assert reg.client.get_model_version(NAME, v2).tags["promoted.by_hand"] == "true"
    with pytest.raises(ValueError, match="has no version 99"):
        promote(reg.client, NAME, "99")
    with pytest.raises(ValueError, match="use --rollback"):
        promote(reg.client, NAME, v1, alias=PREVIOUS_CHAMPION)
    where = ["--name", NAME, "--tracking-uri", reg.uri, "--data-dir", str(reg.data_dir)]
    assert main(["promote", *where, "--version", v1]) == 0
    assert f"{CHAMPION} is version {v1} (was {v2}; now previous-champion)" in capsys.readouterr().out
    assert main(["promote", *where, "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"][CHAMPION] == v1 and shown["aliases"][PREVIOUS_CHAMPION] == v2
    assert main(["promote", *where, "--rollback"]) == 0 and _aliases(reg.client)[CHAMPION] == v2
