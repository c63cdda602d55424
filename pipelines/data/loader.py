"""Training loader over encoded latent shards: episode windows with variable chunk size, packed to a token budget.

Every batch is a ``LingBotVA.compute_loss`` batch: windows of several episodes are padded to one length, and the
``row`` field packs several of them into one attention sequence (the model's mask keeps them apart), filling rows up
to ``token_budget`` tokens. Sources (datasets) are sampled uniformly, then an episode uniformly within the source,
then a window uniformly within the episode (paper §4.2: "sources sampled uniformly").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file


class LatentEpisodes:
    """Random access to the encoded episodes of one split (shards are memory-mapped, opened lazily)."""

    def __init__(self, latents_dir: str | Path, split: str = "train", tasks: list[str] | None = None,
                 max_per_task: int | None = None):
        self.root = Path(latents_dir)
        index_file = self.root / "index.json"
        if not index_file.is_file():
            raise ValueError(f"{index_file} not found; run `lingbot data encode` first")
        self.index = json.loads(index_file.read_text())
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        self.episodes = [e for e in self.index["episodes"] if (split == "all" or e["split"] == split)
                         and (tasks is None or e["task"] in tasks)]
        if max_per_task is not None:  # the first N episodes of each task (low-data runs); deterministic
            if max_per_task < 1:
                raise ValueError(f"max_per_task must be >= 1, got {max_per_task}")
            seen: dict[str, int] = {}
            kept = []
            for e in sorted(self.episodes, key=lambda e: (e["task"], e["dataset"], e["episode_index"])):
                if seen.get(e["task"], 0) < max_per_task:
                    seen[e["task"]] = seen.get(e["task"], 0) + 1
                    kept.append(e)
            self.episodes = sorted(kept, key=lambda e: e["id"])
        if not self.episodes:
            which = f" of tasks {tasks}" if tasks else ""
            raise ValueError(f"no {split} episodes{which} in {index_file}")
        self.tau = int(self.index["tau"])
        self.text = load_file(str(self.root / "text.safetensors"))
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.episodes)

    def _shard(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.root / "shards" / name), framework="pt")
        return self._handles[name]

    def load(self, i: int, start: int = 0, frames: int | None = None) -> dict[str, torch.Tensor]:
        """Episode i's latent frames [start, start+frames) and the actions between them."""
        e = self.episodes[i]
        f = self._shard(e["shard"])
        key = f"e{e['id']}"
        frames = e["num_frames"] - start if frames is None else frames
        video = f.get_slice(f"{key}.video")[start : start + frames].float()
        actions = f.get_slice(f"{key}.actions")[start * self.tau : (start + frames - 1) * self.tau]
        return {"video": video, "actions": actions, "action_mask": f.get_tensor(f"{key}.action_mask").bool(),
                "text": self.text[e["task"]]}

    def __getstate__(self):  # safetensors handles cannot cross process boundaries; reopen in workers
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class PackedWindows(torch.utils.data.IterableDataset):
    """Endless stream of packed training batches."""

    def __init__(
        self,
        latents_dir: str | Path,
        split: str = "train",
        *,
        chunk_sizes: tuple[int, ...] = (1, 2, 3, 4),
        chunks_per_window: int = 4,
        token_budget: int = 4096,
        rows: int = 1,
        patch_hw: tuple[int, int] = (2, 2),
        fdm: bool = False,
        seed: int = 0,
        tasks: list[str] | None = None,
        max_per_task: int | None = None,
        episode_start_prob: float = 0.5,
    ):
        """``episode_start_prob``: probability that a window starts at its episode's first frame. Every rollout
        predicts its first chunk from a lone first frame (a latent that encodes one frame, not four), which uniform
        window starts would show in only ~1 of (num_frames - window + 1) windows."""
        if not 0.0 <= episode_start_prob <= 1.0:
            raise ValueError(f"episode_start_prob must be in [0, 1], got {episode_start_prob}")
        if token_budget <= 0 or rows < 1 or chunks_per_window < 1 or not chunk_sizes or min(chunk_sizes) < 1:
            raise ValueError("token_budget, rows, chunks_per_window and chunk_sizes must be positive")
        self.data = LatentEpisodes(latents_dir, split, tasks, max_per_task)
        self.chunk_sizes, self.chunks_per_window = tuple(chunk_sizes), chunks_per_window
        self.token_budget, self.rows, self.fdm, self.seed = token_budget, rows, fdm, seed
        self.episode_start_prob = episode_start_prob
        hw = {tuple(e["latent_hw"]) for e in self.data.episodes}
        if len(hw) != 1:
            raise ValueError(f"episodes have different latent sizes {sorted(hw)}; encode them with one camera setup")
        h, w = hw.pop()
        self.tokens_per_frame = (h // patch_hw[0]) * (w // patch_hw[1])
        by_source: dict[str, list[int]] = {}
        for i, e in enumerate(self.data.episodes):
            by_source.setdefault(e["dataset"], []).append(i)
        self.sources = [by_source[k] for k in sorted(by_source)]

    def window_tokens(self, frames: int) -> int:
        """Sequence length of a window in the model's teacher-forcing layout (clean + noisy [+ FDM] copies)."""
        copies_v, copies_a = (3, 3) if self.fdm else (2, 2)
        video = (frames + (copies_v - 1) * (frames - 1)) * self.tokens_per_frame
        return video + copies_a * (frames - 1) * self.data.tau

    def _window(self, rng: np.random.Generator, K: int, max_tokens: int) -> tuple[int, int, int] | None:
        source = self.sources[rng.integers(len(self.sources))]
        i = source[rng.integers(len(source))]
        n = self.data.episodes[i]["num_frames"]
        chunks = min(self.chunks_per_window, (n - 1) // K)
        while chunks > 0 and self.window_tokens(1 + chunks * K) > max_tokens:
            chunks -= 1
        if chunks == 0:
            return None
        frames = 1 + chunks * K
        start = 0 if rng.random() < self.episode_start_prob else int(rng.integers(n - frames + 1))
        return i, start, frames

    def batch_tokens(self, batch: dict) -> int:
        """Tokens the model processes for a batch (for tokens/s)."""
        return sum(self.window_tokens(int(f)) for f in batch["num_frames"])

    def sample(self, rng: np.random.Generator) -> dict:
        K = int(self.chunk_sizes[rng.integers(len(self.chunk_sizes))])
        windows, rows = [], []
        for row in range(self.rows):
            used, tries = 0, 0
            while tries < 8:
                win = self._window(rng, K, self.token_budget - used)
                if win is None:
                    tries += 1
                    if used:
                        break
                    continue
                windows.append(win)
                rows.append(row)
                used += self.window_tokens(win[2])
        if not windows:
            raise ValueError(f"token_budget {self.token_budget} is too small for one chunk of size {K}")
        items = [self.data.load(i, start, frames) for i, start, frames in windows]
        F = max(w[2] for w in windows)
        video = torch.zeros(len(items), F, *items[0]["video"].shape[1:])
        actions = torch.zeros(len(items), (F - 1) * self.data.tau, items[0]["actions"].shape[-1])
        for b, it in enumerate(items):
            video[b, : it["video"].shape[0]] = it["video"]
            actions[b, : it["actions"].shape[0]] = it["actions"]
        return {
            "video": video,
            "actions": actions,
            "action_mask": torch.stack([it["action_mask"] for it in items]),
            "text": torch.stack([it["text"] for it in items]),
            "num_frames": torch.tensor([w[2] for w in windows]),
            "row": torch.tensor(rows),
            "chunk_size": K,
        }

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, worker])
        while True:
            yield self.sample(rng)

