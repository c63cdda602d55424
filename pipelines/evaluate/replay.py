"""The blind-replay baseline: one training demonstration's end-effector targets, executed open loop.

A policy that ignores the camera entirely and still succeeds wherever the task's variants differ little. A learned
policy has to beat it to claim it uses what it sees. It plugs into ``rollout.run_episode`` like ``ChunkPolicy``:
chunks of the demo's unified actions (absolute targets in native units), converted against the hand position
observed at each step, on exactly the episodes the world model is evaluated on. Past the demo's end the last target
is held.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.policy import Plan, native_commands
from pipelines.data.embodiments import get_adapter
from pipelines.data.lerobot.format import CAMERA_PREFIX
from pipelines.data.lerobot.reader import LeRobotDataset
from pipelines.data.metaworld_collect import DEFAULT_CAMERAS, EMBODIMENT, dataset_name


class ReplayPolicy:
    """Replays demonstration ``demo`` of each task's collected dataset (``<episodes_dir>/metaworld-<task>``)."""

    def __init__(self, episodes_dir: str | Path, demo: int = 0, steps_per_chunk: int = 16, image_size: int | None = None):
        self.episodes_dir, self.demo, self._chunk = Path(episodes_dir), demo, steps_per_chunk
        self.adapter = get_adapter(EMBODIMENT)
        self.cameras = DEFAULT_CAMERAS
        self._targets: dict[str, np.ndarray] = {}
        self.image_size = image_size
        if image_size is None:  # render what the demos were recorded at (only the rollout videos use the frames)
            first = next(iter(sorted(self.episodes_dir.glob("metaworld-*"))), None)
            if first is not None:  # the camera feature's shape in meta/info.json: (H, W, 3)
                feature = LeRobotDataset(first).features.get(CAMERA_PREFIX + self.cameras[0], {})
                self.image_size = int(feature["shape"][0]) if feature.get("shape") else None

    @property
    def tasks(self) -> list[str]:
        return sorted(p.name.removeprefix("metaworld-") for p in self.episodes_dir.glob("metaworld-*"))

    @property
    def steps_per_chunk(self) -> int:
        return self._chunk

    def targets(self, task: str) -> np.ndarray:
        """The replayed demo's unified actions (T, 30) in native units."""
        if task not in self._targets:
            root = self.episodes_dir / dataset_name(task)
            if not root.is_dir():
                raise ValueError(f"no demonstrations of {task!r} under {self.episodes_dir} to replay")
            ep = LeRobotDataset(root).episode(self.demo)
            self._targets[task] = self.adapter.to_unified(ep.actions, ep.state)
        return self._targets[task]

    def native_actions(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        """A plan's unified actions (N, 30) as native commands (N, A) against the state (S,) at planning time, as
        ``ChunkPolicy.native_actions`` (the policy server's engine, which the gate runs in process, calls it)."""
        return native_commands(self.adapter, unified, state)

    def episode(self, task: str, seed: int) -> _ReplayEpisode:
        return _ReplayEpisode(self, self.targets(task))


class _ReplayEpisode:
    def __init__(self, policy: ReplayPolicy, targets: np.ndarray):
        self.p, self.targets, self.t = policy, targets, 0

    def start(self, frames: np.ndarray) -> None:
        pass

    def plan(self) -> Plan:
        idx = np.minimum(np.arange(self.t, self.t + self.p.steps_per_chunk), len(self.targets) - 1)
        self.t += self.p.steps_per_chunk
        actions = self.targets[idx].astype(np.float64)
        return Plan(actions=actions, latents=torch.zeros(0), normalized=torch.from_numpy(actions).float())

    def imagine(self, plan: Plan) -> torch.Tensor:
        return plan.latents

    def observe(self, frames: np.ndarray, executed_unified: np.ndarray) -> None:
        pass
