"""The gate's promotion rule (``decide``) and its statistics: pure functions of the evaluation reports, no registry
and no tracking (``pipelines.evaluate.gate`` applies the decision)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from pipelines.evaluate.settings import GateSettings

try:  # MLflow's own limits; the constants are internal, hence the fallback
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - only if MLflow moves it
    MAX_TAG_VAL_LENGTH = 5000
try:
    from mlflow.utils.validation import MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
except ImportError:  # pragma: no cover
    MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH = MAX_TAG_VAL_LENGTH

DECISION_TAG = "gate.decision"
TAG_LIMIT = min(MAX_TAG_VAL_LENGTH, MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH)
"""Longest tag value the gate writes: the same tags go on model versions and on the gate run."""


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


def report_success(report: Mapping) -> Any:
    """``avg_success``, or the mean of the tasks' success rates when the report lacks it."""
    if "avg_success" in report:
        return report["avg_success"]
    rates = [t.get("success_rate") for t in (report.get("tasks") or {}).values() if isinstance(t, Mapping)]
    return sum(rates) / len(rates) if rates and all(isinstance(r, (int, float)) for r in rates) else None


def report_episodes(report: Mapping) -> Any:
    """``episodes``, or the sum over tasks when the report lacks it."""
    if "episodes" in report:
        return report["episodes"]
    counts = [t.get("episodes") for t in (report.get("tasks") or {}).values() if isinstance(t, Mapping)]
    return sum(counts) if counts and all(isinstance(c, (int, float)) for c in counts) else None


def decide(candidate: Mapping, champion: Mapping | None, settings: GateSettings) -> Decision:
    """Apply the promotion rule to the candidate's report, against the champion's if any.

    The candidate passes when no episode produced NaN/inf actions (``require_no_nan``), the evaluator hit no errors,
    at least one episode ran, the average over tasks of the success rate is >= ``min_success``, and the drop from the
    champion's success is at most ``max_regression`` + ``regression_allowance`` (a drop that a fresh evaluation of
    the same model could show by chance is no regression). Every failed check is a reason, not just the first.
    ``champion`` is None when there is no champion (or it has no stored report): no regression check then.
    Never raises on bad numbers in either report: they are failed checks with a reason.
    """
    if not isinstance(candidate, Mapping):
        raise ValueError(f"candidate report must be a dict, got {type(candidate).__name__}")
    reasons: list[str] = []
    cand = {**candidate, "avg_success": report_success(candidate), "episodes": report_episodes(candidate)}

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
        champion_success = _number({"avg_success": report_success(champion)}, "avg_success", label, champ_reasons)
        champ_episodes = _number({"episodes": report_episodes(champion)}, "episodes", label, champ_reasons)
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


__all__ = [
    "Decision",
    "decide",
    "regression_allowance",
    "wilson_interval",
]
