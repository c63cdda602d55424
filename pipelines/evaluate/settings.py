"""Settings of `lingbot evaluate` and the gate: the promotion rule, the registry it updates (``GateSettings``), and
the rollouts it judges (``EvalSettings``). Kept apart from ``gate.py`` so that the command line builds its flags
without importing MLflow."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.settings import PlatformSettings, settings_config


class GateSettings(PlatformSettings):
    """Thresholds of the promotion rule and where the registry lives (``LINGBOT_GATE_...`` env vars, ``.env``)."""

    model_config = settings_config("LINGBOT_GATE_")

    min_success: float = Field(0.5, ge=0.0, le=1.0, description="average per-task success the candidate must reach")
    max_regression: float = Field(0.05, ge=0.0, le=1.0,
                                  description="drop vs the champion tolerated on top of the statistical allowance")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence of the binomial allowance and intervals")
    require_no_nan: bool = Field(True, description="fail a candidate with any NaN/inf-action episode")


class EvalSettings(GateSettings):
    """The closed-loop rollouts of `lingbot evaluate`, then the gate (``LINGBOT_GATE_...`` too: they are its evidence)."""

    mode: Literal["sync", "async"] = Field("sync", description="Algorithm 1 (sync) or 2 (async, with the FDM)")
    episodes: int = Field(50, ge=1, description="episodes per task (one per goal position)")
    workers: int = Field(2, ge=1, description="parallel environment processes")
    max_steps: int | None = Field(None, ge=1, description="episode horizon (default: the env's 500)")
    eval_seed: int = Field(1, ge=0, description="benchmark seed of the goal positions (demos use 0)")
    control_rate_hz: float | None = Field(None, gt=0, description="pace the env in real time (wall-time runs)")
    videos: int = Field(1, ge=0, description="rollout videos per task (real next to imagined)")
    failure_videos: int = Field(2, ge=0, description="also film the first N failed episodes per task after those "
                                                     "(logged with the gate run)")
