"""The per-episode split between a stable and a canary endpoint (``services.robot_client.routing``) and the settings
and runtime that apply it; no server needed."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from services.robot_client import RobotRuntime, RobotSettings
from services.robot_client.metaworld import MetaWorldRobot
from services.robot_client.routing import CANARY, STABLE, canary_bucket, route_for

KEYS = [f"arm-{r}-{e:04d}" for r in range(20) for e in range(500)]  # 20 robots x 500 episodes


def test_bucket_is_sha256_of_the_key():
    # pinned to its definition: robots of any build (and Python's salted hash()) must agree on every episode
    digest = hashlib.sha256(b"arm-07-ep1").digest()
    assert canary_bucket("arm-07-ep1") == int.from_bytes(digest[:8], "big") * 100.0 / 2**64
    assert all(0.0 <= canary_bucket(k) < 100.0 for k in KEYS[:1000])


@pytest.mark.parametrize("percent", [1, 10, 25, 50])
def test_share_of_canary_episodes_follows_the_percent(percent):
    share = 100.0 * sum(route_for(k, percent) == CANARY for k in KEYS) / len(KEYS)
    # 10,000 episodes: the binomial standard deviation is <= 0.5 points
    assert share == pytest.approx(percent, abs=2.0)


def test_every_robot_gets_its_share_of_canary_episodes():
    # the key is the episode, not the robot: each robot runs both versions (500 episodes each: sd ~11 episodes)
    per_robot = [sum(route_for(f"arm-{r}-{e:04d}", 50) == CANARY for e in range(500)) for r in range(20)]
    assert min(per_robot) > 200 and max(per_robot) < 300


def test_the_route_of_an_episode_is_fixed_and_moves_only_towards_the_canary():
    assert {route_for(k, 0) for k in KEYS} == {STABLE}
    assert {route_for(k, 100) for k in KEYS} == {CANARY}
    for key in KEYS[:2000]:
        assert route_for(key, 30) == route_for(key, 30)
        routes = [route_for(key, p) for p in range(0, 101, 5)]
        # ramping the canary up moves episodes stable -> canary, never back
        assert routes == sorted(routes, key=[STABLE, CANARY].index)


@pytest.mark.parametrize("percent", [-1, 100.5])
def test_percent_out_of_range_is_refused(percent):
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        route_for("arm-1-ep", percent)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"canary_percent": 10}, "needs a canary_endpoint", id="percent-without-endpoint"),
    pytest.param({"canary_endpoint": "http://10.0.0.6:8081", "canary_percent": 10}, "host:port as canary_endpoint",
                 id="grpc-canary-url"),
    pytest.param({"transport": "rest", "endpoint": "http://10.0.0.5:80", "canary_endpoint": "10.0.0.6:80"},
                 "http.*canary_endpoint", id="rest-canary-hostport"),
    pytest.param({"canary_endpoint": "10.0.0.6:8081", "canary_percent": 101}, "canary_percent", id="over-100"),
])
def test_settings_reject_canary_mistakes(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        RobotSettings(_env_file=None, **kwargs)


def test_runtime_routes_each_episode_by_its_session_id():
    settings = RobotSettings(_env_file=None, robot_id="arm-3", endpoint="10.0.0.5:8081",
                             canary_endpoint="10.0.0.6:8081", canary_percent=30)
    with MetaWorldRobot("reach-v3", 0, image_size=32) as robot, RobotRuntime(robot, settings) as runtime:
        assert runtime.client.endpoint == "10.0.0.5:8081" and runtime.canary_client.endpoint == "10.0.0.6:8081"
        routes = {e: runtime.route(f"arm-3-{e}") for e in range(200)}
        assert routes == {e: route_for(f"arm-3-{e}", 30) for e in range(200)}
        assert set(routes.values()) == {STABLE, CANARY}
        # no canary endpoint: every episode is the stable endpoint's, whatever the key
        with RobotRuntime(robot, settings.model_copy(update={"canary_endpoint": None, "canary_percent": 0})) as plain:
            assert plain.canary_client is None and {plain.route(f"arm-3-{e}") for e in range(200)} == {STABLE}
        with pytest.raises(ValueError, match="episode_id"):
            runtime.run_episode("reach-v3", episode_id="bad id")
