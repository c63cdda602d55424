"""A policy bundle as a closed-loop policy: camera frames -> VAE latents -> KV-cache session -> native actions.

Everything comes from the bundle (``model.bundle.PolicyBundle``): weights, the VAE the training latents came from,
the tasks' instruction embeddings, the action normalisation and the action space. The embodiment's adapter (unified
targets <-> the robot's native commands, ``pipelines.data.embodiments``) is handed in, so the gate, the policy server
and the MLflow pyfunc run this one policy:

    policy = ChunkPolicy.load(model_dir, get_adapter)   # or ChunkPolicy(bundle, adapter)
    ep = policy.episode("reach-v3", seed=0)
    ep.start(frames0)                      # first observation (V, H, W, 3) uint8
    plan = ep.plan()                       # Plan: unified actions (K*tau, 30) in native units + imagined latents
    ...execute policy.native_actions(plan.actions, state)...  # sync: the robot waits for plan(); async: it runs
    ep.imagine(plan)                       # async only: FDM pass, provisional frames for the chunk being executed
    next_plan = ep.plan()                  # async: conditioned on the imagined outcome
    ep.observe(frames, executed_unified)   # real frames + executed actions replace the provisional entries

One endpoint serving many robots batches their model passes (one per denoising step for all of them):

    plans = policy.plan_many(episodes)                        # == [ep.plan() for ep in episodes]
    plans = policy.imagine_and_plan_many(episodes, plans)     # == ep.imagine(p); ep.plan() for each episode

Shapes: N actions of a chunk (K*tau), V views, A the embodiment's native action width, S its state width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from model.bundle import PolicyBundle
from model.session import imagine_many, predict_chunks

SAMPLER_SETTINGS = frozenset({"video_cfg", "video_steps", "video_s_end", "action_steps", "action_cfg",
                              "action_temperature", "window_chunks"})
"""``Session`` overrides of the model config's inference settings a policy takes (for A/B runs)."""


class ActionAdapter(Protocol):
    """What a policy needs of an embodiment adapter (``pipelines.data.embodiments.EmbodimentAdapter``)."""

    spec: Any  # the embodiment's description: native_action_dim, state_dim, control_rate_hz, limits

    @property
    def name(self) -> str: ...

    def to_native(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Unified targets (N, 30) with the state (N, S) before each -> native commands (N, A) within the limits."""
        ...

    def to_unified(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Native commands (N, A) with the state (N, S) before each -> unified targets (N, 30)."""
        ...


@dataclass
class Plan:
    """One predicted chunk: ``actions`` unified (N, 30) in native units, ``latents`` (K, C, h, w) imagined video."""

    actions: np.ndarray
    latents: torch.Tensor
    normalized: torch.Tensor  # (N, 30) what the model produced, for the FDM pass


def native_commands(adapter, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Unified actions (N, 30) as an embodiment adapter's native commands (N, A) against the state (S,) at planning
    time, clipped to its limits: what a robot executes (every policy's ``native_actions``)."""
    states = np.repeat(np.asarray(state, np.float64).reshape(1, -1), len(unified), axis=0)
    return adapter.to_native(np.asarray(unified, np.float64), states).astype(np.float32)


class ChunkPolicy:
    """One loaded bundle driving one embodiment; hands out one ``EpisodePolicy`` per episode."""

    def __init__(self, bundle: PolicyBundle, adapter: ActionAdapter, *, chunk_size: int | None = None,
                 sampler: dict | None = None):
        """``sampler``: ``Session`` overrides of the model config's inference settings (``SAMPLER_SETTINGS``)."""
        self.sampler = _sampler(sampler)
        if adapter.name != bundle.embodiment:
            raise ValueError(f"adapter {adapter.name!r} given for a bundle of embodiment {bundle.embodiment!r}")
        self.bundle, self.adapter = bundle, adapter
        self.model = bundle.model.eval()
        self.vae, self.text = bundle.vae, bundle.text
        norm = bundle.normalization[bundle.embodiment]
        self.normalizer, self.action_mask = norm.normalizer, norm.action_mask
        self.cameras = bundle.action_space.cameras
        self.image_size = bundle.image_size
        self.chunk_size = chunk_size or self.model.config.chunk_size
        self.tau = self.model.config.tau
        self.device = next(self.model.parameters()).device

    @classmethod
    def load(cls, model_dir: str | os.PathLike, adapter_for: Callable[[str], ActionAdapter], *,
             device: str | torch.device = "cpu", chunk_size: int | None = None,
             sampler: dict | None = None) -> ChunkPolicy:
        """The bundle in ``model_dir`` on ``device``, with ``adapter_for(embodiment)`` as its adapter
        (``pipelines.data.embodiments.get_adapter``)."""
        _sampler(sampler)  # a typo fails before the slow load
        bundle = PolicyBundle.load(model_dir, device=device)
        return cls(bundle, adapter_for(bundle.embodiment), chunk_size=chunk_size, sampler=sampler)

    @property
    def tasks(self) -> list[str]:
        return self.bundle.tasks

    @property
    def steps_per_chunk(self) -> int:
        return self.chunk_size * self.tau

    def native_actions(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        """A plan's unified actions (N, 30), native units, as the robot's commands (N, A) against its state (S,)
        at planning time, clipped to the embodiment's limits: what a robot executes."""
        return native_commands(self.adapter, unified, state)

    def episode(self, task: str, seed: int) -> EpisodePolicy:
        if task not in self.text:
            raise ValueError(f"the model has no instruction embedding for task {task!r}; it knows {self.tasks}")
        return EpisodePolicy(self, task, seed)

    def first_chunks(self, frames: np.ndarray, states: np.ndarray, tasks: Sequence[str],
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Chunk 0 of a new episode per robot, batched: first frames (R, V, H, W, 3) uint8, states (R, S) and tasks
        -> (unified (R, N, 30), native (R, N, A)) float32. Non-finite actions raise ValueError."""
        episodes = [self.episode(task, seed=seed) for task in tasks]
        for episode, first in zip(episodes, frames, strict=True):
            episode.start(first)
        plans = self.plan_many(episodes)
        if not all(np.isfinite(plan.actions).all() for plan in plans):
            raise ValueError("the model produced non-finite actions")
        native = [self.native_actions(plan.actions, state) for plan, state in zip(plans, states, strict=True)]
        return np.stack([plan.actions.astype(np.float32) for plan in plans]), np.stack(native)

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


def _sampler(sampler: dict | None) -> dict:
    unknown = sorted(set(sampler or {}) - SAMPLER_SETTINGS)
    if unknown:
        raise ValueError(f"unknown sampler settings {unknown}; choose from {sorted(SAMPLER_SETTINGS)}")
    return dict(sampler or {})


__all__ = ["SAMPLER_SETTINGS", "ActionAdapter", "ChunkPolicy", "EpisodePolicy", "Plan"]
