"""A synthetic video-action world: a blob in latent space pushed by 2-D actions.

Used by smoke tests and benchmarks that need data before any robot data exists. The latent of frame f is a
Gaussian bump whose centre is the integral of the actions so far, so the video depends causally on the actions
(a world model has something to learn) and the actions are recoverable from consecutive frames (inverse dynamics).
"""

from __future__ import annotations

import math

import torch

ACTIVE_CHANNELS = (0, 1, 28)  # left EEF x, y and the left gripper of the unified 30-dim space


def synthetic_episodes(
    num_episodes: int,
    *,
    frames: int = 5,
    latent_channels: int = 16,
    height: int = 4,
    width: int = 8,
    tau: int = 4,
    text_dim: int = 32,
    text_len: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A batch in ``LingBotVA.compute_loss`` format: video (B, F, C, H, W), actions (B, (F-1)*tau, 30), ..."""
    g = torch.Generator().manual_seed(seed)
    B, N = num_episodes, (frames - 1) * tau
    phase = torch.rand(B, 1, generator=g) * 2 * math.pi
    t = torch.arange(N)[None].float()
    actions = torch.zeros(B, N, 30)
    actions[:, :, 0] = 0.8 * torch.cos(phase + t * 0.3)
    actions[:, :, 1] = 0.8 * torch.sin(phase + t * 0.3)
    actions[:, :, 28] = (torch.sin(phase + t * 0.15) > 0).float() * 2 - 1
    mask = torch.zeros(B, 30, dtype=torch.bool)
    mask[:, list(ACTIVE_CHANNELS)] = True

    start = torch.rand(B, 2, generator=g) * torch.tensor([height - 1.0, width - 1.0])
    step = 0.25 * actions[:, :, :2]  # each action moves the blob a quarter latent pixel
    path = torch.cat([torch.zeros(B, 1, 2), step.cumsum(1)], dim=1)[:, ::tau]  # positions at latent frames
    centre = start[:, None] + path  # (B, F, 2)
    ys = torch.arange(height).float()[None, None, :, None]
    xs = torch.arange(width).float()[None, None, None, :]
    bump = torch.exp(-((ys - centre[..., 0, None, None]) ** 2 + (xs - centre[..., 1, None, None]) ** 2) / 2.0)
    basis = torch.randn(1, 1, latent_channels, 1, 1, generator=g)
    grip = actions[:, ::tau, 28].repeat_interleave(1, 1)
    grip = torch.cat([grip[:, :1], grip], dim=1)[:, :frames]
    video = bump[:, :, None] * basis * 2 + 0.5 * grip[:, :, None, None, None] * basis.roll(1, dims=2)

    text = torch.randn(B, text_len, text_dim, generator=g)
    return {"video": video, "actions": actions, "action_mask": mask, "text": text}


def write_synthetic_lerobot(root, tasks=("task-a", "task-b"), episodes: int = 4, length: int = 21, seed: int = 0,
                            image_size: int = 32) -> None:
    """Small LeRobot datasets of random Meta-World-shaped episodes (for smoke runs of prepare/encode/train)."""
    from pathlib import Path

    import numpy as np

    from pipelines.data.embodiments import METAWORLD_CAMERAS
    from pipelines.data.episode import Episode
    from pipelines.data.lerobot.writer import write_lerobot_dataset

    rng = np.random.default_rng(seed)
    for task in tasks:
        eps = []
        for i in range(episodes):
            n = length + 4 * i
            state = np.concatenate([rng.uniform(-0.2, 0.2, (n, 3)), rng.uniform(0, 1, (n, 1))], 1).astype(np.float32)
            frames = {c: rng.integers(0, 255, (n, image_size, image_size, 3), dtype=np.uint8)
                      for c in METAWORLD_CAMERAS}
            eps.append(Episode(frames=frames, actions=rng.uniform(-1, 1, (n, 4)).astype(np.float32), state=state,
                               success=np.arange(n) > n - 3, task=task, instruction=f"do {task}",
                               embodiment="metaworld-sawyer", fps=80, seed=seed))
        write_lerobot_dataset(Path(root) / f"sim-{task}", eps, robot_type="sawyer", fps=80)


def write_synthetic_latents(root, config, episodes: int = 64, frames: int = 40, latent_hw=(8, 16), seed: int = 0):
    """Encoded-format shards of random latents for a model config (benchmarks; shape of two 128-px views)."""
    from pathlib import Path

    from pipelines.data.shards import ShardWriter, write_index

    g = torch.Generator().manual_seed(seed)
    writer = ShardWriter(Path(root), shard_episodes=16)
    mask = torch.zeros(30, dtype=torch.uint8)
    mask[[*range(7), 28]] = 1
    for i in range(episodes):
        writer.add(i, torch.randn(frames, config.latent_channels, *latent_hw, generator=g),
                   torch.randn((frames - 1) * config.tau, 30, generator=g).clamp(-1.5, 1.5), mask,
                   {"dataset": f"source-{i % 4}", "episode_index": i, "split": "val" if i % 10 == 9 else "train",
                    "task": f"task-{i % 4}", "embodiment": "synthetic"})
    text = {f"task-{k}": torch.randn(16, config.text_dim, generator=g) for k in range(4)}
    write_index(Path(root), writer.close(), text, stats={}, instructions={t: t for t in text})
    return Path(root)
