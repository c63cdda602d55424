"""Settings of a simulated fleet (``LINGBOT_FLEET_...`` env vars, ``.env``); each robot's own client settings are
``services.robot_client.RobotSettings`` (``LINGBOT_ROBOT_...``)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.data.embodiments import METAWORLD_CAMERAS


class FleetSettings(BaseSettings):
    """How many simulated Meta-World robots run, what they do and what counts as served on time."""

    model_config = SettingsConfigDict(env_prefix="LINGBOT_FLEET_", env_file=".env", extra="ignore")

    robots: int = Field(2, ge=1, le=256, description="robots, one process each, all against one endpoint")
    episodes: int = Field(1, ge=1, description="episodes per robot (robot i, episode e runs variant i*episodes+e)")
    task: str = Field("reach-v3", description="Meta-World task every robot performs (its name is the instruction)")
    eval_seed: int = Field(1, ge=0, description="benchmark seed of the goal positions (demos use 0)")
    cameras: tuple[str, ...] = Field(METAWORLD_CAMERAS, description="camera order the model was trained with")
    image_size: int = Field(96, ge=8, le=2048, description="square frame side the model was trained with")
    on_time_threshold_pct: float = Field(95.0, ge=0.0, le=100.0,
                                         description="a robot is served on time with at least this share of chunks")
    start_timeout_s: float = Field(120.0, gt=0, description="how long a robot process may take to start")
    replay: str | None = Field(None, description="load tests: robots replay recorded observations instead of "
                                                 "simulating (no simulator on the endpoint's cores): a LeRobot "
                                                 "dataset directory, or 'synthetic' for random frames of the model's "
                                                 "size; None: every robot simulates")
    simulated_robots: int = Field(1, ge=0, description="with replay: how many robots (the first ones) still simulate "
                                                       "Meta-World, for realism in the loop")

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        from pipelines.data.metaworld_collect import resolve_tasks

        (name,) = resolve_tasks([task])  # unknown names: ValueError with close matches
        return name
