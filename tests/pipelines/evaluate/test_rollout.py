"""Closed-loop Meta-World rollouts of a model directory (tiny preset, 32 px views, short horizons)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import LingBotVA, get_preset
from model.encoders import VideoVAE
from model.normalization import ActionNormalizer
from pipelines.data.embodiments import get_adapter
from pipelines.evaluate.policy import ChunkPolicy
from pipelines.evaluate.rollout import evaluate, run_episode, table

TASK = "reach-v3"


def write_model_dir(path: Path, *, nan: bool = False, seed: int = 0) -> Path:
    """A self-contained tiny model directory like training writes (VAE, instruction embeddings, stats)."""
    config = get_preset("tiny", chunk_size=2)
    torch.manual_seed(seed)
    model = LingBotVA(config)
    if nan:
        with torch.no_grad():
            for p in model.action_out.parameters():
                p.fill_(float("nan"))
    adapter = get_adapter("metaworld-sawyer")
    rng = np.random.default_rng(0)
    state = np.column_stack([rng.uniform(-0.3, 0.3, 500), rng.uniform(0.4, 0.8, 500), rng.uniform(0.05, 0.3, 500),
                             rng.uniform(0, 1, 500)])
    unified = adapter.to_unified(rng.uniform(-1, 1, (500, 4)), state)
    norm = ActionNormalizer.fit(unified)

    def files(tmp: Path) -> None:
        VideoVAE.small(latent_channels=config.latent_channels, base_dim=8, num_res_blocks=1, seed=0).save_pretrained(
            tmp / "vae")
        save_file({TASK: torch.randn(4, config.text_dim, generator=torch.Generator().manual_seed(1))},
                  str(tmp / "text_embeddings.safetensors"))

    space = {"embodiments": ["metaworld-sawyer"], "tasks": [TASK], "tau": config.tau,
             "observation": {"cameras": ["corner4", "gripperPOV"], "latent_hw": [2, 4]}}
    return model.save_pretrained(path, normalization={"action": norm.to_dict()}, action_space=space,
                                 write_files=files)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def policy(model_dir) -> ChunkPolicy:
    return ChunkPolicy(model_dir)


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
    bad = ChunkPolicy(write_model_dir(tmp_path / "bad", nan=True))
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


def test_unknown_task_and_bad_directory_fail_fast(model_dir, tmp_path):
    with pytest.raises(ValueError, match="no instruction for tasks"):
        evaluate(model_dir, ["push-v3"], episodes=1, workers=1)
    LingBotVA(get_preset("tiny")).save_pretrained(tmp_path / "old")
    with pytest.raises(ValueError, match="self-contained"):
        ChunkPolicy(tmp_path / "old")
