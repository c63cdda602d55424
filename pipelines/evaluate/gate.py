"""Simulation-evaluation gate: judge a candidate (``pipelines.evaluate.decision``), log the decision as a run in
experiment ``lingbot-gate`` and, on a pass, promote the candidate to ``champion`` in the MLflow model registry.

    settings = GateSettings()                                   # pipelines.evaluate.settings: LINGBOT_GATE_..., .env
    decision = gate(report, settings, videos=[Path("reach-v3_seed0.mp4")])
    if not decision.passed:
        print("\\n".join(decision.reasons)); sys.exit(1)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow

from pipelines.evaluate.decision import TAG_LIMIT, Decision, decide, report_episodes, report_success
from pipelines.evaluate.settings import GateSettings
from pipelines.settings import parse_model_uri
from pipelines.tracking_store import ensure_experiment
from pipelines.train.registry import flatten_params

log = logging.getLogger(__name__)

GATE_EXPERIMENT = "lingbot-gate"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
REPORT_TAG = "gate.report"


# ---------------------------------------------------------------------------------------------------------------
# Registry


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return round(x, 6) if isinstance(x, float) else x


def compact_report(report: Mapping) -> str:
    """The part of a report the gate compares against, as compact JSON (fits a tag; NaN/inf become null).

    ``model_version``, ``avg_success``, ``episodes``, ``nan_episodes``, ``errors`` and per task ``success_rate``
    and ``episodes``. Raises ``ValueError`` when even that exceeds MLflow's tag value limit (``TAG_LIMIT``).
    """
    tasks = report.get("tasks") or {}
    data = {
        "model_version": None if report.get("model_version") is None else str(report["model_version"]),
        "avg_success": _finite_or_none(report_success(report)),
        "episodes": _finite_or_none(report_episodes(report)),
        "nan_episodes": _finite_or_none(report.get("nan_episodes", 0)),
        "errors": _finite_or_none(report.get("errors", 0)),
        "tasks": {name: {"success_rate": _finite_or_none(t.get("success_rate")),
                         "episodes": _finite_or_none(t.get("episodes"))}
                  for name, t in tasks.items() if isinstance(t, Mapping)},
    }
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str)
    if len(text) > TAG_LIMIT:
        raise ValueError(f"the compact gate report is {len(text)} characters, over MLflow's tag value limit of "
                         f"{TAG_LIMIT} ({len(data['tasks'])} tasks); evaluate fewer tasks per registered model")
    return text


def _aliases(client: mlflow.MlflowClient, registered_name: str) -> dict[str, str]:
    """Alias -> version (as str) of a registered model; ``ValueError`` when there is no model of that name."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(registered_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"no registered model named {registered_name!r}") from err
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def champion_report(client: mlflow.MlflowClient, registered_name: str) -> tuple[str | None, dict | None]:
    """``(version, report)`` of the current champion from its ``gate.report`` tag; ``(None, None)`` without one.

    A champion set outside the gate (no ``gate.report`` tag) gives ``(version, None)``: nothing to compare with.
    A model of that name that does not exist yet has no champion. ``report["model_version"]`` is the alias's version.
    """
    try:
        aliases = _aliases(client, registered_name)
    except ValueError:
        return None, None
    version = aliases.get(CHAMPION)
    if version is None:
        return None, None
    text = client.get_model_version(registered_name, version).tags.get(REPORT_TAG)
    if text is None:
        log.warning("champion v%s of %s has no %s tag: no regression check", version, registered_name, REPORT_TAG)
        return version, None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"tag {REPORT_TAG} of {registered_name} v{version} (the champion) is not JSON: {err}") from err
    if not isinstance(report, dict):
        raise ValueError(f"tag {REPORT_TAG} of {registered_name} v{version} (the champion) is not a JSON object")
    report["model_version"] = version
    return version, report


def apply_decision(client: mlflow.MlflowClient, registered_name: str, candidate_version: str | int,
                   decision: Decision, report: Mapping, run_id: str | None = None) -> None:
    """Tag the candidate version with the decision and its compact report; on a pass, make it the champion.

    Tags go first (a champion always carries the report the next candidate is compared with); then
    ``previous-champion`` moves to the old champion, then ``champion`` to the candidate, so a crash in between
    leaves both on the old champion. A candidate that already is the champion keeps ``previous-champion`` as is.
    ``run_id`` (the gate run) is stored as tag ``gate.run_id``. On a fail no alias changes.
    """
    version = str(candidate_version)
    aliases = _aliases(client, registered_name)
    client.get_model_version(registered_name, version)  # raises for an unknown version before anything changes
    tags = {**decision.to_tags(), REPORT_TAG: compact_report({**report, "model_version": version})}
    if run_id is not None:
        tags["gate.run_id"] = run_id
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    if not decision.passed:
        return
    old = aliases.get(CHAMPION)
    if old is not None and old != version:
        client.set_registered_model_alias(registered_name, PREVIOUS_CHAMPION, old)
    client.set_registered_model_alias(registered_name, CHAMPION, version)


def aliases(client: mlflow.MlflowClient, registered_name: str) -> dict[str, str]:
    """Alias -> version of a registered model (ValueError when there is no model of that name)."""
    return _aliases(client, registered_name)


def promote(client: mlflow.MlflowClient, registered_name: str, version: str | int, alias: str = CHAMPION) -> str | None:
    """Point ``alias`` at ``version`` by hand; returns the version it pointed to before (None if unset).

    Moving ``champion`` keeps the replaced champion as ``previous-champion`` (set first, as the gate does, so a crash
    in between leaves both on the old one) and tags the version ``promoted.by_hand``: the gate's tags stay what the
    gate decided. ``previous-champion`` itself is not an alias to set here (``--rollback`` manages it).
    """
    from mlflow.exceptions import MlflowException

    if alias == PREVIOUS_CHAMPION:
        raise ValueError(f"{PREVIOUS_CHAMPION!r} follows the champion; use --rollback, or move 'champion'")
    current = _aliases(client, registered_name)
    version = str(version)
    try:
        client.get_model_version(registered_name, version)
    except MlflowException:
        raise ValueError(f"{registered_name} has no version {version}") from None
    old = current.get(alias)
    if alias == CHAMPION and old is not None and old != version:
        client.set_registered_model_alias(registered_name, PREVIOUS_CHAMPION, old)
    client.set_registered_model_alias(registered_name, alias, version)
    if alias == CHAMPION:
        client.set_model_version_tag(registered_name, version, "promoted.by_hand", "true")
    return old


def rollback(client: mlflow.MlflowClient, registered_name: str) -> str:
    """Make ``previous-champion`` the champion again (the current champion becomes ``previous-champion``).

    Returns the restored version. ``champion`` moves first, so a crash in between leaves both aliases on the
    restored version rather than losing it. Without a current champion (or when both already point to the same
    version) ``previous-champion`` is removed instead of swapped.
    """
    aliases = _aliases(client, registered_name)
    previous = aliases.get(PREVIOUS_CHAMPION)
    if previous is None:
        raise ValueError(f"{registered_name} has no {PREVIOUS_CHAMPION!r} alias: nothing to roll back to")
    current = aliases.get(CHAMPION)
    client.set_registered_model_alias(registered_name, CHAMPION, previous)
    if current is not None and current != previous:
        client.set_registered_model_alias(registered_name, PREVIOUS_CHAMPION, current)
    else:
        client.delete_registered_model_alias(registered_name, PREVIOUS_CHAMPION)
    return previous


# ---------------------------------------------------------------------------------------------------------------
# Tracking


def _metric(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def record_decision(report: Mapping, decision: Decision, settings: GateSettings, videos: Sequence[Path] = (),
                    table_path: Path | None = None, candidate: Any = None) -> str:
    """Log the evaluation and the decision as a run in experiment ``lingbot-gate``; returns its run id.

    Params: the model version judged (``model_uri`` = ``models:/<name>/<version>``; ``requested_model_uri`` = what
    the evaluator was asked for, e.g. the ``@challenger`` alias), mode, episodes, seeds and the gate settings.
    Metrics: ``avg_success``, ``episodes``, ``nan_episodes``, ``errors`` and per task ``success/<task>``,
    ``progress/<task>``, ``steps_to_success/<task>`` (absent when no episode succeeded), ``episode_wall_s/<task>``;
    with ``candidate`` (the registry's ``ModelVersion``) they are also the metrics of its LoggedModel, so
    ``mlflow.search_logged_models(filter_string="metrics.avg_success > 0.5")`` finds judged models. Lineage
    (``candidate``): the LoggedModel as a model input, the training run's dataset inputs (the DVC hashes of its
    data) re-logged, tags ``training_run_id``, ``model_id``, ``dvc.<name>``, ``git_commit`` and the pipeline's parent
    run. Artifacts: the per-task table (``mlflow.log_table``, ``gate/tasks.json``), each video under ``videos/``, and
    ``table_path`` (an extra table file of the evaluator, e.g. per episode) under ``tables/``. Tags:
    ``decision.to_tags()``.
    """
    videos = [Path(v) for v in videos]
    missing = [str(p) for p in [*videos, *([Path(table_path)] if table_path else [])] if not p.is_file()]
    if missing:
        raise ValueError(f"files to log with the gate run do not exist: {missing}")
    mlflow.set_tracking_uri(settings.mlflow_uri)
    experiment = ensure_experiment(GATE_EXPERIMENT, settings.data_dir)
    tasks = {name: t for name, t in (report.get("tasks") or {}).items() if isinstance(t, Mapping)}
    name, version = report.get("registered_name"), report.get("model_version")
    run_name = f"gate-{name}-v{version}" if name and version is not None else "gate"
    judged = f"models:/{name}/{version}" if name and version is not None else report.get("model_uri")
    params = {
        "model_uri": judged, "requested_model_uri": report.get("model_uri"), "registered_name": name,
        "model_version": version,
        "mode": report.get("mode"), "episodes": report_episodes(report), "seeds": list(report.get("seeds") or []),
        "tasks": sorted(tasks),
        "gate": settings.model_dump(include={"min_success", "max_regression", "confidence", "require_no_nan"}),
    }
    metrics = {"avg_success": report_success(report), "episodes": report_episodes(report),
               "nan_episodes": report.get("nan_episodes"), "errors": report.get("errors")}
    if decision.champion_success is not None:
        metrics["champion_success"] = decision.champion_success
    if decision.allowance is not None:
        metrics["allowance"] = decision.allowance
    columns = ("episodes", "successes", "success_rate", "progress", "steps_to_success", "episode_wall_s",
               "nan_episodes", "errors")
    for task, t in tasks.items():
        for key, metric in (("success_rate", "success"), ("progress", "progress"),
                            ("steps_to_success", "steps_to_success"), ("episode_wall_s", "episode_wall_s")):
            metrics[f"{metric}/{task}"] = t.get(key)
    metrics = {k: v for k, v in ((k, _metric(v)) for k, v in metrics.items()) if v is not None}
    table = {"task": list(tasks), **{c: [_finite_or_none(t.get(c)) for t in tasks.values()] for c in columns}}

    tags = {**decision.to_tags(), REPORT_TAG: compact_report(report)}
    training = _training_lineage(candidate, settings)
    tags.update(training["tags"])
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten_params(params))
        # with the LoggedModel's id they are also that model's metrics (searchable with search_logged_models)
        mlflow.log_metrics(metrics, model_id=training["model_id"])
        if training["inputs"] or training["model_id"]:
            from mlflow.entities import LoggedModelInput

            models = [LoggedModelInput(training["model_id"])] if training["model_id"] else None
            mlflow.MlflowClient().log_inputs(run.info.run_id, datasets=training["inputs"] or None, models=models)
        if tasks:
            mlflow.log_table(table, artifact_file="gate/tasks.json")
        for video in videos:
            mlflow.log_artifact(str(video), "videos")
        if table_path:
            mlflow.log_artifact(str(table_path), "tables")
        return run.info.run_id


def _training_lineage(candidate: Any, settings: GateSettings) -> dict[str, Any]:
    """What links a gate run to the judged version's training: its LoggedModel id, the training run's dataset
    inputs (DVC hashes), and tags (training run, ``dvc.<name>`` of that run, git commit, pipeline parent run)."""
    from pipelines.lineage import PARENT_TAG, git_commit

    out: dict[str, Any] = {"model_id": None, "inputs": [], "tags": {}}
    commit = git_commit()
    if commit:
        out["tags"]["git_commit"] = commit
    if candidate is None:
        return out
    # ModelVersion.model_id is not filled by every store (sqlite leaves it None); its source is models:/<model id>
    source = str(getattr(candidate, "source", "") or "")
    out["model_id"] = getattr(candidate, "model_id", None) or (source.removeprefix("models:/")
                                                               if source.startswith("models:/m-") else None)
    if out["model_id"]:
        out["tags"]["model_id"] = out["model_id"]
    if candidate.run_id:
        out["tags"]["training_run_id"] = candidate.run_id
        try:
            run = mlflow.MlflowClient().get_run(candidate.run_id)
        except mlflow.exceptions.MlflowException:  # the training run was deleted: the version alone is still judged
            return out
        out["inputs"] = list(run.inputs.dataset_inputs) if run.inputs else []
        for key, value in run.data.tags.items():
            if key.startswith("dvc.") or key in ("data_version", PARENT_TAG):
                out["tags"][key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole gate


def candidate_ref(report: Mapping, client: mlflow.MlflowClient | None = None) -> tuple[str, str]:
    """``(registered_name, version)`` the report evaluated: its ``registered_name`` and ``model_version``, else
    parsed from ``model_uri`` (``models:/<name>/<version>``, or ``models:/<name>@<alias>`` resolved with ``client``).
    """
    name, version = report.get("registered_name"), report.get("model_version")
    uri = parse_model_uri(report.get("model_uri") or "")
    if not name and uri:
        name = uri.name
    if version is None and uri and uri.version:
        version = uri.version
    if version is None and uri and uri.alias and client is not None and name == uri.name:
        version = client.get_model_version_by_alias(name, uri.alias).version
    if not name or version is None:
        raise ValueError("the report does not name the evaluated model version: it needs 'registered_name' and "
                         f"'model_version' (or a models:/<name>/<version> model_uri), got model_uri="
                         f"{report.get('model_uri')!r}")
    return str(name), str(version)


def gate(report: Mapping, settings: GateSettings, videos: Sequence[Path] = (),
         table_path: Path | None = None) -> Decision:
    """Decide on the report's model version, log the decision run, then tag it and promote it on a pass.

    The caller prints ``decision.reasons`` and exits non-zero when ``not decision.passed``.
    """
    uri = settings.mlflow_uri
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    name, version = candidate_ref(report, client)
    report = {**report, "registered_name": name, "model_version": version}
    champion_version, champion = champion_report(client, name)
    decision = decide(report, champion, settings)
    if decision.champion_version is None and champion_version is not None:
        decision = replace(decision, champion_version=champion_version)
    candidate = client.get_model_version(name, version)
    run_id = record_decision(report, decision, settings, videos=videos, table_path=table_path, candidate=candidate)
    apply_decision(client, name, version, decision, report, run_id=run_id)
    return decision


__all__ = [
    "CHAMPION",
    "GATE_EXPERIMENT",
    "PREVIOUS_CHAMPION",
    "GateSettings",
    "aliases",
    "apply_decision",
    "candidate_ref",
    "champion_report",
    "compact_report",
    "gate",
    "promote",
    "record_decision",
    "rollback",
]
