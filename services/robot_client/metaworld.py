"""A simulated Sawyer in Meta-World v3 as a ``Robot``: the robot the gate evaluates on and the fleet simulates.

Variant ``i`` of ``task`` is goal/object variant ``i`` of ``metaworld.MT1(task, seed=eval_seed)`` (``make_env``);
frames come from the same ``CameraRig`` the demonstrations were rendered with, so a served model sees what it was
trained and evaluated on. State is ``sawyer_state``: hand x, y, z and gripper opening; native actions are
[dx, dy, dz, grip] in [-1, 1]. ``episode_seed`` gives the policy's sampler seed for variant ``i``, so the gate and a
fleet robot running that variant run the same episode.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import metaworld
import numpy as np

from pipelines.data.embodiments import METAWORLD_CAMERAS, get_adapter
from pipelines.data.metaworld_collect import EMBODIMENT, CameraRig, resolve_tasks, sawyer_state
from services.robot_client.robot import Observation, Robot, RobotLimits, StepOutcome


def make_env(task: str, variant: int, eval_seed: int):
    """The Meta-World env of ``task`` set to goal/object variant ``variant`` of ``MT1(task, seed=eval_seed)``."""
    bench = metaworld.MT1(task, seed=eval_seed)
    env = bench.train_classes[task]()
    env.seed(eval_seed + variant)
    env.set_task(bench.train_tasks[variant % len(bench.train_tasks)])
    return env


def episode_seed(eval_seed: int, variant: int) -> int:
    """The policy's sampler seed for the episode on ``variant`` (sent at reset): one episode, wherever it runs."""
    return 1000 * eval_seed + variant


class MetaWorldRobot(Robot):
    """Meta-World's Sawyer on variant ``variant`` of ``task``; the episode ends (``done``) at the env's horizon."""

    def __init__(self, task: str, variant: int = 0, eval_seed: int = 1,
                 cameras: Sequence[str] = METAWORLD_CAMERAS, image_size: int = 96) -> None:
        (self.task,) = resolve_tasks([task])
        if not isinstance(image_size, int) or not 8 <= image_size <= 2048:
            raise ValueError(f"image_size must be an int in [8, 2048], got {image_size!r}")
        spec = get_adapter(EMBODIMENT).spec
        self.embodiment = EMBODIMENT
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self.limits = RobotLimits(spec.action_low, spec.action_high)
        self.variant, self.eval_seed = variant, eval_seed
        self._env = make_env(self.task, variant, eval_seed)
        try:
            self._rig = CameraRig(self._env.model, self._env.data, self.cameras, image_size)
        except Exception:
            self._env.close()
            raise
        self._obs: np.ndarray | None = None
        self._done = False
        self.steps = 0

    @property
    def horizon(self) -> int:
        """Env steps an episode may take (Meta-World truncates at ``max_path_length``)."""
        return int(self._env.max_path_length)

    @property
    def seed(self) -> int:
        """The policy's sampler seed for this robot's episode (``episode_seed``)."""
        return episode_seed(self.eval_seed, self.variant)

    def hold_action(self, last_action: np.ndarray | None) -> np.ndarray:
        """Stand still and keep the last gripper command: zero would half-open a closed gripper and drop the object."""
        grip = float(last_action[3]) if last_action is not None else -1.0  # reset posture: open
        return np.array([0.0, 0.0, 0.0, grip], np.float32)

    def _reset(self) -> Observation:
        self._obs, _ = self._env.reset()
        self._done, self.steps = False, 0
        return self._observe()

    def _observe(self) -> Observation:
        if self._obs is None:
            raise RuntimeError("call reset() before observe()")
        frames = np.stack(list(self._rig.render(self._env.data).values()))
        return Observation(frames=frames, state=sawyer_state(self._obs))

    def _step(self, action: np.ndarray) -> StepOutcome:
        if self._obs is None or self._done:
            raise RuntimeError("the episode is over (horizon reached); call reset() first")
        with warnings.catch_warnings():  # gymnasium's passive checker warns about float64 obs on every step
            warnings.simplefilter("ignore")
            self._obs, _, _, truncated, info = self._env.step(action)
        self.steps += 1
        self._done = bool(truncated) or self.steps >= self.horizon
        return StepOutcome(success=bool(info.get("success", False)), done=self._done,
                           info={"progress": float(info.get("in_place_reward", 0.0))})

    def close(self) -> None:
        self._rig.close()
        self._env.close()
