"""ReplayRobot: recorded (or synthetic) observations played back one step per action, looping; commands checked."""

from __future__ import annotations

import numpy as np
import pytest

from services.robot_client.replay import ReplayRobot, replay_observations, resize_square

CAMERAS = ("corner4", "gripperPOV")


def test_replays_its_observations_in_order_and_loops():
    frames, states, source = replay_observations(None, CAMERAS, 16, 4, steps=3, seed=1)
    assert source == "synthetic" and frames.shape == (3, 2, 16, 16, 3) and frames.dtype == np.uint8
    robot = ReplayRobot(frames, states, "metaworld-sawyer", CAMERAS)
    seen = [robot.reset()]
    for _ in range(3):
        outcome = robot.step(np.zeros(4, np.float32))
        assert not outcome.success and not outcome.done  # it runs the episode's step budget
        seen.append(robot.observe())
    for i, obs in enumerate(seen):
        np.testing.assert_array_equal(obs.frames, frames[i % 3])
        np.testing.assert_array_equal(obs.state, states[i % 3])


def test_refuses_what_a_robot_refuses():
    frames, states, _ = replay_observations("synthetic", CAMERAS, 16, 4, steps=2)
    robot = ReplayRobot(frames, states, "metaworld-sawyer", CAMERAS)
    robot.reset()
    with pytest.raises(ValueError, match="refusing action"):
        robot.step(np.array([np.nan, 0, 0, 0], np.float32))
    with pytest.raises(ValueError, match="frames must be"):
        ReplayRobot(frames[:, :1], states, "metaworld-sawyer", CAMERAS)
    with pytest.raises(ValueError, match="same non-zero length"):
        ReplayRobot(frames, states[:1], "metaworld-sawyer", CAMERAS)


def test_resize_square_keeps_the_layout():
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    out = resize_square(frames, 2)
    assert out.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(out[:, 0, 0], frames[:, 0, 0])  # nearest neighbour: top-left stays top-left


def test_reads_a_lerobot_episode_matching_cameras_by_name(tmp_path):
    from pipelines.data.episode import Episode
    from pipelines.data.lerobot.writer import write_lerobot_dataset

    rng = np.random.default_rng(0)
    n = 6
    dark, bright = np.full((n, 32, 32, 3), 30, np.uint8), np.full((n, 32, 32, 3), 220, np.uint8)
    ep = Episode(frames={"gripperPOV": bright, "corner4": dark}, actions=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                 state=rng.uniform(0, 1, (n, 4)).astype(np.float32), success=np.zeros(n, bool), task="reach-v3",
                 instruction="reach", embodiment="metaworld-sawyer", fps=80)
    root = write_lerobot_dataset(tmp_path / "eps", [ep], robot_type="sawyer")
    frames, states, source = replay_observations(root, CAMERAS, 16, 4, episode=3)  # 3 mod 1 episode: episode 0
    assert frames.shape == (n, 2, 16, 16, 3) and source.endswith("episode 0")
    np.testing.assert_allclose(states, ep.state, atol=1e-6)
    # the camera order is the model's, whatever order the dataset stores them in (mp4 is lossy: compare levels)
    assert frames[:, 0].mean() < 60 < 190 < frames[:, 1].mean()
    with pytest.raises(ValueError, match="columns"):
        replay_observations(root, CAMERAS, 16, 7)
