"""Edge runtime of a robot served by a LingBot-VA policy endpoint (KServe V2, gRPC or REST).

    robot = MetaWorldRobot("reach-v3", variant=0)
    with RobotRuntime(robot, RobotSettings(endpoint="127.0.0.1:8081")) as runtime:
        stats = runtime.run_episode("reach-v3")
"""

from services.robot_client.client import (
    Cancelled,
    EndpointUnavailable,
    PolicyClient,
    PolicyError,
    RequestRejected,
    SessionLost,
    VersionUnavailable,
)
from services.robot_client.robot import Observation, Robot, RobotLimits, StepOutcome
from services.robot_client.runtime import EpisodeStats, RobotRuntime
from services.robot_client.settings import RobotSettings

__all__ = [
    "Cancelled",
    "EndpointUnavailable",
    "EpisodeStats",
    "Observation",
    "PolicyClient",
    "PolicyError",
    "RequestRejected",
    "Robot",
    "RobotLimits",
    "RobotRuntime",
    "RobotSettings",
    "SessionLost",
    "StepOutcome",
    "VersionUnavailable",
]
