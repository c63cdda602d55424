"""Closed-loop Meta-World rollouts of a model directory (tiny preset, 32 px views, short horizons)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_dirs import TASK, load_policy, write_model_dir

from model import LingBotVA, get_preset
from model.policy import ChunkPolicy
from pipelines.evaluate.rollout import evaluate, run_episode, table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def policy(model_dir) -> ChunkPolicy:
    return load_policy(model_dir)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rollouts_are_deterministic_for_a_seed(policy, mode):
    a = run_episode(policy, TASK, 3, mode=mode, max_steps=24)
    b = run_episode(policy, TASK, 3, mode=mode, max_steps=24)
    c = run_episode(policy, TASK, 4, mode=mode, max_steps=24)
    assert a.error is None, a.error
    assert a.steps == 24 and a.chunks == 3 and not a.nan
    assert a.actions_digest == b.actions_digest and a.progress == b.progress
    assert c.actions_digest != a.actions_digest  # another goal position, another episode
    assert 0.0 <= a.progress <= 1.0


def test_sync_and_async_plan_differently_but_both_run(policy):
    """Async plans chunk c+1 from the imagined (FDM) outcome of chunk c, so its actions differ from sync's."""
    s = run_episode(policy, TASK, 0, mode="sync", max_steps=24)
    a = run_episode(policy, TASK, 0, mode="async", max_steps=24)
    assert s.steps == a.steps == 24
    assert s.actions_digest != a.actions_digest


def test_nan_actions_fail_the_episode_instead_of_crashing(tmp_path):
    bad = load_policy(write_model_dir(tmp_path / "bad", nan=True))
    r = run_episode(bad, TASK, 0, max_steps=24)
    assert r.nan and not r.success and r.steps == 0 and r.error is None
    report = evaluate(tmp_path / "bad", [TASK], episodes=2, workers=1, max_steps=24)
    assert report["nan_episodes"] == 2 and report["avg_success"] == 0.0


def test_evaluate_reports_per_task_numbers_and_writes_a_video(model_dir, tmp_path):
    report = evaluate(model_dir, [TASK], episodes=2, workers=1, max_steps=16, video_dir=tmp_path / "videos")
    t = report["tasks"][TASK]
    assert t["episodes"] == 2 and report["episodes"] == 2 and t["errors"] == 0, t["error_examples"]
    assert 0.0 <= report["avg_success"] <= 1.0 and t["plan_ms_p50"] > 0
    assert len(t["videos"]) == 1 and Path(t["videos"][0]).stat().st_size > 0
    json.dumps(report)  # the report is plain JSON (MLflow tags, dvc metrics)
    assert TASK in table(report)


def test_the_first_failed_episodes_are_filmed_too_and_later_ones_are_not_kept(model_dir, tmp_path):
    """An untrained model fails every 16-step episode: episode 0 is filmed, then the first 2 failures (1 and 2);
    episode 3's video is written by its worker and deleted, so the gate logs exactly three."""
    report = evaluate(model_dir, [TASK], episodes=4, workers=1, max_steps=16, video_dir=tmp_path / "v",
                      videos_per_task=1, failure_videos_per_task=2)
    t = report["tasks"][TASK]
    assert t["success_rate"] == 0.0
    assert sorted(Path(v).name for v in t["videos"]) == [f"{TASK}-{i:02d}-sync.mp4" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [f"{TASK}-{i:02d}-sync.mp4" for i in range(3)]


def test_unknown_task_and_bad_directory_fail_fast(model_dir, tmp_path):
    with pytest.raises(ValueError, match="no instruction for tasks"):
        evaluate(model_dir, ["push-v3"], episodes=1, workers=1)
    LingBotVA(get_preset("tiny")).save_pretrained(tmp_path / "old")
    with pytest.raises(ValueError, match="self-contained"):
        load_policy(tmp_path / "old")


def test_sampler_overrides_reach_the_session_and_unknown_ones_are_named(model_dir):
    ep = load_policy(model_dir, sampler={"video_cfg": 1.0, "video_steps": 2}).episode(TASK, seed=0)
    assert (ep.session.video_cfg, ep.session.video_steps, ep.session.rows) == (1.0, 2, 1)  # no CFG: one row
    assert load_policy(model_dir).episode(TASK, seed=0).session.video_cfg == get_preset("tiny").video_cfg
    with pytest.raises(ValueError, match=r"unknown sampler settings \['video_cfgg'\]"):
        load_policy(model_dir, sampler={"video_cfgg": 1.0})
