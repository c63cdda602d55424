"""The latent-shard loader: windows, variable chunk size, packing to a token budget, uniform sources."""

import numpy as np
import pytest
import torch

from model import LingBotVA, get_preset
from pipelines.data.loader import LatentEpisodes, PackedWindows
from pipelines.data.shards import ShardWriter, write_index
from pipelines.data.synthetic import synthetic_episodes

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    writer = ShardWriter(root, rank=0, shard_episodes=3)
    eid = 0
    for dataset, n, frames in (("small-set", 2, 9), ("large-set", 8, 13)):
        data = synthetic_episodes(n, frames=frames, latent_channels=TINY.latent_channels, text_dim=TINY.text_dim,
                                  seed=len(dataset))
        for b in range(n):
            writer.add(eid, data["video"][b], data["actions"][b], data["action_mask"][b],
                       {"dataset": dataset, "episode_index": b, "split": "val" if b == 0 else "train",
                        "task": dataset, "embodiment": "synthetic"})
            eid += 1
    entries = writer.close()
    text = {"small-set": torch.randn(4, TINY.text_dim), "large-set": torch.randn(4, TINY.text_dim)}
    write_index(root, entries, text, stats={}, instructions={"small-set": "a", "large-set": "b"})
    return root


def test_episode_windows_match_the_shards(latents_dir):
    data = LatentEpisodes(latents_dir, "all")
    full = data.load(3)
    win = data.load(3, start=4, frames=5)
    assert torch.equal(win["video"], full["video"][4:9])
    assert torch.equal(win["actions"], full["actions"][16:32])
    assert win["actions"].shape == ((5 - 1) * 4, 30)


def test_batches_are_model_batches_and_respect_the_budget(latents_dir):
    loader = PackedWindows(latents_dir, "train", token_budget=400, rows=2, seed=0)
    model = LingBotVA(TINY)
    sizes = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = loader.sample(rng)
        sizes.add(batch["chunk_size"])
        for row in batch["row"].unique():
            frames = batch["num_frames"][batch["row"] == row]
            assert sum(loader.window_tokens(int(f)) for f in frames) <= 400
        assert ((batch["num_frames"] - 1) % batch["chunk_size"] == 0).all()
    assert sizes == {1, 2, 3, 4}
    losses = model.compute_loss(batch)
    assert torch.isfinite(losses["loss"])


def test_packs_several_episodes_per_row(latents_dir):
    loader = PackedWindows(latents_dir, "train", token_budget=2000, rows=1, chunk_sizes=(1,), chunks_per_window=2)
    batch = loader.sample(np.random.default_rng(1))
    assert len(batch["row"]) > 1 and (batch["row"] == 0).all()


def test_sources_are_sampled_uniformly(latents_dir):
    loader = PackedWindows(latents_dir, "train", token_budget=10_000, rows=1, chunk_sizes=(1,), chunks_per_window=1)
    rng = np.random.default_rng(2)
    small = sum(loader.data.episodes[loader._window(rng, 1, 10_000)[0]]["dataset"] == "small-set" for _ in range(2000))
    assert 0.45 < small / 2000 < 0.55  # 1 of 8 train episodes, but half of the draws


def test_bad_arguments(latents_dir, tmp_path):
    with pytest.raises(ValueError, match=r"index\.json not found"):
        LatentEpisodes(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        LatentEpisodes(latents_dir, "test")
    with pytest.raises(ValueError, match="too small"):
        PackedWindows(latents_dir, token_budget=10).sample(np.random.default_rng(0))


def test_max_per_task_keeps_the_first_demos_of_each_task(latents_dir):
    """Low-data runs (e.g. 10 demos per task) train on a fixed, deterministic subset."""
    data = LatentEpisodes(latents_dir, "train", max_per_task=3)
    by_task = {}
    for e in data.episodes:
        by_task.setdefault(e["task"], []).append(e["episode_index"])
    assert by_task == {"small-set": [1], "large-set": [1, 2, 3]}
    with pytest.raises(ValueError, match="max_per_task"):
        LatentEpisodes(latents_dir, "train", max_per_task=0)


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_episode_start_windows(latents_dir, prob):
    """Rollouts always start from an episode's first frame: a share ``episode_start_prob`` of windows start there."""
    loader = PackedWindows(latents_dir, "train", token_budget=10_000, rows=1, chunk_sizes=(1,), chunks_per_window=2,
                           episode_start_prob=prob)
    rng = np.random.default_rng(3)
    starts = np.array([loader._window(rng, 1, 10_000)[1] for _ in range(2000)])
    # uniform starts alone hit frame 0 in 1 of 7 (small-set, 9 frames) or 11 (large-set, 13 frames) windows
    uniform = 0.5 / 7 + 0.5 / 11
    assert abs((starts == 0).mean() - (prob + (1 - prob) * uniform)) < 0.03
    with pytest.raises(ValueError, match="episode_start_prob"):
        PackedWindows(latents_dir, episode_start_prob=1.5)
