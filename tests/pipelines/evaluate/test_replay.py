"""The blind-replay baseline: demo 0's end-effector targets, open loop, through the same rollout as the world model."""

from functools import partial

import numpy as np
import pytest

from pipelines.data.lerobot.writer import write_lerobot_dataset
from pipelines.data.metaworld_collect import LOSSLESS_CODEC, collect_task, dataset_name
from pipelines.evaluate.replay import ReplayPolicy
from pipelines.evaluate.rollout import evaluate

SEED = 5


@pytest.fixture(scope="module")
def episodes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    eps, _ = collect_task("reach-v3", 1, seed=SEED, image_size=32)
    write_lerobot_dataset(root / dataset_name("reach-v3"), eps, robot_type="sawyer", fps=80, video_codec=LOSSLESS_CODEC,
                          crf=0)
    return root


def test_replaying_a_demo_on_its_own_variant_succeeds(episodes_dir):
    """Variant 0 of the demos' seed is the demo's own scene: open-loop replay of its targets must succeed there, which
    checks the target -> native action mapping and the chunking of the replay."""
    report = evaluate(partial(ReplayPolicy, episodes_dir), ["reach-v3"], episodes=1, eval_seed=SEED, workers=1,
                      max_steps=150, videos_per_task=0)
    assert report["tasks"]["reach-v3"]["success_rate"] == 1.0


def test_replay_runs_held_out_variants_without_errors(episodes_dir):
    report = evaluate(partial(ReplayPolicy, episodes_dir), ["reach-v3"], episodes=2, eval_seed=1, workers=1,
                      max_steps=40, videos_per_task=0)
    task = report["tasks"]["reach-v3"]
    assert task["episodes"] == 2 and task["errors"] == 0 and task["nan_episodes"] == 0


def test_replay_holds_the_last_target_past_the_demo(episodes_dir):
    policy = ReplayPolicy(episodes_dir, steps_per_chunk=16)
    targets = policy.targets("reach-v3")
    ep = policy.episode("reach-v3", seed=0)
    plans = [ep.plan() for _ in range(len(targets) // 16 + 2)]
    assert np.array_equal(plans[0].actions, targets[:16])
    assert np.array_equal(plans[-1].actions, np.repeat(targets[-1:], 16, 0))
    assert policy.image_size == 32 and policy.tasks == ["reach-v3"]


def test_unknown_task_is_named(episodes_dir):
    with pytest.raises(ValueError, match="no demonstrations of 'push-v3'"):
        ReplayPolicy(episodes_dir).targets("push-v3")
