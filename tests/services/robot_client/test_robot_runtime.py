"""The edge runtime against the real policy server on 127.0.0.1 (subprocess, free ports, tiny model directory):
episodes over gRPC and REST, late chunks and holds, a server that goes away mid-episode and comes back, a model
that produces NaN, and a robot that does not match the served model."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from server_process import MODEL_DIRS, ServerProcess

from services.robot_client import RobotRuntime, RobotSettings
from services.robot_client.metaworld import MetaWorldRobot

sys.path.insert(0, str(MODEL_DIRS))
from model_dirs import TASK, write_model_dir

IMAGE_SIZE = 32  # the tiny model directory's frames (latent 2x4 through the 16x VAE, two views)
CHUNK = 8  # its chunk: K=2 latent frames x tau=4 actions


class RecordingRobot(MetaWorldRobot):
    """The Meta-World robot, remembering every action that reached the simulator (after ``Robot.step``'s checks)."""

    def __init__(self, variant: int = 0, **kwargs):
        super().__init__(TASK, variant, image_size=IMAGE_SIZE, **kwargs)
        self.executed: list[np.ndarray] = []

    def _step(self, action):
        self.executed.append(action.copy())
        return super()._step(action)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("robot-client") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "server.log") as srv:
        yield srv


def settings(server: ServerProcess, **kwargs) -> RobotSettings:
    base = {"endpoint": server.grpc_endpoint, "request_timeout_s": 20.0, "episode_timeout_s": 120.0}
    return RobotSettings(**{**base, **kwargs})


def assert_safe(robot: RecordingRobot) -> None:
    executed = np.asarray(robot.executed).reshape(-1, 4)
    assert np.isfinite(executed).all()
    assert (executed >= -1.0).all() and (executed <= 1.0).all()


def hold_indices(robot: RecordingRobot) -> list[int]:
    """Steps that executed a hold (no motion); the random tiny model never commands exactly zero motion."""
    return [i for i, a in enumerate(robot.executed) if not np.any(a[:3])]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_async_episode_over_grpc_end_to_end(server):
    with RecordingRobot(variant=0) as robot, RobotRuntime(robot, settings(server, control_rate_hz=40,
                                                                          max_steps=48)) as runtime:
        stats = runtime.run_episode(TASK)
    assert stats.error is None, stats.error
    assert stats.ended in ("max_steps", "success")
    assert stats.steps == len(robot.executed) == stats.policy_steps + stats.holds
    assert stats.steps == 48 or stats.success
    assert stats.chunks >= stats.policy_steps / CHUNK
    assert len(stats.latency_ms) >= stats.chunks and min(stats.latency_ms) > 0
    assert stats.model_version.startswith("dir-") and stats.control_rate_hz == 40
    assert stats.resets == stats.rejected_chunks == stats.stale_chunks == stats.reconnects == 0
    assert stats.on_time_pct is not None
    assert_safe(robot)
    # the untrained model asks for far-away targets: the commands are clipped into the limits and counted
    holds = set(hold_indices(robot))
    at_limit = [np.isclose(np.abs(a), 1.0).any() for i, a in enumerate(robot.executed) if i not in holds]
    assert stats.saturated_actions == sum(at_limit) > 0
    report = json.loads(json.dumps(stats.to_dict()))
    assert report["latency_ms_p50"] <= report["latency_ms_p99"]


def test_sync_episode_over_rest(server):
    rest = settings(server, transport="rest", endpoint=server.rest_endpoint, mode="sync", control_rate_hz=40,
                    max_steps=3 * CHUNK)
    with RecordingRobot(variant=1) as robot, RobotRuntime(robot, rest) as runtime:
        stats = runtime.run_episode(TASK)
    assert stats.error is None, stats.error
    assert stats.policy_steps == 3 * CHUNK or stats.success
    assert stats.chunks == 3  # a request per chunk: reset, then each finished one (the last may be cut short)
    assert 3 <= len(stats.latency_ms) <= 4
    # sync waits for every chunk (deadline = request timeout): on time, nothing held
    assert stats.on_time_pct == 100.0 and stats.holds == stats.stalls == 0
    assert_safe(robot)


def test_late_chunks_make_the_robot_hold(server):
    # sync with no grace: every chunk after the first is needed before it can possibly arrive
    late = settings(server, mode="sync", deadline_ms=0, control_rate_hz=20, max_steps=40)
    with RecordingRobot(variant=2) as robot, RobotRuntime(robot, late) as runtime:
        stats = runtime.run_episode(TASK)
    assert stats.error is None, stats.error
    assert stats.on_time_chunks == 0 and stats.late_chunks == stats.chunks - 1 >= 3
    assert stats.on_time_pct == 0.0
    # one stall per late chunk, plus one if the episode's step budget ran out while holding for the next
    assert stats.late_chunks <= stats.stalls <= stats.late_chunks + 1 and stats.stall_s > 0
    holds = hold_indices(robot)
    assert len(holds) == stats.holds >= 1 and stats.policy_steps + stats.holds == stats.steps
    for i in holds:  # the hold keeps the previous gripper command; the first chunk is awaited, never held for
        assert i > 0 and robot.executed[i][3] == robot.executed[i - 1][3]
    assert_safe(robot)


def test_robot_holds_while_the_server_is_down_and_recovers(server):
    robot = RecordingRobot(variant=4)
    cfg = settings(server, control_rate_hz=5, deadline_ms=100, backoff_initial_s=0.1, backoff_max_s=0.5,
                   request_timeout_s=10.0, episode_timeout_s=240.0)
    runtime = RobotRuntime(robot, cfg)
    result = []
    runner = threading.Thread(target=lambda: result.append(runtime.run_episode(TASK)))
    runner.start()
    try:
        wait_for(lambda: runtime.stats is not None and runtime.stats.policy_steps >= 2 * CHUNK, 60, "two chunks")
        chunks_before = runtime.stats.chunks
        server.kill()  # a crash: no goodbye to the robot
        wait_for(lambda: runtime.stats.holds >= 3 and runtime.stats.reconnects >= 1, 30, "holds while down")
        executed_while_down = len(robot.executed)
        server.start()  # back on the same ports, without the robot's session
        wait_for(lambda: runtime.stats.resets >= 1 and runtime.stats.chunks >= chunks_before + 2, 90,
                 "the session to restart on the new server")
    finally:
        runtime.stop()
        runner.join(60)
        runtime.close()
        robot.close()
        if server.proc is None:  # the module's other tests need it back
            server.start()
    (stats,) = result
    assert stats.error is None, stats.error
    assert stats.ended == "stopped"
    assert stats.stalls >= 1 and stats.late_chunks >= 1 and stats.stall_s > 0
    assert stats.holds >= 3 and len(hold_indices(robot)) == stats.holds
    assert stats.reconnects >= 1 and stats.resets >= 1
    assert any("Unavailable" in e for e in stats.recovered_errors)
    assert any("unknown session" in e for e in stats.recovered_errors)  # the new server never saw this session
    assert len(robot.executed) > executed_while_down  # it moved again under the new session
    assert_safe(robot)


def test_nan_chunks_are_never_executed(tmp_path):
    # this server also wants a bearer token: the robot's must reach it for the NaN answer to come back
    nan_dir = write_model_dir(tmp_path / "nan-model", nan=True)
    with ServerProcess(nan_dir, tmp_path / "server.log", env={"LINGBOT_SERVE_TOKEN": "s3cret"}) as srv:
        with RecordingRobot(variant=5) as robot:
            cfg = settings(srv, token="s3cret", max_resets=2, backoff_initial_s=0.05, backoff_max_s=0.2, max_steps=40)
            with RobotRuntime(robot, cfg) as runtime:
                stats = runtime.run_episode(TASK)
        assert stats.ended == "aborted"
        assert "gave up after 2 session resets" in stats.error and "non-finite" in stats.error
        assert stats.chunks == stats.policy_steps == 0
        assert_safe(robot)
        with MetaWorldRobot(TASK, 0, image_size=IMAGE_SIZE) as robot, \
                RobotRuntime(robot, settings(srv, token="wrong", max_resets=0)) as runtime:
            denied = runtime.run_episode(TASK)
        assert denied.ended == "aborted" and "UNAUTHENTICATED" in denied.error and denied.steps == 0


def test_a_robot_the_model_does_not_fit_is_stopped_with_a_clear_error(server):
    with MetaWorldRobot(TASK, 0, image_size=48) as robot, RobotRuntime(robot, settings(server, max_resets=0)) as rt:
        stats = rt.run_episode(TASK)
    assert stats.ended == "aborted" and stats.steps == 0
    assert "images have frames of shape (2, 48, 48, 3)" in stats.error
