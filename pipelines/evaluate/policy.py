"""A model directory as a closed-loop policy: camera frames -> VAE latents -> KV-cache session -> native actions.

Everything comes from the model directory written by training (``save_pretrained`` + ``encoder_files``): weights,
the VAE the training latents came from (``vae/``), the tasks' instruction embeddings, the action normalisation and
the embodiment. Nothing else is loaded, so what is evaluated is what gets served.

One ``EpisodePolicy`` per episode follows Algorithm 1 (sync) or Algorithm 2 (async) of the paper:

    ep = policy.episode("reach-v3", seed=0)
    ep.start(frames0)                      # first observation (V, H, W, 3) uint8
    plan = ep.plan()                       # Plan: unified actions (K*tau, 30) in native units + imagined latents
    ...execute plan.actions...             # sync: the robot waits for plan(); async: it runs while the next is planned
    ep.imagine(plan)                       # async only: FDM pass, provisional frames for the chunk being executed
    next_plan = ep.plan()                  # async: conditioned on the imagined outcome
    ep.observe(frames, executed_unified)   # real frames + executed actions replace the provisional entries

One endpoint serving many robots batches their model passes (one per denoising step for all of them):

    plans = policy.plan_many(episodes)                        # == [ep.plan() for ep in episodes]
    plans = policy.imagine_and_plan_many(episodes, plans)     # == ep.imagine(p); ep.plan() for each episode
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from model.encoders import VideoVAE
from model.lingbot_va import LingBotVA
from model.session import imagine_many, predict_chunks
from pipelines.data.embodiments import get_adapter
from pipelines.train.registry import _mask_from_action_space, parse_normalization
from pipelines.train.tracking import TEXT_FILE, VAE_DIR


@dataclass
class Plan:
    """One predicted chunk: ``actions`` unified (N, 30) in native units, ``latents`` (K, C, h, w) imagined video."""

    actions: np.ndarray
    latents: torch.Tensor
    normalized: torch.Tensor  # (N, 30) what the model produced, for the FDM pass


class ChunkPolicy:
    """Loads a model directory once; hands out one ``EpisodePolicy`` per episode."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", chunk_size: int | None = None,
                 sampler: dict | None = None):
        """``sampler``: ``Session`` overrides of the model config's inference settings (``video_cfg``,
        ``video_steps``, ``video_s_end``, ``action_steps``, ``action_cfg``, ``action_temperature``, ``window_chunks``), for
        A/B runs."""
        model_dir = Path(model_dir)
        allowed = {"video_cfg", "video_steps", "video_s_end", "action_steps", "action_cfg", "action_temperature",
                   "window_chunks"}
        if sampler and set(sampler) - allowed:
            raise ValueError(f"unknown sampler settings {sorted(set(sampler) - allowed)}; choose from {sorted(allowed)}")
        self.sampler = dict(sampler or {})
        self.model = LingBotVA.from_pretrained(model_dir, map_location=device).eval()
        meta = self.model.checkpoint_meta
        space = meta.get("action_space") or {}
        if not (model_dir / VAE_DIR).is_dir() or not (model_dir / TEXT_FILE).is_file():
            raise ValueError(f"{model_dir} has no {VAE_DIR}/ or {TEXT_FILE}: it was written by an older trainer; "
                             "retrain or post-train it to get a self-contained model directory")
        self.vae = VideoVAE.from_pretrained(model_dir / VAE_DIR).to(device)
        self.text = load_file(str(model_dir / TEXT_FILE))
        embodiments = space.get("embodiments") or []
        if len(embodiments) != 1:
            raise ValueError(f"{model_dir} covers embodiments {embodiments}; closed-loop evaluation needs exactly one")
        self.adapter = get_adapter(embodiments[0])
        stats = parse_normalization(meta.get("normalization"))
        if not stats:
            raise ValueError(f"{model_dir} has no action normalisation stats")
        self.normalizer, stats_mask = stats.get(embodiments[0]) or next(iter(stats.values()))
        mask = stats_mask if stats_mask is not None else _mask_from_action_space(space)
        self.action_mask = np.asarray(mask if mask is not None else self.adapter.mask, bool)
        obs = space.get("observation") or {}
        self.cameras = tuple(obs.get("cameras") or self.adapter.spec.camera_keys)
        hw = obs.get("latent_hw")
        sc = self.vae.spatial_compression
        self.image_size = int(hw[0] * sc) if hw else None  # square views, side by side in the latent
        self.chunk_size = chunk_size or self.model.config.chunk_size
        self.tau = self.model.config.tau
        self.device = device

    @property
    def tasks(self) -> list[str]:
        return sorted(self.text)

    @property
    def steps_per_chunk(self) -> int:
        return self.chunk_size * self.tau

    def native_actions(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        """A plan's unified actions (N, 30), native units, as the robot's commands (N, A) against its state (S,)
        at planning time, clipped to the embodiment's limits: what a robot executes."""
        unified = np.asarray(unified, np.float64)
        states = np.repeat(np.asarray(state, np.float64).reshape(1, -1), len(unified), axis=0)
        return self.adapter.clip_actions(self.adapter.to_native(unified, states)).astype(np.float32)

    def episode(self, task: str, seed: int) -> EpisodePolicy:
        if task not in self.text:
            raise ValueError(f"the model has no instruction embedding for task {task!r}; it knows {self.tasks}")
        return EpisodePolicy(self, task, seed)

    def plan_many(self, episodes: list[EpisodePolicy]) -> list[Plan]:
        """``[ep.plan() for ep in episodes]`` with the episodes' model passes batched across robots."""
        episodes = self._own(episodes)
        chunks = predict_chunks([ep.session for ep in episodes])
        return [ep._plan(video, actions) for ep, (video, actions) in zip(episodes, chunks, strict=True)]

    def imagine_and_plan_many(self, episodes: list[EpisodePolicy], plans: list[Plan]) -> list[Plan]:
        """Algorithm 2's step for many robots: each episode imagines its executing ``plan`` (FDM), then plans the
        next chunk from it; equal to ``ep.imagine(plan); ep.plan()`` per episode, with the passes batched."""
        episodes = self._own(episodes)
        if len(plans) != len(episodes):
            raise ValueError(f"imagine_and_plan_many: {len(episodes)} episodes but {len(plans)} plans")
        imagine_many([ep.session for ep in episodes], [plan.normalized.to(self.device) for plan in plans])
        return self.plan_many(episodes)

    def _own(self, episodes: list[EpisodePolicy]) -> list[EpisodePolicy]:
        episodes = list(episodes)
        for i, ep in enumerate(episodes):
            if not isinstance(ep, EpisodePolicy) or ep.p is not self:
                raise ValueError(f"episode {i} was not created by this policy's episode()")
        return episodes


class EpisodePolicy:
    """The per-episode state: a KV-cache session and the VAE's causal encoder cache."""

    def __init__(self, policy: ChunkPolicy, task: str, seed: int):
        self.p = policy
        self.session = policy.model.session(policy.text[task].float().to(policy.device),
                                            torch.from_numpy(policy.action_mask), chunk_size=policy.chunk_size,
                                            generator=torch.Generator().manual_seed(seed), **policy.sampler)
        self.stream = policy.vae.stream()

    def start(self, frames: np.ndarray) -> None:
        """The first observation: one frame per camera, (V, H, W, 3) uint8."""
        z = self.stream.push(np.asarray(frames)[None])
        self.session.observe(z.to(self.p.device))

    def plan(self) -> Plan:
        """The next chunk (Algorithm 1; in async mode after ``imagine``)."""
        return self._plan(*self.session.predict_chunk())

    def _plan(self, video: torch.Tensor, actions: torch.Tensor) -> Plan:
        """The session's prediction as a ``Plan``: actions denormalised to native units (all NaN if not finite)."""
        a = actions.float().cpu()
        native = np.full(a.shape, np.nan, np.float64)
        if torch.isfinite(a).all():
            clip = self.p.normalizer.clip
            native = self.p.normalizer.denormalize(np.clip(a.numpy(), -clip, clip))
            native = np.where(self.p.action_mask[None, :], native, 0.0)
        return Plan(actions=native, latents=video.float().cpu(), normalized=a)

    def imagine(self, plan: Plan) -> torch.Tensor:
        """Algorithm 2's forward-dynamics step for the chunk being executed (provisional until ``observe``)."""
        return self.session.imagine(plan.normalized.to(self.p.device)).float().cpu()

    def observe(self, frames: np.ndarray, executed_unified: np.ndarray) -> None:
        """The chunk's real frames (N, V, H, W, 3) and the unified actions that actually ran (N, 30)."""
        z = self.stream.push(np.asarray(frames))
        a = self.p.normalizer.normalize(torch.as_tensor(executed_unified, dtype=torch.float32))
        a = a * torch.from_numpy(self.p.action_mask).float()
        self.session.observe(z.to(self.p.device), a.to(self.p.device))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Imagined latents (K, C, h, w) -> uint8 frames (T, H, V*W, 3) for rollout videos."""
        return self.p.vae.decode(latents[None].to(self.p.device))[0, :, 0].cpu().numpy()
