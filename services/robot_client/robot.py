"""The robot side of the edge runtime: a small interface every robot (real or simulated) implements.

A ``Robot`` is driven from one thread only (the runtime's executor): ``reset`` once per episode, then ``observe`` /
``step`` at the control rate. ``step`` is the last line of defence: it refuses NaN/inf and out-of-limit commands
with a ``ValueError`` before anything reaches the hardware, whatever the caller did before it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RobotLimits:
    """Per-dimension bounds of the native action vector (A,)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or not self.low:
            raise ValueError(f"limits need equally long, non-empty low/high, got {self.low} and {self.high}")
        if any(lo > hi for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError(f"limits need low <= high, got {self.low} and {self.high}")

    @property
    def dim(self) -> int:
        """A: width of the native action vector."""
        return len(self.low)

    def contains(self, action: np.ndarray) -> bool:
        """Whether ``action`` (A,) is finite and inside the limits."""
        a = np.asarray(action, dtype=np.float64)
        return a.shape == (self.dim,) and bool(np.isfinite(a).all()) and bool(
            (a >= self.low).all() and (a <= self.high).all())

    def clip(self, action: np.ndarray) -> np.ndarray:
        """``action`` clipped into the limits (float32); the caller must have rejected NaN/inf already."""
        return np.clip(np.asarray(action, dtype=np.float64), self.low, self.high).astype(np.float32)


@dataclass
class Observation:
    """What the robot sees at one instant: one frame per camera and its proprioceptive state."""

    frames: np.ndarray  # (V, H, W, 3) uint8, in the robot's camera order
    state: np.ndarray  # (S,) float32


@dataclass
class StepOutcome:
    """The result of executing one native action."""

    success: bool  # the task is solved (the runtime ends the episode)
    done: bool  # the robot cannot continue this episode (e.g. a simulator's horizon); the runtime ends it
    info: dict[str, Any] = field(default_factory=dict)


class Robot(ABC):
    """One robot the runtime can drive. Subclasses implement ``_reset``, ``_observe``, ``_step`` and describe
    themselves with ``embodiment`` (a ``pipelines.data.embodiments`` adapter name), ``cameras``, ``image_size`` and
    ``limits``; the public methods add the checks every robot needs."""

    embodiment: str
    cameras: tuple[str, ...]
    image_size: int
    limits: RobotLimits

    def reset(self) -> Observation:
        """Start an episode; returns the first observation."""
        return self._checked(self._reset())

    def observe(self) -> Observation:
        """The current observation (frames after the last executed action, state now)."""
        return self._checked(self._observe())

    def step(self, action: np.ndarray) -> StepOutcome:
        """Execute one native action (A,); NaN/inf or out-of-limit actions raise ``ValueError`` and never run."""
        action = np.asarray(action, dtype=np.float32)
        if not self.limits.contains(action):
            raise ValueError(f"refusing action {action.tolist()}: it must be {self.limits.dim} finite values within "
                             f"low={list(self.limits.low)} high={list(self.limits.high)}")
        return self._step(action)

    def hold_action(self, last_action: np.ndarray | None) -> np.ndarray:
        """The safe command executed while no valid chunk is available. Default: all zeros (robots with
        delta/velocity commands stand still); override when zero is not safe (e.g. it would open a gripper)."""
        return np.zeros(self.limits.dim, np.float32)

    def close(self) -> None:
        """Release the robot's resources (simulators, renderers, connections)."""
        return None

    def __enter__(self) -> Robot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _reset(self) -> Observation: ...

    @abstractmethod
    def _observe(self) -> Observation: ...

    @abstractmethod
    def _step(self, action: np.ndarray) -> StepOutcome: ...

    def _checked(self, obs: Observation) -> Observation:
        frames = np.asarray(obs.frames)
        want = (len(self.cameras), self.image_size, self.image_size, 3)
        if frames.dtype != np.uint8 or frames.shape != want:
            raise RuntimeError(f"{type(self).__name__} returned frames {frames.dtype}{frames.shape}, "
                               f"expected uint8{want}")
        return Observation(frames=frames, state=np.asarray(obs.state, dtype=np.float32).reshape(-1))
