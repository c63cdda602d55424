"""The in-memory episode every data step exchanges (collect -> LeRobot files -> prepare -> encode)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Episode:
    """One demonstration in the robot's native spaces.

    frames:      camera key -> uint8 (T, H, W, 3) images, row 0 = top of the image
    actions:     (T, A_native) float32 native commands executed after observing frame t
    state:       (T, S) float32 proprioceptive state observed with frame t
    success:     (T,) bool per-step success flag
    task:        task name (e.g. "reach-v3"); instruction: its natural-language instruction
    embodiment:  key of the embodiment adapter that maps native actions to the unified 30-dim space
    state_names / action_names: optional names of the state / action columns (LeRobot's feature ``names``,
                 e.g. ``("x", "y", "z", "grip")``); None means unnamed (written as ``state_0``, ``action_0``, ...)
    """

    frames: dict[str, np.ndarray]
    actions: np.ndarray
    state: np.ndarray
    success: np.ndarray
    task: str
    instruction: str
    embodiment: str
    fps: int
    seed: int = -1
    extra: dict = field(default_factory=dict)
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        T = len(self.actions)
        if self.actions.ndim != 2 or self.state.ndim != 2:
            raise ValueError(f"actions and state must be 2-D (T, dim), got {self.actions.shape} and {self.state.shape}")
        if len(self.state) != T or len(self.success) != T:
            raise ValueError(f"episode lengths differ: actions {T}, state {len(self.state)}, success {len(self.success)}")
        for what, names, width in (("state", self.state_names, self.state.shape[1]),
                                   ("action", self.action_names, self.actions.shape[1])):
            if names is not None and (len(names) != width or not all(isinstance(n, str) and n for n in names)):
                raise ValueError(f"{what}_names must be {width} non-empty strings, got {names!r}")
        for key, f in self.frames.items():
            if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or len(f) != T:
                raise ValueError(f"camera {key!r} frames must be uint8 (T={T}, H, W, 3), got {f.dtype} {f.shape}")

    @property
    def length(self) -> int:
        return len(self.actions)
