"""The main job on embedded defaults, for now: train LingBot-VA briefly on a synthetic world and sample a chunk.

Later lifecycle steps (Meta-World data, DeepSpeed training, the simulation gate, serving) grow this into the full
local lifecycle.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from model import LingBotVA, get_preset
from pipelines.data.synthetic import ACTIVE_CHANNELS, synthetic_episodes


def run_demo(steps: int = 300, preset: str = "tiny", seed: int = 0, output: str = "data/demo/model") -> dict:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    config = get_preset(preset)
    model = LingBotVA(config)
    data = synthetic_episodes(8, frames=5, latent_channels=config.latent_channels, text_dim=config.text_dim, seed=seed)
    counts = model.stream_parameters()
    print(f"LingBot-VA '{preset}': {counts['total']:,} params (video {counts['video_stream']:,}, "
          f"action {counts['action_stream']:,}); 8 synthetic episodes")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start, first = time.time(), None
    bar = tqdm(range(steps), desc="train", disable=None)
    for step in bar:
        for group in opt.param_groups:  # cosine decay
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        losses = model.compute_loss(data, generator=gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        first = first if first is not None else losses["loss"].item()
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", dyn=f"{losses['dyn']:.3f}", inv=f"{losses['inv']:.3f}")
    train_s = time.time() - start

    model.eval()
    session = model.session(data["text"][0], data["action_mask"][0], generator=torch.Generator().manual_seed(seed))
    session.observe(data["video"][0, :1])
    t0 = time.time()
    video, actions = session.predict_chunk()
    latency_ms = (time.time() - t0) * 1000
    channels = list(ACTIVE_CHANNELS)
    err = (actions[:, channels] - data["actions"][0, : actions.shape[0], channels]).abs().mean().item()
    path = model.save_pretrained(output, action_space={"active_channels": channels, "source": "synthetic"})
    summary = {"first_loss": first, "final_loss": losses["loss"].item(), "train_seconds": round(train_s, 1),
               "chunk_latency_ms": round(latency_ms, 1), "action_mae_vs_demo": err, "model_dir": str(path)}
    print(f"loss {first:.3f} -> {losses['loss'].item():.3f} in {train_s:.1f}s; sampled a chunk of {actions.shape[0]} "
          f"actions + {video.shape[0]} latent frames in {latency_ms:.0f} ms (MAE vs demo actions {err:.3f}); "
          f"saved {path}")
    return summary
