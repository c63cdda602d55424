"""Meta-World scripted-expert collection: episode contents, determinism, parallel collection and task resolution."""

from __future__ import annotations

import os

os.environ["MUJOCO_GL"] = "osmesa"  # headless rendering; must be set before mujoco / metaworld are imported

import numpy as np
import pytest

from pipelines.data.embodiments import get_adapter
from pipelines.data.episode import Episode
from pipelines.data.metaworld_collect import (
    CONTROL_RATE_HZ,
    DEFAULT_CAMERAS,
    INSTRUCTIONS,
    MT10,
    MT50,
    collect,
    collect_task,
    resolve_tasks,
    task_seed,
)

SIZE = 64


@pytest.fixture(scope="module")
def reach_episodes() -> tuple[list[Episode], int]:
    return collect_task("reach-v3", 2, seed=0, image_size=SIZE)


def test_reach_episode_contents(reach_episodes):
    episodes, discarded = reach_episodes
    assert len(episodes) == 2 and discarded == 0
    for i, ep in enumerate(episodes):
        T = ep.length
        assert 10 < T <= 500
        assert set(ep.frames) == set(DEFAULT_CAMERAS) and len(DEFAULT_CAMERAS) == 2
        for cam, frames in ep.frames.items():
            assert frames.shape == (T, SIZE, SIZE, 3) and frames.dtype == np.uint8
            assert frames.std() > 10, f"camera {cam} looks blank"
        assert ep.actions.shape == (T, 4) and ep.actions.dtype == np.float32
        assert np.abs(ep.actions).max() <= 1.0
        assert ep.state.shape == (T, 4) and ep.state.dtype == np.float32
        assert ep.success.dtype == bool and ep.success[-1] and not ep.success[0]
        assert ep.task == "reach-v3" and ep.instruction.strip() and ep.embodiment == "metaworld-sawyer"
        assert ep.fps == CONTROL_RATE_HZ == 80 and ep.seed == 0
        assert ep.extra["variant"] == i
    # two variants have different goals, so different trajectories
    assert not np.array_equal(episodes[0].actions[:10], episodes[1].actions[:10])


def test_frames_change_with_the_motion(reach_episodes):
    ep = reach_episodes[0][0]
    for cam, frames in ep.frames.items():
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1, f"camera {cam} does not move"


def test_corner_camera_is_rotated_upright(reach_episodes):
    # the fixed corner views are mounted upside down in the Sawyer XML; the wrist view looks straight down
    assert reach_episodes[0][0].extra["rotated_180"] == ["corner4_zoom"]  # a crop of corner4


def test_deterministic_for_a_seed(reach_episodes):
    again, _ = collect_task("reach-v3", 2, seed=0, image_size=SIZE)
    for a, b in zip(reach_episodes[0], again, strict=True):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.success, b.success)
        for cam in a.frames:
            np.testing.assert_array_equal(a.frames[cam], b.frames[cam])


def test_adapter_round_trips_collected_actions(reach_episodes):
    adapter = get_adapter("metaworld-sawyer")
    for ep in reach_episodes[0]:
        unified = adapter.to_unified(ep.actions, ep.state)
        # absolute targets stay near the hand: one step moves at most 1 cm per axis
        assert np.abs(unified[:, :3] - ep.state[:, :3]).max() <= 0.01 + 1e-6
        back = adapter.to_native(unified, ep.state)
        unclipped = np.abs(ep.actions) < 1.0
        np.testing.assert_allclose(back[unclipped], ep.actions[unclipped], atol=1e-5, rtol=0)


def test_parallel_collect_two_tasks():
    tasks = ["reach-v3", "button-press-topdown-v3"]
    results = collect(tasks, 1, image_size=SIZE, workers=2, progress=False)
    assert list(results) == tasks
    for task, (episodes, discarded) in results.items():
        assert len(episodes) == 1 and discarded == 0
        ep = episodes[0]
        assert ep.task == task and ep.success.any() and ep.seed == task_seed(0, task)
        assert ep.frames[DEFAULT_CAMERAS[0]].shape[1:] == (SIZE, SIZE, 3)
    # same episodes as an in-process run with the derived seed: independent of worker count and scheduling
    (alone,), _ = collect_task("reach-v3", 1, seed=task_seed(0, "reach-v3"), image_size=SIZE)
    np.testing.assert_array_equal(alone.actions, results["reach-v3"][0][0].actions)
    np.testing.assert_array_equal(alone.frames[DEFAULT_CAMERAS[0]], results["reach-v3"][0][0].frames[DEFAULT_CAMERAS[0]])


def test_failed_attempts_are_discarded():
    # 5 steps are too few to reach the goal: every attempt fails and is counted
    episodes, discarded = collect_task("reach-v3", 1, image_size=16, max_steps=5, max_attempts_factor=2)
    assert episodes == [] and discarded == 2


def test_task_seed_depends_only_on_seed_and_name():
    assert task_seed(0, "reach-v3") == task_seed(0, "reach-v3")
    assert task_seed(0, "reach-v3") != task_seed(1, "reach-v3") != task_seed(0, "push-v3")


def test_task_lists_and_instructions():
    assert len(MT10) == 10 and len(MT50) == 50 and set(MT10) <= set(MT50)
    assert set(INSTRUCTIONS) == set(MT50)
    assert all(s.strip() for s in INSTRUCTIONS.values())
    assert resolve_tasks("MT10") == list(MT10)
    assert resolve_tasks("mt50") == list(MT50)
    assert resolve_tasks(" reach-v3, push-v3,reach-v3 ") == ["reach-v3", "push-v3"]


def test_unknown_tasks_raise():
    with pytest.raises(ValueError, match=r"'reach-v9' \(did you mean 'reach-v3'\?\)"):
        resolve_tasks("reach-v9,push-v3")
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        collect_task("not-a-task", 1)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        collect(["reach-v3", "nope-v3"], 1, progress=False)
    with pytest.raises(ValueError, match="no Meta-World task"):
        resolve_tasks(" , ")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown camera"):
        collect_task("reach-v3", 1, image_size=SIZE, cameras=("corner2", "nope"))
    with pytest.raises(ValueError, match="episodes"):
        collect_task("reach-v3", -1)
    with pytest.raises(ValueError, match="image_size"):
        collect_task("reach-v3", 1, image_size=0)
