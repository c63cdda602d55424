"""Encode step: episode frames -> Wan2.2 VAE latent shards, instructions -> text embeddings (safetensors + index).

Runs under torchrun at any world size: the sorted list of usable episodes is split by ``index % world_size == rank``,
each rank writes its own shard files and index part, and rank 0 merges the parts after a barrier, checking that every
episode appears exactly once. Writes are atomic (temporary name, then rename), so an interrupted run leaves no
half-written shard behind.

Latents are standardised per channel with statistics fitted on the training split (``fit_latent_stats``); the VAE
with those numbers in its config is written beside the shards (``<out>/vae``), and training copies it into every
model directory, so the gate and the server apply exactly the same standardisation.

Output: see ``pipelines.data.shards`` (shards + text.safetensors + index.json) and ``vae/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.normalization import ActionNormalizer
from pipelines.data.embodiments import get_adapter
from pipelines.data.features import read_features
from pipelines.data.lerobot.reader import LeRobotDataset
from pipelines.data.shards import TAU, ShardWriter, write_index

VAE_DIR = "vae"  # the encoding VAE, standardisation included, is saved beside the shards under this name


@dataclass(frozen=True)
class EpisodeRef:
    id: int
    dataset: str
    episode_index: int
    split: str


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment (1 process when run plainly)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


def list_episodes(prepared_dir: Path) -> list[EpisodeRef]:
    """Usable episodes of every prepared dataset, in a deterministic order."""
    refs = []
    for split_file in sorted(prepared_dir.glob("*/split.json")):
        split = json.loads(split_file.read_text())
        for name in ("train", "val"):
            for idx in split[name]:
                refs.append((split_file.parent.name, int(idx), name))
    refs.sort()
    return [EpisodeRef(i, d, e, s) for i, (d, e, s) in enumerate(refs)]


def usable_frames(length: int) -> int:
    """Raw frames kept so the causal VAE sees 1 + 4k of them."""
    return 1 + ((length - 1) // TAU) * TAU


def encode(
    episodes_dir: Path,
    prepared_dir: Path,
    latents_dir: Path,
    *,
    vae,
    feature_repo=None,
    shard_episodes: int = 32,
    progress: bool = True,
    vae_spec: dict | None = None,
) -> dict:
    """Encode every prepared episode (this rank's share) and, on rank 0, merge the index."""
    rank, world = dist_info()
    refs = list_episodes(prepared_dir)
    if not refs:
        raise ValueError(f"no prepared episodes under {prepared_dir}; run `lingbot data prepare` first")
    stats_file = prepared_dir / "stats.json"
    if not stats_file.is_file():
        raise ValueError(f"{stats_file} is missing; run `lingbot data prepare` first")
    stats = json.loads(stats_file.read_text())
    normalizers = {emb: ActionNormalizer.from_dict(s["action"]) for emb, s in stats.items()}
    mine = [r for r in refs if r.id % world == rank]
    datasets: dict[str, LeRobotDataset] = {}
    # every rank fits the same statistics on the same episodes, so the ranks' shards agree without a collective
    mean, std = fit_latent_stats(vae, [r for r in refs if r.split == "train"] or refs, episodes_dir, datasets)
    vae.with_latent_stats(mean, std)
    if rank == 0:
        _save_vae(vae, latents_dir / VAE_DIR)
    writer = ShardWriter(latents_dir, rank, shard_episodes)
    for ref in tqdm(mine, desc=f"encode[rank {rank}]", disable=not progress or None):
        ep, adapter, cams, frames = episode_frames(ref, episodes_dir, datasets)
        T = frames.shape[1]
        latents = vae.encode(torch.from_numpy(frames))[0]  # (F, C, h, w)
        unified = adapter.to_unified(ep.actions, ep.state)[: T - 1]
        actions = normalizers[ep.embodiment].normalize(torch.from_numpy(unified).float())
        writer.add(ref.id, latents, actions, torch.from_numpy(np.asarray(adapter.mask, dtype=np.uint8)),
                   {"dataset": ref.dataset, "episode_index": ref.episode_index, "split": ref.split, "task": ep.task,
                    "embodiment": ep.embodiment, "cameras": cams})
    entries = writer.close()
    _barrier(world)
    if rank != 0:
        return {"rank": rank, "episodes": len(entries)}
    return _merge(latents_dir, refs, world, stats, feature_repo, {"vae": vae_spec or {}})


def episode_frames(ref: EpisodeRef, episodes_dir: Path, datasets: dict):
    """(episode, adapter, camera keys, frames (1, T, V, H, W, 3) uint8 cut to 1 + 4k) of one episode.

    The frame reader of every consumer of the latents' frames (encode, train-vae, bench/latent_probe.py), so they all
    see the same camera order and cut: the adapter's ``camera_keys`` present, then any other views by name (none is
    dropped); ``datasets`` caches the opened datasets by name across calls."""
    ds = datasets.get(ref.dataset) or datasets.setdefault(ref.dataset, LeRobotDataset(episodes_dir / ref.dataset))
    ep = ds.episode(ref.episode_index)
    adapter = get_adapter(ep.embodiment)
    T = usable_frames(ep.length)
    known = [k for k in adapter.spec.camera_keys if k in ep.frames]
    cams = known + sorted(set(ep.frames) - set(known))  # every view (e.g. a derived corner4_zoom), the adapter's first
    return ep, adapter, cams, np.stack([ep.frames[k][:T] for k in cams], axis=1)[None]


def fit_latent_stats(vae, refs: list[EpisodeRef], episodes_dir: Path, datasets: dict | None = None,
                     max_episodes: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of the VAE's raw latents over (up to ``max_episodes``, spread evenly) training
    episodes: standardised latents have unit scale per channel, the scale of the flow-matching noise. Without it a
    random or foreign VAE's latents (std ~0.1) drown in the noise at the flow times the action stream reads."""
    datasets = {} if datasets is None else datasets
    picked = refs[:: max(1, len(refs) // max_episodes)][:max_episodes]
    total, sq, n = 0.0, 0.0, 0
    for ref in picked:
        z = vae.raw_latents(torch.from_numpy(episode_frames(ref, episodes_dir, datasets)[3]))[0].double()  # (F, C, h, w)
        total = total + z.sum((0, 2, 3))
        sq = sq + (z * z).sum((0, 2, 3))
        n += z.shape[0] * z.shape[2] * z.shape[3]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-4)
    return mean.float(), std.float()


def _save_vae(vae, target: Path) -> None:
    """Write the VAE (with its fitted standardisation) beside the shards, atomically."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_vae(latents_dir: Path, index: dict):
    """The VAE that produced ``latents_dir`` (its copy with the fitted standardisation; older indexes: the spec)."""
    from model.encoders import VideoVAE

    if (Path(latents_dir) / VAE_DIR / "config.json").is_file():
        return VideoVAE.from_pretrained(Path(latents_dir) / VAE_DIR)
    spec = index.get("vae") or {}
    if spec.get("path"):
        return VideoVAE.from_pretrained(spec["path"])
    return VideoVAE.small(latent_channels=index["latent_channels"], seed=int(spec.get("seed", 0)))


def _merge(latents_dir: Path, refs: list[EpisodeRef], world: int, stats: dict, feature_repo, extra: dict) -> dict:
    parts = []
    for r in range(world):
        part = latents_dir / f"index-r{r:03d}.json"
        parts += json.loads(part.read_text())
        part.unlink()
    ids = [e["id"] for e in parts]
    expected = [r.id for r in refs]
    if sorted(ids) != expected:
        dup = sorted({i for i in ids if ids.count(i) > 1})
        missing = sorted(set(expected) - set(ids))
        raise RuntimeError(f"encoded episodes do not match the plan: duplicated {dup[:10]}, missing {missing[:10]}")
    parts.sort(key=lambda e: e["id"])
    # instruction embeddings come from the feature store, the same values serving reads
    text, instructions = {}, {}
    for task, embodiment in sorted({(e["task"], e["embodiment"]) for e in parts}):
        feats = read_features(embodiment, task, repo=feature_repo)["task"]
        shape = tuple(int(x) for x in feats["instruction_embedding_shape"])
        text[task] = torch.as_tensor(np.asarray(feats["instruction_embedding"], np.float32).reshape(shape))
        instructions[task] = feats["instruction"]
    write_index(latents_dir, parts, text, stats, instructions, world, extra)
    return {"episodes": len(parts), "tasks": len(text), "index": str(latents_dir / "index.json")}

