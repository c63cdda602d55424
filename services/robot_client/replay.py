"""A robot that replays recorded observations: load tests of an endpoint without a simulator on its cores.

``ReplayRobot`` shows the frames and states of a recorded episode, one step per executed action, looping at its end;
the commands it is given are checked (``Robot.step``) and dropped. It never succeeds and never ends, so an episode
runs its step budget: what it measures is whether the endpoint keeps up, not what the policy does. Frames come from a
LeRobot dataset (``replay_observations``), resized to the model's square views, or are synthesised at that size when
no dataset is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.data.embodiments import get_adapter
from services.robot_client.robot import Observation, Robot, RobotLimits, StepOutcome


class ReplayRobot(Robot):
    """Replays ``frames`` (T, V, H, W, 3) uint8 and ``states`` (T, S) float32 as embodiment ``embodiment``."""

    def __init__(self, frames: np.ndarray, states: np.ndarray, embodiment: str, cameras: Sequence[str]) -> None:
        frames, states = np.asarray(frames, np.uint8), np.asarray(states, np.float32)
        if frames.ndim != 5 or frames.shape[1] != len(cameras) or frames.shape[2] != frames.shape[3]:
            raise ValueError(f"frames must be (T, {len(cameras)}, H, H, 3), got {frames.shape}")
        if len(states) != len(frames) or len(frames) == 0:
            raise ValueError(f"frames and states need the same non-zero length, got {len(frames)} and {len(states)}")
        spec = get_adapter(embodiment).spec
        self.embodiment, self.cameras, self.image_size = embodiment, tuple(cameras), int(frames.shape[2])
        self.limits = RobotLimits(spec.action_low, spec.action_high)
        self._frames, self._states, self._t = frames, states, 0

    def _reset(self) -> Observation:
        self._t = 0
        return self._observe()

    def _observe(self) -> Observation:
        return Observation(frames=self._frames[self._t], state=self._states[self._t])

    def _step(self, action: np.ndarray) -> StepOutcome:
        self._t = (self._t + 1) % len(self._frames)
        return StepOutcome(success=False, done=False)


def resize_square(frames: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W, 3) -> (..., size, size, 3) by nearest neighbour (cheap; a load test needs the bytes, not pixels)."""
    h, w = frames.shape[-3:-1]
    rows = (np.arange(size) * h // size).clip(0, h - 1)
    cols = (np.arange(size) * w // size).clip(0, w - 1)
    return frames[..., rows[:, None], cols[None, :], :]


def replay_observations(source: str | Path | None, cameras: Sequence[str], image_size: int, state_dim: int,
                        episode: int = 0, steps: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(frames (T, V, size, size, 3), states (T, S), where they came from) for a ``ReplayRobot``.

    ``source``: a LeRobot dataset directory (episode ``episode`` modulo its episode count; cameras matched by name,
    else taken in order) or None / "synthetic" for ``steps`` random frames and states.
    """
    if source in (None, "synthetic"):
        rng = np.random.default_rng(seed)
        frames = rng.integers(0, 256, (steps, len(cameras), image_size, image_size, 3), dtype=np.uint8)
        return frames, rng.uniform(-0.2, 0.8, (steps, state_dim)).astype(np.float32), "synthetic"
    from pipelines.data.lerobot.format import camera_name
    from pipelines.data.lerobot.reader import LeRobotDataset

    dataset = LeRobotDataset(source)
    index = dataset.episode_indices[episode % len(dataset)]
    ep = dataset.episode(index)
    keys = {camera_name(k): k for k in ep.frames} | {k: k for k in ep.frames}
    names = [keys.get(c) for c in cameras]
    if None in names:
        names = list(ep.frames)[:len(cameras)]
        if len(names) < len(cameras):
            raise ValueError(f"{source} has cameras {sorted(ep.frames)}; the model takes {list(cameras)}")
    frames = np.stack([resize_square(ep.frames[n], image_size) for n in names], axis=1)
    states = np.asarray(ep.state, np.float32)
    if states.shape[1] != state_dim:
        raise ValueError(f"{source}: its states have {states.shape[1]} columns; the embodiment has {state_dim}")
    return frames, states, f"{source} episode {index}"
