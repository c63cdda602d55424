"""Runtime settings of a robot's edge client (``LINGBOT_ROBOT_...`` env vars, ``.env``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.protocol import DEFAULT_MODEL_NAME


class RobotSettings(BaseSettings):
    """How one robot talks to its policy endpoint and how it behaves when the endpoint is late or gone."""

    model_config = SettingsConfigDict(env_prefix="LINGBOT_ROBOT_", env_file=".env", extra="ignore")

    robot_id: str = Field("robot", pattern=r"^[A-Za-z0-9._:-]{1,64}$",
                          description="name of this robot; prefixes its session ids (one per episode)")
    endpoint: str = Field("127.0.0.1:8081", description="gRPC host:port, or the REST base URL (http://host:port)")
    canary_endpoint: str | None = Field(
        None, description="the canary's endpoint, same transport (KServe Standard mode: the Service "
                          "<isvc>-canary-predictor beside <isvc>-predictor); whole episodes run there, never "
                          "single requests")
    canary_percent: int = Field(0, ge=0, le=100, description="share of episodes (not requests) sent to "
                                                             "canary_endpoint, chosen per episode from a hash of its "
                                                             "session id; 0: no canary")
    transport: Literal["grpc", "rest"] = Field("grpc", description="KServe V2 over gRPC (primary) or REST")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="model name the endpoint serves")
    token: SecretStr | None = Field(None, description="bearer token, when the endpoint requires one")
    mode: Literal["async", "sync"] = Field("async", description="Algorithm 2 (plan while executing) or 1 (wait)")
    control_rate_hz: float | None = Field(None, gt=0, description="actions per second (default: the endpoint's)")
    deadline_ms: float | None = Field(
        None, ge=0,
        description="how long past the moment it is needed the next chunk may arrive before the robot holds and a "
                    "stall is recorded (default: 50 ms in async mode; request_timeout_s in sync mode, where waiting "
                    "for every chunk is the design)")
    request_timeout_s: float = Field(10.0, gt=0, description="per-request deadline; longer counts as a lost session")
    backoff_initial_s: float = Field(0.1, gt=0, description="first reconnect delay; doubles per failed attempt")
    backoff_max_s: float = Field(2.0, gt=0, description="longest reconnect delay")
    max_resets: int = Field(
        5, ge=0, description="consecutive session resets (errors, rejected or stale chunks) before the episode is "
                             "aborted in the safe hold; an unreachable endpoint never counts (the robot holds and "
                             "keeps reconnecting until the episode's step or time budget ends)")
    max_steps: int | None = Field(None, ge=1, description="robot steps per episode, holds included (default: the "
                                                          "robot's horizon, if it has one)")
    episode_timeout_s: float = Field(600.0, gt=0, description="wall-clock bound of one episode")
    hold_action: list[float] | None = Field(None, description="explicit safe command (default: the robot's own)")

    @model_validator(mode="after")
    def _check(self) -> RobotSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                             f"({self.backoff_initial_s})")
        for name in ("endpoint", "canary_endpoint"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.transport == "rest" and not value.startswith(("http://", "https://")):
                raise ValueError(f"the REST transport needs an http(s):// {name}, got {value!r}")
            if self.transport == "grpc" and "://" in value:
                raise ValueError(f"the gRPC transport needs host:port as {name}, got {value!r}")
        if self.canary_percent and not self.canary_endpoint:
            raise ValueError(f"canary_percent={self.canary_percent} needs a canary_endpoint to send those episodes to")
        return self

    @property
    def deadline_s(self) -> float:
        """The chunk deadline in seconds, with the mode's default applied."""
        if self.deadline_ms is not None:
            return self.deadline_ms / 1000.0
        return 0.05 if self.mode == "async" else self.request_timeout_s
