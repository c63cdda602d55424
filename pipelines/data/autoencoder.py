"""Train step of the embedded default's video encoder: a small causal VAE with Wan2.2's latent layout, fitted to the
collected frames.

The world model predicts VAE latents and reads the scene through them, so a randomly initialised encoder hides what
the policy has to see (a goal marker a few pixels wide). On a cluster the real Wan2.2 VAE is loaded with ``--vae``;
on one machine this step trains a ``model.frame_vae.FrameVAE`` (4x temporal / 16x spatial compression, causal in
time, 48 latent channels, diffusers' autoencoder API) on the training split's frames, so every consumer (encode,
training, the gate, the server) keeps the one ``VideoVAE`` interface and the real VAE still drops in.

Objective: L1 + MSE reconstruction of short clips (1 + 4k frames, starting anywhere in an episode, so the causal
cache sees both an episode start and steady state) plus a small KL term. Pixels that differ from the static scene (the
median first frame) are weighted up: the arm, objects and goal are what the policy needs, the table is most of it.
Quality is the reconstruction PSNR on validation clips, logged to MLflow with a real-vs-reconstructed strip.

Output: ``<out>/`` a diffusers VAE directory (config.json + safetensors) and ``<out>/metrics.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.data.encode import episode_frames, list_episodes
from pipelines.settings import default_tracking_uri

TAU = 4  # the Wan VAE's temporal compression: clips are 1 + 4k frames


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """Shape and schedule of the embedded-default VAE training (``lingbot data train-vae``)."""

    latent_channels: int = 48
    """Latent channels; must equal the world model preset's ``latent_channels``."""
    dims: tuple[int, ...] = (16, 32, 64)
    """Widths of the FrameVAE's three encoder stages."""
    steps: int = 900
    """Optimizer steps."""
    batch: int = 8
    """Clips per step."""
    clip_groups: int = 2
    """Clips hold 1 + 4 * clip_groups frames."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine to 5% after 5% warmup)."""
    kl_weight: float = 1e-6
    """Weight of the posterior's KL term (keeps the latent a well-behaved Gaussian without blurring)."""
    motion_weight: float = 4.0
    """Extra loss weight of pixels that differ from the static scene (arm, objects, goal)."""
    val_clips: int = 32
    """Validation clips for the PSNR (fixed, so runs compare)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.dims) != 3 or min(self.dims) < 8 or any(d % 8 for d in self.dims):
            raise ValueError(f"dims must be 3 stage widths, multiples of 8, got {self.dims}")
        for name in ("latent_channels", "steps", "batch", "clip_groups", "val_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.kl_weight < 0 or self.motion_weight < 0:
            raise ValueError("lr must be > 0, kl_weight and motion_weight >= 0")


class FramePool:
    """Every frame of one split's episodes in memory as uint8 (E episodes of (T, V, H, W, 3)); clips are sampled from it."""

    def __init__(self, episodes_dir: Path, prepared_dir: Path, split: str, max_episodes: int | None = None):
        refs = [r for r in list_episodes(prepared_dir) if r.split == split]
        if not refs:
            raise ValueError(f"no {split} episodes under {prepared_dir}; run `lingbot data prepare` first")
        if max_episodes is not None:  # spread over datasets: every task's scenes are represented
            refs = refs[:: max(1, len(refs) // max_episodes)][:max_episodes]
        datasets: dict = {}
        # the encode step's own frame reader: the same camera order and 1 + 4k cut as the latents get
        self.episodes = [episode_frames(ref, episodes_dir, datasets)[3][0] for ref in refs]  # (T, V, H, W, 3) each
        shapes = {e.shape[1:] for e in self.episodes}
        if len(shapes) != 1:
            raise ValueError(f"episodes have different camera layouts {sorted(shapes)}; train one VAE per layout")
        self.frame_shape = shapes.pop()
        # the static scene: the per-pixel median of the episodes' first frames; what differs from it (the arm, the
        # objects, the goal marker, whose place varies from episode to episode) is what the policy must see
        self.background = np.median(np.stack([e[0] for e in self.episodes]), axis=0).astype(np.uint8)

    def clips(self, rng: np.random.Generator, n: int, frames: int) -> np.ndarray:
        """n clips (n, frames, V, H, W, 3) from random episodes and start frames."""
        out = []
        for _ in range(n):
            ep = self.episodes[rng.integers(len(self.episodes))]
            if ep.shape[0] < frames:  # short episode: hold its last frame
                ep = np.concatenate([ep, np.repeat(ep[-1:], frames - ep.shape[0], 0)])
            start = int(rng.integers(ep.shape[0] - frames + 1))
            out.append(ep[start : start + frames])
        return np.stack(out)


def to_vae_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, V, H, W, 3) -> float (B, 3, T, H, V*W) in [-1, 1]: the views side by side, as ``VideoVAE.encode``."""
    x = torch.as_tensor(frames)
    b, t, v, h, w, _ = x.shape
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, t, h, v * w).float() / 127.5 - 1.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def train_autoencoder(
    episodes_dir: Path,
    prepared_dir: Path,
    out: Path,
    cfg: AutoencoderConfig,
    *,
    tracking_uri: str | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
    max_episodes: int | None = None,
) -> dict:
    """Train the VAE, write it to ``out`` (atomically: a temporary folder renamed at the end), log it to MLflow."""
    from model.encoders import VideoVAE

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train = FramePool(episodes_dir, prepared_dir, "train", max_episodes)
    try:
        val = FramePool(episodes_dir, prepared_dir, "val", max_episodes)
    except ValueError:
        val = train
    frames = 1 + TAU * cfg.clip_groups
    val_clips = val.clips(np.random.default_rng(12345), cfg.val_clips, frames)
    wrapper = VideoVAE.frame(latent_channels=cfg.latent_channels, dims=cfg.dims, seed=cfg.seed)
    vae = wrapper.vae
    vae.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    tracker = _Tracker(cfg, tracking_uri, data_dir, len(train.episodes), train.frame_shape)
    history, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="train-vae", disable=not progress or None)
    for step in bar:
        x = to_vae_input(train.clips(rng, cfg.batch, frames))
        ref = to_vae_input(train.background[None, None])  # (1, 3, 1, H, V*W)
        weight = 1.0 + cfg.motion_weight * ((x - ref).abs().amax(1, keepdim=True) > 0.1).float()
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        err = recon - x
        rec = (weight * (err.abs() + err.pow(2))).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if tracker:
            tracker.log({"loss": loss.item(), "rec": rec.item(), "kl": kl.item(), "lr": sched.get_last_lr()[0]}, step)
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            val_psnr, strip = evaluate(wrapper, val_clips)
            history.append({"step": step + 1, "val_psnr": val_psnr, "loss": loss.item()})
            print(f"[train-vae] step {step + 1}/{cfg.steps} loss {loss.item():.4f} val PSNR {val_psnr:.2f} dB", flush=True)
            if tracker:
                tracker.log({"val_psnr": val_psnr}, step + 1)
    vae.eval()
    vae.requires_grad_(False)
    val_psnr, strip = evaluate(wrapper, val_clips)
    summary = {"val_psnr_db": val_psnr, "steps": cfg.steps, "train_episodes": len(train.episodes),
               "wall_seconds": round(time.time() - t0, 1), "config": asdict(cfg), "history": history}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapper.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if tracker:
        tracker.finish(summary, strip, out)
    return summary


@torch.no_grad()
def evaluate(wrapper, clips: np.ndarray) -> tuple[float, np.ndarray]:
    """(PSNR of ``clips`` through encode -> decode, a strip image: real clip frames above their reconstructions)."""
    was_training = wrapper.vae.training
    wrapper.vae.eval()
    recon = wrapper.decode(wrapper.encode(torch.from_numpy(clips)), num_views=clips.shape[2])  # uint8 like clips
    wrapper.vae.train(was_training)
    x = torch.from_numpy(clips).float() / 127.5 - 1
    y = recon.float() / 127.5 - 1
    value = psnr(x, y)
    rows = []
    for src in (clips[:4, -1], recon[:4, -1].numpy()):  # last frame of 4 clips; (4, V, H, W, 3)
        rows.append(np.concatenate([np.concatenate(list(views), axis=1) for views in src], axis=1))
    return value, np.concatenate(rows, axis=0)


class _Tracker:
    """MLflow run of the VAE training (experiment ``lingbot-vae``); a no-op without a data dir or tracking URI."""

    def __new__(cls, cfg, tracking_uri, data_dir, episodes, frame_shape):
        if tracking_uri is None and data_dir is None:
            return None
        return super().__new__(cls)

    def __init__(self, cfg, tracking_uri, data_dir, episodes, frame_shape):
        import mlflow

        from pipelines.tracking_store import ensure_experiment

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri or default_tracking_uri(data_dir))
        experiment = ensure_experiment("lingbot-vae", data_dir or Path("data"))
        self.run = mlflow.start_run(experiment_id=experiment, run_name="train-vae")
        mlflow.log_params({**asdict(cfg), "train_episodes": episodes, "frame_shape": list(frame_shape)})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, summary: dict, strip: np.ndarray, out: Path) -> None:
        self.mlflow.log_metric("final_val_psnr_db", summary["val_psnr_db"])
        self.mlflow.log_image(strip, "reconstruction_strip.png")
        self.mlflow.log_artifacts(str(out), "vae")
        self.mlflow.end_run()
