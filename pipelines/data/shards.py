"""On-disk format of encoded episodes: safetensors shards + index.json (written by encode, read by the loader).

    shards/r000-00000.safetensors   per episode ``e<id>.video`` (F, C, h, w) bf16 normalised VAE latents,
                                    ``e<id>.actions`` (N, 30) f32 normalised unified actions (N = (F-1)*tau),
                                    ``e<id>.action_mask`` (30,) u8
    text.safetensors                ``<task>`` -> (L, D) f32 instruction embedding
    index.json                      one entry per episode (+ tau, widths, normalisation stats, instructions)
Writes are atomic (temporary name, then rename) so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TAU = 4  # actions per latent frame = the VAE's temporal compression


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.rename(path)


class ShardWriter:
    """Accumulates encoded episodes and writes them as safetensors shards plus this rank's index part."""

    def __init__(self, latents_dir: Path, rank: int = 0, shard_episodes: int = 32):
        self.dir, self.rank, self.shard_episodes = Path(latents_dir), rank, shard_episodes
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._pending: list[dict] = []
        self._shard_no = 0

    def add(self, episode_id: int, video: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor,
            meta: dict) -> None:
        """video (F, C, h, w) normalised latents; actions ((F-1)*tau, 30) normalised; action_mask (30,)."""
        if actions.shape[0] != (video.shape[0] - 1) * TAU:
            raise ValueError(f"episode {episode_id}: {actions.shape[0]} actions for {video.shape[0]} latent frames")
        key = f"e{episode_id}"
        self._buffer[f"{key}.video"] = video.to(torch.bfloat16).contiguous().clone()
        self._buffer[f"{key}.actions"] = actions.float().contiguous().clone()
        self._buffer[f"{key}.action_mask"] = action_mask.to(torch.uint8).clone()
        self._pending.append({"id": episode_id, **meta, "num_frames": int(video.shape[0]),
                              "latent_channels": int(video.shape[1]), "latent_hw": list(video.shape[-2:])})
        if len(self._pending) >= self.shard_episodes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"r{self.rank:03d}-{self._shard_no:05d}.safetensors"
        _atomic_save(self._buffer, self.dir / "shards" / name)
        self.entries += [{**e, "shard": name} for e in self._pending]
        self._buffer, self._pending, self._shard_no = {}, [], self._shard_no + 1

    def close(self) -> list[dict]:
        self._flush()
        _atomic_json(self.entries, self.dir / f"index-r{self.rank:03d}.json")
        return self.entries


def write_index(latents_dir: Path, entries: list[dict], text: dict[str, torch.Tensor], stats: dict,
                instructions: dict[str, str], world_size: int = 1, extra: dict | None = None) -> Path:
    """Write text.safetensors and index.json for encoded shards (the loader's entry point)."""
    _atomic_save({t: v.float().contiguous() for t, v in text.items()}, latents_dir / "text.safetensors")
    first = next(iter(text.values()))
    index = {
        "episodes": sorted(entries, key=lambda e: e["id"]),
        "tau": TAU,
        "latent_channels": entries[0]["latent_channels"],
        "text_dim": int(first.shape[-1]),
        "text_len": int(first.shape[0]),
        "normalization": stats,
        "instructions": instructions,
        "world_size": world_size,
        **(extra or {}),
    }
    _atomic_json(index, latents_dir / "index.json")
    return latents_dir / "index.json"
