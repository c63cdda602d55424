"""The robot interface, the Meta-World robot, the client settings and the chunk checks (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from server_process import free_port

from pipelines.data.embodiments import get_adapter
from services.protocol import StepRequest, StepResponse
from services.robot_client import (
    EndpointUnavailable,
    PolicyClient,
    RobotLimits,
    RobotRuntime,
    RobotSettings,
)
from services.robot_client.metaworld import MetaWorldRobot
from services.robot_client.runtime import ChunkRejected, check_chunk


@pytest.fixture(scope="module")
def robot():
    r = MetaWorldRobot("reach-v3", variant=3, image_size=32)
    yield r
    r.close()


def test_limits_clip_and_contain():
    limits = RobotLimits((-1.0, -0.5), (1.0, 0.5))
    assert limits.dim == 2
    assert limits.contains(np.array([0.2, 0.5])) and not limits.contains(np.array([0.2, 0.6]))
    assert not limits.contains(np.array([np.nan, 0.0])) and not limits.contains(np.array([0.0]))
    np.testing.assert_array_equal(limits.clip(np.array([3.0, -2.0])), np.array([1.0, -0.5], np.float32))
    with pytest.raises(ValueError, match="low <= high"):
        RobotLimits((1.0,), (0.0,))


def test_metaworld_robot_observes_steps_and_refuses_unsafe_actions(robot):
    obs = robot.reset()
    assert obs.frames.shape == (2, 32, 32, 3) and obs.frames.dtype == np.uint8
    assert obs.state.shape == (4,) and np.isfinite(obs.state).all()
    outcome = robot.step(np.array([1.0, 0.0, 0.0, -1.0], np.float32))
    assert not outcome.done and robot.steps == 1
    moved = robot.observe().state
    assert moved[0] > obs.state[0]  # +x command moved the hand along +x
    for bad in ([np.nan, 0, 0, 0], [np.inf, 0, 0, 0], [1.5, 0, 0, 0], [0, 0, 0]):
        with pytest.raises(ValueError, match="refusing action"):
            robot.step(np.asarray(bad, np.float32))
    assert robot.steps == 1  # nothing unsafe reached the simulator
    # holding keeps the gripper command (0 would half-open a closed gripper) and does not move the hand
    hold = robot.hold_action(np.array([0.3, -0.2, 0.1, 0.8], np.float32))
    np.testing.assert_array_equal(hold, np.array([0.0, 0.0, 0.0, 0.8], np.float32))
    np.testing.assert_array_equal(robot.hold_action(None), np.array([0.0, 0.0, 0.0, -1.0], np.float32))


def test_metaworld_robot_rejects_unknown_task_and_camera():
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        MetaWorldRobot("reach-v9")
    with pytest.raises(ValueError, match="unknown camera"):
        MetaWorldRobot("reach-v3", cameras=("corner4", "nope"), image_size=32)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"transport": "rest", "endpoint": "127.0.0.1:8080"}, "http", id="rest-needs-url"),
    pytest.param({"transport": "grpc", "endpoint": "http://127.0.0.1:8081"}, "host:port", id="grpc-needs-hostport"),
    pytest.param({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s", id="backoff"),
    pytest.param({"robot_id": "bad id!"}, "robot_id", id="robot-id"),
    pytest.param({"mode": "later"}, "mode", id="mode"),
])
def test_settings_reject_mistakes(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        RobotSettings(**kwargs)


def test_settings_from_env_and_mode_deadlines(monkeypatch):
    monkeypatch.setenv("LINGBOT_ROBOT_ENDPOINT", "10.0.0.5:9000")
    monkeypatch.setenv("LINGBOT_ROBOT_MODE", "sync")
    s = RobotSettings()
    assert s.endpoint == "10.0.0.5:9000" and s.mode == "sync"
    assert s.deadline_s == s.request_timeout_s  # sync waits for every chunk by design
    assert RobotSettings(mode="async").deadline_s == pytest.approx(0.05)
    assert RobotSettings(mode="async", deadline_ms=20).deadline_s == pytest.approx(0.02)


def test_runtime_rejects_a_hold_action_outside_the_limits(robot):
    with pytest.raises(ValueError, match="hold_action"):
        RobotRuntime(robot, RobotSettings(hold_action=[0.0, 0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="hold_action"):
        RobotRuntime(robot, RobotSettings(hold_action=[0.0, 0.0]))


def _response(**overrides) -> StepResponse:
    adapter = get_adapter("metaworld-sawyer")
    state = np.tile([0.0, 0.6, 0.2, 1.0], (8, 1))
    native = np.random.default_rng(0).uniform(-1, 1, (8, 4))
    fields = {"actions": native.astype(np.float32), "targets": adapter.to_unified(native, state),
              "model_version": "dir-abc", "session_id": "r-1", "chunk_index": 2, "embodiment": "metaworld-sawyer",
              "control_rate_hz": 80.0, "cameras": ("corner4", "gripperPOV"), "image_size": 32}
    return StepResponse(**{**fields, **overrides})


def _check(resp: StepResponse) -> np.ndarray:
    return check_chunk(resp, session_id="r-1", model_version="dir-abc", chunk_index=2, action_dim=4)


def test_check_chunk_accepts_a_good_chunk():
    resp = _response()
    targets = _check(resp)
    assert targets.dtype == np.float64 and targets.shape == (8, 30)
    np.testing.assert_array_equal(targets, resp.targets)


def _nan_targets():
    resp = _response()
    resp.targets[3, 1] = np.nan
    return resp.targets


@pytest.mark.parametrize("overrides, kind", [
    pytest.param({"targets": "nan"}, "nan", id="nan-target"),
    pytest.param({"actions": np.full((8, 4), np.inf, np.float32)}, "nan", id="inf-action"),
    pytest.param({"model_version": "dir-new"}, "stale", id="other-model-version"),
    pytest.param({"chunk_index": 3}, "out_of_order", id="wrong-chunk"),
    pytest.param({"session_id": "r-2"}, "out_of_order", id="other-session"),
    pytest.param({"actions": np.zeros((8, 3), np.float32)}, "malformed", id="action-width"),
    pytest.param({"targets": np.zeros((0, 30), np.float32), "actions": np.zeros((0, 4), np.float32)}, "malformed",
                 id="empty"),
    pytest.param({"control_rate_hz": 0.0}, "malformed", id="rate"),
])
def test_check_chunk_rejects_what_must_not_run(overrides, kind):
    if isinstance(overrides.get("targets"), str):
        overrides = {"targets": _nan_targets()}
    with pytest.raises(ChunkRejected) as err:
        _check(_response(**overrides))
    assert err.value.kind == kind


@pytest.mark.parametrize("transport, endpoint", [("grpc", "127.0.0.1:{port}"), ("rest", "http://127.0.0.1:{port}")])
def test_client_reports_an_unreachable_endpoint(transport, endpoint):
    client = PolicyClient(endpoint.format(port=free_port()), transport=transport, timeout_s=5)
    try:
        with pytest.raises(EndpointUnavailable):
            client.step(StepRequest("r-1", reset=True, images=np.zeros((1, 2, 32, 32, 3), np.uint8),
                                    state=np.zeros((1, 4), np.float32)))
    finally:
        client.close()
