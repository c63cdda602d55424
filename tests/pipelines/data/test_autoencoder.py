"""`lingbot data train-vae`: the embedded default's VAE learns the collected scenes, is saved whole, and is tracked."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from model.encoders import TextEncoder, VideoVAE
from pipelines.data.autoencoder import AutoencoderConfig, FramePool, evaluate, train_autoencoder
from pipelines.data.episode import Episode
from pipelines.data.features import FeatureRepo
from pipelines.data.lerobot.writer import write_lerobot_dataset
from pipelines.data.prepare import prepare

SIZE = 32


def scene_episode(rng: np.random.Generator, length: int) -> Episode:
    """A grey table, a red goal dot at an episode-specific place and a blue 'arm' square moving towards it."""
    frames = {}
    goal = rng.integers(4, SIZE - 8, 2)
    start = rng.integers(4, SIZE - 8, 2)
    for cam in ("corner4", "gripperPOV"):
        f = np.full((length, SIZE, SIZE, 3), 110, np.uint8)
        for t in range(length):
            y, x = (start + (goal - start) * t / max(1, length - 1)).astype(int)
            f[t, goal[0] : goal[0] + 3, goal[1] : goal[1] + 3] = (220, 30, 30)
            f[t, y : y + 5, x : x + 5] = (30, 30, 220)
        frames[cam] = f
    state = np.zeros((length, 4), np.float32)
    return Episode(frames=frames, actions=np.zeros((length, 4), np.float32), state=state,
                   success=np.arange(length) == length - 1, task="reach", instruction="reach", embodiment="metaworld-sawyer",
                   fps=80, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    rng = np.random.default_rng(0)
    write_lerobot_dataset(root / "episodes" / "sim-reach", [scene_episode(rng, 17) for _ in range(8)],
                          robot_type="sawyer", fps=80, video_codec="libx264rgb", crf=0)
    prepare(root / "episodes", root / "prepared", text_encoder=TextEncoder.small(width=32, heads=4),
            feature_repo=FeatureRepo(data_dir=root / "feast"), val_fraction=0.25, seed=0)
    return root


def test_training_improves_reconstruction_and_saves_a_loadable_vae(data):
    cfg = AutoencoderConfig(latent_channels=16, dims=(8, 16, 16), steps=60, batch=4, clip_groups=1, lr=3e-3, val_clips=8)
    pool = FramePool(data / "episodes", data / "prepared", "val")
    clips = pool.clips(np.random.default_rng(12345), 8, 5)
    before, _ = evaluate(VideoVAE.frame(latent_channels=16, dims=(8, 16, 16), seed=0), clips)
    summary = train_autoencoder(data / "episodes", data / "prepared", data / "vae", cfg, data_dir=data, progress=False)
    assert summary["val_psnr_db"] > before + 5, (before, summary["val_psnr_db"])
    vae = VideoVAE.from_pretrained(data / "vae")
    assert vae.latent_channels == 16 and (vae.temporal_compression, vae.spatial_compression) == (4, 16)
    assert json.loads((data / "vae" / "metrics.json").read_text())["val_psnr_db"] == summary["val_psnr_db"]
    assert not (data / "vae.tmp").exists()
    # tracked: PSNR curve, the final number and a real-vs-reconstructed strip
    mlflow.set_tracking_uri(f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["lingbot-vae"], output_format="list")[0]
    assert run.data.metrics["final_val_psnr_db"] == pytest.approx(summary["val_psnr_db"])
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"reconstruction_strip.png", "vae"} <= names


def test_the_static_scene_is_the_median_first_frame(data):
    pool = FramePool(data / "episodes", data / "prepared", "train")
    assert pool.background.shape == (2, SIZE, SIZE, 3)
    assert (pool.background == 110).mean() > 0.9  # goal and arm move between episodes: the table remains


def test_bad_settings_are_refused(data):
    with pytest.raises(ValueError, match="3 stage widths"):
        AutoencoderConfig(dims=(8, 12, 16))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        AutoencoderConfig(steps=0)
    with pytest.raises(ValueError, match="no train episodes"):
        FramePool(data / "episodes", data / "nowhere", "train")


def test_decoded_strip_shows_real_above_reconstruction(data):
    pool = FramePool(data / "episodes", data / "prepared", "train")
    clips = pool.clips(np.random.default_rng(0), 4, 5)
    _, strip = evaluate(VideoVAE.frame(latent_channels=16, dims=(8, 16, 16)), clips)
    assert strip.shape == (2 * SIZE, 4 * 2 * SIZE, 3) and strip.dtype == np.uint8
    assert np.array_equal(strip[:SIZE, : 2 * SIZE], np.concatenate(list(clips[0, -1]), axis=1))
    assert torch.is_tensor(torch.from_numpy(strip))
