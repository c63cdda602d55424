"""prepare -> encode -> loader on small LeRobot datasets, including torchrun with 2 ranks and bad-data quarantine."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from model import LingBotVA, get_preset
from model.encoders import TextEncoder
from model.normalization import ActionNormalizer
from pipelines.data.episode import Episode
from pipelines.data.features import FeatureRepo, read_features
from pipelines.data.lerobot.reader import LeRobotDataset
from pipelines.data.lerobot.writer import write_lerobot_dataset
from pipelines.data.loader import PackedWindows
from pipelines.data.prepare import prepare, split_episodes

TINY = get_preset("tiny")
REPO = Path(__file__).resolve().parents[3]


def fake_episode(rng, task, length):
    state = np.concatenate([rng.uniform(-0.2, 0.2, (length, 3)), rng.uniform(0, 1, (length, 1))], 1).astype(np.float32)
    frames = {cam: rng.integers(0, 255, (length, 32, 32, 3), dtype=np.uint8) for cam in ("corner4", "gripperPOV")}
    return Episode(frames=frames, actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32), state=state,
                   success=np.arange(length) > length - 3, task=task, instruction=f"do {task}",
                   embodiment="metaworld-sawyer", fps=80, seed=0)


def write_datasets(root: Path, n: int = 5, episodes_per_file: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for task in ("task-a", "task-b"):
        eps = [fake_episode(rng, task, 21 + 4 * i) for i in range(n)]
        write_lerobot_dataset(root / f"sim-{task}", eps, robot_type="sawyer", fps=80, episodes_per_file=episodes_per_file)
    return root


def run_prepare(data: Path, **kw):
    return prepare(data / "episodes", data / "prepared", text_encoder=TextEncoder.small(width=TINY.text_dim, heads=4),
                   feature_repo=FeatureRepo(data_dir=data / "feast"), **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_datasets(root / "episodes")
    run_prepare(root)
    return root


def test_split_is_seeded_and_disjoint():
    train, val = split_episodes(list(range(20)), 0.1, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert (train, val) == split_episodes(list(range(20)), 0.1, seed=3)
    assert split_episodes(list(range(20)), 0.1, seed=4) != (train, val)


def test_prepare_fits_stats_on_train_only_and_publishes_features(data):
    stats = json.loads((data / "prepared" / "stats.json").read_text())["metaworld-sawyer"]
    norm = ActionNormalizer.from_dict(stats["action"])
    feats = read_features("metaworld-sawyer", "task-a", repo=FeatureRepo(data_dir=data / "feast"))
    assert np.allclose(feats["norm_stats"]["action_q01"], norm.q01)
    assert feats["task"]["instruction"] == "do task-a"
    assert feats["task"]["instruction_embedding"].shape == (32, TINY.text_dim)
    # quantiles come from the train split only
    from pipelines.data.embodiments import get_adapter

    adapter, train_actions = get_adapter("metaworld-sawyer"), []
    for name in ("sim-task-a", "sim-task-b"):
        split = json.loads((data / "prepared" / name / "split.json").read_text())
        ds = LeRobotDataset(data / "episodes" / name)
        for i in split["train"]:
            t = ds.frame_table(i).to_pandas()
            train_actions.append(adapter.to_unified(np.stack(t["action"]).astype(np.float32),
                                                    np.stack(t["observation.state"]).astype(np.float32)))
    assert np.allclose(norm.q99, np.quantile(np.concatenate(train_actions), 0.99, axis=0), atol=1e-5)


def _encode_cmd(data: Path, out: Path, nproc: int) -> list[str]:
    args = ["-m", "pipelines.cli", "data", "encode", "--episodes-dir", str(data / "episodes"), "--prepared-dir",
            str(data / "prepared"), "--feast-dir", str(data / "feast"), "--out", str(out), "--preset", "tiny",
            "--shard-episodes", "2"]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


@pytest.fixture(scope="module")
def encoded(data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        subprocess.run(_encode_cmd(data, data / f"latents{n}", n), check=True, cwd=REPO, env=env, capture_output=True,
                       timeout=300)
    return data


def test_two_ranks_split_episodes_without_duplicates_or_gaps(encoded):
    one = json.loads((encoded / "latents1" / "index.json").read_text())
    two = json.loads((encoded / "latents2" / "index.json").read_text())
    assert two["world_size"] == 2
    ids = [e["id"] for e in two["episodes"]]
    assert ids == list(range(10)) == [e["id"] for e in one["episodes"]]
    assert {e["shard"][:4] for e in two["episodes"]} == {"r000", "r001"}  # both ranks wrote shards
    for a, b in zip(one["episodes"], two["episodes"], strict=True):
        with safe_open(str(encoded / "latents1" / "shards" / a["shard"]), "pt") as fa, \
             safe_open(str(encoded / "latents2" / "shards" / b["shard"]), "pt") as fb:
            for key in ("video", "actions", "action_mask"):
                assert torch.equal(fa.get_tensor(f"e{a['id']}.{key}"), fb.get_tensor(f"e{b['id']}.{key}"))
    assert not list((encoded / "latents2").glob("index-r*.json"))  # parts merged away


def test_encoded_latents_train_the_model(encoded):
    index = json.loads((encoded / "latents1" / "index.json").read_text())
    ep = index["episodes"][0]
    assert ep["latent_channels"] == TINY.latent_channels and ep["latent_hw"] == [2, 4]
    loader = PackedWindows(encoded / "latents1", token_budget=600, seed=0)
    batch = loader.sample(np.random.default_rng(0))
    assert batch["actions"].abs().max() <= 1.5  # normalised and clipped
    assert torch.isfinite(LingBotVA(TINY).compute_loss(batch)["loss"])


def test_latents_are_standardised_per_channel_on_the_training_split(encoded):
    """The random VAE's raw latents are far from unit scale; the encode step fits per-channel statistics on the
    training split, applies them, and stores them with the VAE copy every model directory gets."""
    from model.encoders import VideoVAE
    from pipelines.data.loader import LatentEpisodes

    latents = encoded / "latents1"
    vae = VideoVAE.from_pretrained(latents / "vae")
    std = vae.latents_std.flatten()
    assert not torch.allclose(std, torch.ones_like(std))  # fitted, not the identity of the random VAE's config
    train = LatentEpisodes(latents, "train")
    z = torch.cat([train.load(i)["video"] for i in range(len(train))])  # (F, C, h, w), every train episode
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(TINY.latent_channels), atol=1e-3)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(TINY.latent_channels), atol=1e-2)
    # rank 1 fitted the same numbers: its shards decode with the one saved VAE
    assert torch.equal(VideoVAE.from_pretrained(encoded / "latents2" / "vae").latents_std, vae.latents_std)


def _corrupt(kind: str, ds_root: Path, index: int) -> str:
    ds = LeRobotDataset(ds_root)
    if kind == "truncated-mp4":
        f = ds.video_file(index, ds.video_keys[0])
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "missing-column":
        t = pd.read_parquet(ds.data_file(index))
        t.drop(columns=["action"]).to_parquet(ds.data_file(index))
    elif kind == "nan-actions":
        t = pd.read_parquet(ds.data_file(index))
        t["action"] = [np.full(4, np.nan, np.float32)] * len(t)
        t.to_parquet(ds.data_file(index))
    return kind


@pytest.mark.parametrize("kind", ["truncated-mp4", "missing-column", "nan-actions", "too-short"])
def test_bad_episodes_are_quarantined_and_the_rest_proceeds(tmp_path, kind):
    # one episode per file, so corrupting episode 1's files leaves the others intact
    write_datasets(tmp_path / "episodes", n=3, episodes_per_file=1)
    ds_root = tmp_path / "episodes" / "sim-task-a"
    if kind != "too-short":
        _corrupt(kind, ds_root, 1)
    # too-short: 21-frame episodes have 6 latent frames; demand 7 of episode 0 only by writing a shorter one
    else:
        shutil.rmtree(ds_root)
        rng = np.random.default_rng(1)
        write_lerobot_dataset(ds_root, [fake_episode(rng, "task-a", n) for n in (25, 9, 29)], robot_type="sawyer", fps=80,
                              episodes_per_file=1)
    summary = run_prepare(tmp_path)
    report = json.loads((tmp_path / "prepared" / "quarantine" / "report.json").read_text())
    assert [(r["dataset"], r["episode_index"]) for r in report] == [("sim-task-a", 1)]
    assert report[0]["reasons"]
    assert summary["datasets"]["sim-task-a"]["quarantined"] == 1
    assert summary["datasets"]["sim-task-b"]["quarantined"] == 0
    assert any((tmp_path / "prepared" / "quarantine" / "sim-task-a").rglob("file-001.*"))  # episode 1's files
    assert (ds_root / "meta" / "info.json").is_file()  # upstream untouched


def test_nothing_usable_fails(tmp_path):
    write_datasets(tmp_path / "episodes", n=1)
    with pytest.raises(ValueError, match="no usable episodes"):
        run_prepare(tmp_path, min_latent_frames=50)


def test_model_directory_snapshots_the_features_it_trained_with(data, tmp_path):
    from model.bundle import ActionSpace, PolicyBundle
    from model.encoders import VideoVAE
    from model.normalization import EmbodimentNorm
    from pipelines.data.features import load_snapshot, snapshot

    feats = read_features("metaworld-sawyer", "task-a", repo=FeatureRepo(data_dir=data / "feast"))
    space = ActionSpace(embodiments=("metaworld-sawyer",), tasks=("task-a",), tau=TINY.tau, instructions={},
                        cameras=("corner4",), latent_hw=(2, 2))
    bundle = PolicyBundle(model=LingBotVA(TINY), vae=VideoVAE.small(TINY.latent_channels, 8, 1),
                          text={"task-a": torch.zeros(4, TINY.text_dim)}, action_space=space,
                          normalization={"metaworld-sawyer": EmbodimentNorm.from_snapshot(snapshot(feats))})
    norm = PolicyBundle.load(bundle.save(tmp_path / "m")).normalization["metaworld-sawyer"]
    restored = load_snapshot(norm.snapshot)
    assert np.array_equal(restored["norm_stats"]["action_q99"], feats["norm_stats"]["action_q99"])
    assert np.array_equal(restored["embodiment"]["action_mask"], feats["embodiment"]["action_mask"])
    assert np.array_equal(norm.normalizer.q99, feats["norm_stats"]["action_q99"])
    assert np.array_equal(norm.action_mask, feats["embodiment"]["action_mask"])


@pytest.mark.parametrize("step", ["prepare", "encode"])
def test_encoders_whose_width_the_preset_cannot_read_are_refused_before_any_work(tmp_path, step, capsys):
    """`--text-encoder` / `--vae` of another width than ``--preset`` (a cluster preset paper-5.3b reads umT5's 4096
    and the Wan2.2 VAE's 48 channels): a clear error before any episode is read."""
    from model.encoders import VideoVAE
    from pipelines.cli import main

    if step == "prepare":
        TextEncoder.small(width=TINY.text_dim, heads=4).save_pretrained(tmp_path / "encoder")
        flags, message = ["--text-encoder", str(tmp_path / "encoder")], f"embeds at width {TINY.text_dim}"
    else:
        VideoVAE.small(latent_channels=TINY.latent_channels).save_pretrained(tmp_path / "encoder")
        flags, message = ["--vae", str(tmp_path / "encoder")], f"makes {TINY.latent_channels} latent channels"
    argv = ["data", step, "--episodes-dir", str(tmp_path / "none"), "--preset", "small", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "preset 'small'" in err
    argv[argv.index("small")] = "tiny"  # the encoders' own preset: past the check, on to the (missing) episodes
    with contextlib.suppress(Exception):
        main(argv)
    assert message not in capsys.readouterr().err


def test_every_camera_of_an_episode_is_read_known_names_first(tmp_path):
    from pipelines.data.encode import EpisodeRef, episode_frames

    rng = np.random.default_rng(1)
    ep = fake_episode(rng, "task-z", 21)
    ep.frames = {"gripperPOV": ep.frames["gripperPOV"], "corner2": ep.frames["corner4"]}  # not an adapter default
    write_lerobot_dataset(tmp_path / "sim-task-z", [ep], robot_type="sawyer", fps=80)
    _, _, cams, frames = episode_frames(EpisodeRef(0, "sim-task-z", 0, "train"), tmp_path, {})
    assert cams == ["gripperPOV", "corner2"] and frames.shape[2] == 2
