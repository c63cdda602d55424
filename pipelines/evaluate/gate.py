"""Simulation-evaluation gate: promote a candidate (alias ``challenger``) to ``champion`` in the MLflow model registry.

The rule, applied to the evaluator's report of the candidate (``pipelines.evaluate.rollout``):
  * no episode produced NaN/inf actions (``require_no_nan``) and the evaluator hit no errors;
  * at least one episode ran, and the average over tasks of the success rate is >= ``min_success``;
  * no regression against the current champion's stored report: the candidate fails when
    ``champion_success - candidate_success > max_regression + allowance``, where ``allowance`` is the one-sided
    two-proportion margin ``z * sqrt(p (1 - p) (1/n_candidate + 1/n_champion))`` (``p`` pooled over both reports'
    episodes, ``z`` the ``confidence`` quantile of the normal distribution). A drop that a fresh evaluation of the
    same model could show by chance is not counted as a regression; ``max_regression`` is tolerated on top of it.
All failed checks are reported, not just the first; a report with NaN numbers fails with a reason, it never raises.

Registry side: on a pass, ``previous-champion`` is set to the old champion *before* ``champion`` moves to the
candidate, so a crash in between leaves both aliases on the old champion (never a registry without a champion).
Every evaluated version gets the tags ``gate.decision``, ``gate.reasons`` and ``gate.report`` (a compact JSON of the
report: the champion's report is what the next candidate is compared against); ``rollback`` swaps the two aliases back.
Each decision is also an MLflow run in experiment ``lingbot-gate`` (params, per-task metrics and table, videos).

    settings = GateSettings()                                   # LINGBOT_GATE_... env vars and .env
    decision = gate(report, settings, videos=[Path("reach-v3_seed0.mp4")])
    if not decision.passed:
        print("\\n".join(decision.reasons)); sys.exit(1)
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import mlflow
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.settings import REPO_ROOT
from pipelines.train.registry import default_tracking_uri, ensure_experiment, flatten_params

try:  # MLflow's own limits; the constants are internal, hence the fallback
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - only if MLflow moves it
    MAX_TAG_VAL_LENGTH = 5000
try:
    from mlflow.utils.validation import MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
except ImportError:  # pragma: no cover
    MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH = MAX_TAG_VAL_LENGTH

log = logging.getLogger(__name__)

GATE_EXPERIMENT = "lingbot-gate"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
REPORT_TAG = "gate.report"
DECISION_TAG = "gate.decision"
TAG_LIMIT = min(MAX_TAG_VAL_LENGTH, MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH)
"""Longest tag value the gate writes: the same tags go on model versions and on the gate run."""

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")


class GateSettings(BaseSettings):
    """Thresholds of the promotion rule and where the registry lives (``LINGBOT_GATE_...`` env vars, ``.env``)."""

    model_config = SettingsConfigDict(env_prefix="LINGBOT_GATE_", env_file=".env", extra="ignore")

    min_success: float = Field(0.5, ge=0.0, le=1.0, description="average per-task success the candidate must reach")
    max_regression: float = Field(0.05, ge=0.0, le=1.0,
                                  description="drop vs the champion tolerated on top of the statistical allowance")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence of the binomial allowance and intervals")
    require_no_nan: bool = Field(True, description="fail a candidate with any NaN/inf-action episode")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite in <data_dir>/mlflow)")
    data_dir: Path = Field(REPO_ROOT / "data", description="root of generated artefacts (MLflow store, artifacts)")

    @property
    def uri(self) -> str:
        """The tracking URI in use: ``tracking_uri`` or the data dir's sqlite store."""
        return self.tracking_uri or default_tracking_uri(self.data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def _z(confidence: float, two_sided: bool) -> float:
    if not 0.0 < confidence < 1.0:  # NaN fails the comparison too
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0 if two_sided else confidence)


def _check_n(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n) or n <= 0:
        raise ValueError(f"{what} must be a positive whole number of episodes, got {n!r}")
    return int(n)


def _check_p(p: Any, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:  # NaN fails the comparison
        raise ValueError(f"{what} must be a success rate in [0, 1], got {p!r}")
    return float(p)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a success rate ``successes / n`` at ``confidence``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes.
    """
    n = _check_n(n, "n")
    if isinstance(successes, bool) or not isinstance(successes, (int, float)) or not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes!r}")
    z = _z(confidence, two_sided=True)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def regression_allowance(p_candidate: float, n_candidate: int, p_champion: float, n_champion: int,
                         confidence: float = 0.95) -> float:
    """Drop in success rate that chance alone explains: ``z * sqrt(p (1 - p) (1/n_candidate + 1/n_champion))``.

    ``p`` is the success rate pooled over both evaluations' episodes (the two-proportion standard error under
    "same model"), ``z`` the one-sided ``confidence`` quantile of the normal distribution (only drops matter).
    0 when the pooled rate is 0 or 1 (no variance to allow for).
    """
    p1, p2 = _check_p(p_candidate, "p_candidate"), _check_p(p_champion, "p_champion")
    n1, n2 = _check_n(n_candidate, "n_candidate"), _check_n(n_champion, "n_champion")
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    return _z(confidence, two_sided=False) * math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))


# ---------------------------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class Decision:
    """Outcome of the gate for one candidate; ``reasons`` lists every failed check (empty on a pass)."""

    passed: bool
    reasons: tuple[str, ...]
    candidate_success: float
    champion_success: float | None = None
    champion_version: str | None = None
    allowance: float | None = None
    """Statistical allowance of the regression check (None when there was no comparison)."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The thresholds the decision was taken with."""

    def to_tags(self) -> dict[str, str]:
        """MLflow tags (model version and gate run): ``gate.decision`` = pass/fail, ``gate.reasons``, numbers."""
        tags = {
            DECISION_TAG: "pass" if self.passed else "fail",
            "gate.reasons": "; ".join(self.reasons) if self.reasons else "all checks passed",
            "gate.candidate_success": _fmt(self.candidate_success),
        }
        if self.champion_success is not None:
            tags["gate.champion_success"] = _fmt(self.champion_success)
        if self.champion_version is not None:
            tags["gate.champion_version"] = str(self.champion_version)
        if self.allowance is not None:
            tags["gate.allowance"] = _fmt(self.allowance)
        for key, value in self.settings.items():
            tags[f"gate.{key}"] = str(value)
        return {k: v if len(v) <= TAG_LIMIT else v[: TAG_LIMIT - 3] + "..." for k, v in tags.items()}


def _fmt(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _number(report: Mapping, key: str, who: str, reasons: list[str]) -> float | None:
    """``report[key]`` as a finite float, else None with a reason appended."""
    value = report.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        reasons.append(f"{who} report has no numeric '{key}' (got {value!r})")
        return None
    if not math.isfinite(value):
        reasons.append(f"{who} {key} is {value} (not a finite number)")
        return None
    return float(value)


def _success(report: Mapping) -> Any:
    """``avg_success``, or the mean of the tasks' success rates when the report lacks it."""
    if "avg_success" in report:
        return report["avg_success"]
    rates = [t.get("success_rate") for t in (report.get("tasks") or {}).values() if isinstance(t, Mapping)]
    return sum(rates) / len(rates) if rates and all(isinstance(r, (int, float)) for r in rates) else None


def _episodes(report: Mapping) -> Any:
    """``episodes``, or the sum over tasks when the report lacks it."""
    if "episodes" in report:
        return report["episodes"]
    counts = [t.get("episodes") for t in (report.get("tasks") or {}).values() if isinstance(t, Mapping)]
    return sum(counts) if counts and all(isinstance(c, (int, float)) for c in counts) else None


def decide(candidate: Mapping, champion: Mapping | None, settings: GateSettings) -> Decision:
    """Apply the promotion rule (module docstring) to the candidate's report, against the champion's if any.

    ``champion`` is None when there is no champion (or it has no stored report): no regression check then.
    Never raises on bad numbers in either report: they are failed checks with a reason.
    """
    if not isinstance(candidate, Mapping):
        raise ValueError(f"candidate report must be a dict, got {type(candidate).__name__}")
    reasons: list[str] = []
    cand = {**candidate, "avg_success": _success(candidate), "episodes": _episodes(candidate)}

    nan_episodes = _number(cand, "nan_episodes", "candidate", reasons) if "nan_episodes" in cand else 0.0
    if nan_episodes and settings.require_no_nan:
        reasons.append(f"model produced NaN/inf actions in {int(nan_episodes)} episodes")
    errors = _number(cand, "errors", "candidate", reasons) if "errors" in cand else 0.0
    if errors:
        reasons.append(f"the evaluator hit errors in {int(errors)} episodes")
    episodes = _number(cand, "episodes", "candidate", reasons)
    if episodes is not None and episodes <= 0:
        reasons.append("no episodes were evaluated (0 episodes)")
        episodes = None
    success = _number(cand, "avg_success", "candidate", reasons)
    if success is not None and not 0.0 <= success <= 1.0:
        reasons.append(f"candidate avg_success {success} is not a success rate in [0, 1]")
        success = None
    if success is not None and success < settings.min_success:
        reasons.append(f"average success {success:.3f} is below the minimum {settings.min_success:.3f}")

    champion_success = allowance = champion_version = None
    if champion is not None:
        champion_version = None if champion.get("model_version") is None else str(champion["model_version"])
        label = f"champion v{champion_version}" if champion_version else "champion"
        champ_reasons: list[str] = []
        champion_success = _number({"avg_success": _success(champion)}, "avg_success", label, champ_reasons)
        champ_episodes = _number({"episodes": _episodes(champion)}, "episodes", label, champ_reasons)
        if champion_success is not None and not 0.0 <= champion_success <= 1.0:
            champ_reasons.append(f"{label} avg_success {champion_success} is not a success rate in [0, 1]")
        if champ_episodes is not None and champ_episodes <= 0:
            champ_reasons.append(f"{label} report has 0 episodes")
        if champ_reasons:
            reasons.extend(f"cannot compare with the champion: {r}" for r in champ_reasons)
        elif success is not None and episodes is not None:
            allowance = regression_allowance(success, int(episodes), champion_success, int(champ_episodes),
                                             settings.confidence)
            drop = champion_success - success
            if drop > settings.max_regression + allowance + 1e-12:
                reasons.append(
                    f"success regressed from {champion_success:.3f} ({label}, {int(champ_episodes)} episodes) to "
                    f"{success:.3f} ({int(episodes)} episodes): a drop of {drop:.3f} exceeds the tolerated "
                    f"{settings.max_regression:.3f} + {allowance:.3f} statistical allowance at "
                    f"{settings.confidence:.0%} confidence")

    raw = candidate.get("avg_success", success)
    candidate_success = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else math.nan
    return Decision(passed=not reasons, reasons=tuple(reasons), candidate_success=candidate_success,
                    champion_success=champion_success, champion_version=champion_version, allowance=allowance,
                    settings={k: getattr(settings, k) for k in ("min_success", "max_regression", "confidence",
                                                                 "require_no_nan")})


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
        "avg_success": _finite_or_none(_success(report)),
        "episodes": _finite_or_none(_episodes(report)),
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
    mlflow.set_tracking_uri(settings.uri)
    experiment = ensure_experiment(GATE_EXPERIMENT, settings.data_dir)
    tasks = {name: t for name, t in (report.get("tasks") or {}).items() if isinstance(t, Mapping)}
    name, version = report.get("registered_name"), report.get("model_version")
    run_name = f"gate-{name}-v{version}" if name and version is not None else "gate"
    judged = f"models:/{name}/{version}" if name and version is not None else report.get("model_uri")
    params = {
        "model_uri": judged, "requested_model_uri": report.get("model_uri"), "registered_name": name,
        "model_version": version,
        "mode": report.get("mode"), "episodes": _episodes(report), "seeds": list(report.get("seeds") or []),
        "tasks": sorted(tasks),
        "gate": settings.model_dump(include={"min_success", "max_regression", "confidence", "require_no_nan"}),
    }
    metrics = {"avg_success": _success(report), "episodes": _episodes(report),
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
    match = _MODEL_URI.match(str(report.get("model_uri") or ""))
    if not name and match:
        name = match["name"]
    if version is None and match and match["version"]:
        version = match["version"]
    if version is None and match and match["alias"] and client is not None and name == match["name"]:
        version = client.get_model_version_by_alias(name, match["alias"]).version
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
    uri = settings.uri
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
    "Decision",
    "GateSettings",
    "aliases",
    "apply_decision",
    "candidate_ref",
    "champion_report",
    "compact_report",
    "decide",
    "gate",
    "promote",
    "record_decision",
    "regression_allowance",
    "rollback",
    "wilson_interval",
]
