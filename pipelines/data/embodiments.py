"""Per-embodiment adapters between a robot's native action/state spaces and the model's unified 30-dim action space.

The unified space (shared by every embodiment so one model can train on all of them):

    0-6    left end-effector: absolute xyz target (m) + orientation quaternion (w, x, y, z)
    7-13   right end-effector, same layout
    14-20  left arm joint positions
    21-27  right arm joint positions
    28     left gripper command
    29     right gripper command

A single-arm robot uses the "left" channels. Channels an embodiment does not drive are 0 and masked out
(``EmbodimentAdapter.mask``) so the loss ignores them.

Adapters are looked up by the ``Episode.embodiment`` key through a small registry (``get_adapter``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

UNIFIED_DIM = 30
LEFT_EEF = slice(0, 7)
RIGHT_EEF = slice(7, 14)
LEFT_JOINTS = slice(14, 21)
RIGHT_JOINTS = slice(21, 28)
LEFT_GRIPPER = 28
RIGHT_GRIPPER = 29


def _mask_from(*channels: int | slice) -> tuple[bool, ...]:
    mask = np.zeros(UNIFIED_DIM, dtype=bool)
    for c in channels:
        mask[c] = True
    return tuple(bool(m) for m in mask)


@dataclass(frozen=True)
class Embodiment:
    """Static description of one robot embodiment.

    name:               registry key, stored in ``Episode.embodiment``
    native_action_dim:  width A of the robot's native action vector
    state_dim:          width S of the recorded proprioceptive state
    channel_mask:       30 bools, True where the embodiment drives a unified channel
    action_low/high:    per native action dimension limits (the adapter clips to them)
    control_rate_hz:    native control rate (actions per second)
    camera_keys:        default camera names of recorded episodes
    """

    name: str
    native_action_dim: int
    state_dim: int
    channel_mask: tuple[bool, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    control_rate_hz: float
    camera_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("embodiment name must be a non-empty string")
        if self.native_action_dim < 1 or self.state_dim < 0:
            raise ValueError(
                f"embodiment {self.name!r}: native_action_dim must be >= 1 and state_dim >= 0, "
                f"got {self.native_action_dim} and {self.state_dim}"
            )
        if len(self.channel_mask) != UNIFIED_DIM:
            raise ValueError(
                f"embodiment {self.name!r}: channel_mask must have {UNIFIED_DIM} entries, got {len(self.channel_mask)}"
            )
        if len(self.action_low) != self.native_action_dim or len(self.action_high) != self.native_action_dim:
            raise ValueError(
                f"embodiment {self.name!r}: action_low/action_high must have native_action_dim={self.native_action_dim} "
                f"entries, got {len(self.action_low)} and {len(self.action_high)}"
            )
        if any(lo > hi for lo, hi in zip(self.action_low, self.action_high, strict=True)):
            raise ValueError(
                f"embodiment {self.name!r}: action_low must be <= action_high, got {self.action_low} and {self.action_high}"
            )
        if not self.control_rate_hz > 0:
            raise ValueError(f"embodiment {self.name!r}: control_rate_hz must be > 0, got {self.control_rate_hz}")

    @property
    def mask(self) -> np.ndarray:
        """(30,) bool array of the channels this embodiment drives."""
        return np.array(self.channel_mask, dtype=bool)

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class EmbodimentAdapter:
    """Maps one embodiment's native actions to and from the unified 30-dim space.

    Subclasses set ``spec`` and implement ``_to_unified`` / ``_to_native`` on validated float64 arrays; the public
    methods here do the shape / dtype / NaN checks, zero the unused channels and fix the output dtypes.
    """

    spec: Embodiment

    @property
    def name(self) -> str:
        """Registry key of the embodiment."""
        return self.spec.name

    @property
    def mask(self) -> np.ndarray:
        """(30,) bool array, True on the channels this embodiment drives."""
        return self.spec.mask

    def to_unified(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Native actions (T, A) with the state (T, S) observed before each -> unified (T, 30) float32."""
        actions = _check_array("actions", actions, self.spec.native_action_dim, self.name)
        state = _check_array("state", state, self.spec.state_dim, self.name)
        _check_lengths(("actions", actions), ("state", state))
        unified = np.asarray(self._to_unified(actions, state), dtype=np.float64)
        unified[:, ~self.mask] = 0.0  # guarantee the masked channels carry no signal
        return unified.astype(np.float32)

    def to_native(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Unified (T, 30) with the state (T, S) observed before each step -> native actions (T, A) float32.

        Masked channels are ignored; the result is clipped to the action limits so it is always a valid command.
        """
        unified = _check_array("unified", unified, UNIFIED_DIM, self.name)
        state = _check_array("state", state, self.spec.state_dim, self.name)
        _check_lengths(("unified", unified), ("state", state))
        native = np.asarray(self._to_native(unified, state), dtype=np.float64)
        native = np.clip(native, self.spec.action_low, self.spec.action_high)
        return native.astype(np.float32)

    def clip_actions(self, actions: np.ndarray) -> np.ndarray:
        """Native actions clipped to the embodiment's limits (float64)."""
        return np.clip(np.asarray(actions, dtype=np.float64), self.spec.action_low, self.spec.action_high)

    def _to_unified(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _to_native(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _check_array(what: str, x: np.ndarray, dim: int, embodiment: str) -> np.ndarray:
    """A finite float64 (T, dim) copy of ``x``, or a ValueError naming what is wrong."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":  # bool / object / string arrays are a caller mistake, not numbers to cast
        raise ValueError(f"{embodiment}: {what} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{embodiment}: {what} must have shape (T, {dim}), got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{embodiment}: {what} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    return arr


def _check_lengths(*named: tuple[str, np.ndarray]) -> None:
    lengths = {name: len(a) for name, a in named}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sequence lengths differ: {lengths}")


# --- Meta-World Sawyer -------------------------------------------------------------------------------------------

METAWORLD_ACTION_SCALE = 1.0 / 100
"""Metres of mocap motion per unit of action (``SawyerXYZEnv.action_scale`` default in metaworld 3.x)."""

METAWORLD_EEF_QUAT_WXYZ = (math.sqrt(0.5), 0.0, math.sqrt(0.5), 0.0)
"""The fixed hand orientation: ``SawyerXYZEnv.set_xyz_action`` writes ``mocap_quat = [1, 0, 1, 0]`` (MuJoCo w, x, y, z
order) every step, i.e. a 90-degree rotation about the world y axis (gripper pointing down); stored here normalised."""

@dataclass(frozen=True)
class CameraCrop:
    """A view derived from a scene camera: the square part of ``camera``'s upright image centred at ``center``
    (normalised image coordinates: u right, v up, each in [-1, 1]) and ``1 / zoom`` of its width, rendered at the full
    image size through an off-centre frustum, so it is what a crop of a ``zoom`` times larger render would show (same
    viewpoint and perspective), not an upscaled crop."""

    camera: str
    zoom: float
    center: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not self.zoom >= 1.0:
            raise ValueError(f"CameraCrop zoom must be >= 1, got {self.zoom}")
        u, v = self.center
        if max(abs(u), abs(v)) + 1.0 / self.zoom > 1.0 + 1e-9:
            raise ValueError(f"CameraCrop center {self.center} at zoom {self.zoom} reaches outside {self.camera}'s image")


METAWORLD_VIEWS: dict[str, CameraCrop] = {
    # corner4 cropped to the part the MT10 experts use: hands, objects and goals of 20 variants per task (seeds 0 and 1)
    # span u -0.39..0.76, v -0.45..0.45 of corner4's upright image (bench/results/camera_zoom.json), so this window
    # keeps them all inside its central ~87% and draws the scene 1.5x larger (0.48 -> 0.72 px per cm at 64 px)
    "corner4_zoom": CameraCrop("corner4", zoom=1.5, center=(0.18, 0.0)),
}
"""Derived views by name (``CameraRig`` renders them); a model directory names the views it was trained on."""

METAWORLD_CAMERAS = ("corner4_zoom", "gripperPOV")
"""Default views: "corner4_zoom" is the workspace part of "corner4", the widely used close-up third-person view (the
old "corner2" moved to (0.75, 0.075, 0.7)), drawn 1.5x larger (``METAWORLD_VIEWS``); "gripperPOV" is the wrist camera
looking down between the fingers. Datasets and models of other views keep working: encode reads every view of an
episode and a model directory names the views it was trained on."""


class MetaWorldAdapter(EmbodimentAdapter):
    """Meta-World's Sawyer arm: native action [dx, dy, dz, grip] in [-1, 1], state [hand x, y, z, gripper opening].

    The env moves its mocap target by ``clip(action[:3], -1, 1) * action_scale`` metres per step and never rotates
    the hand. The unified vector stores the ABSOLUTE end-effector target instead of the delta, so one model sees the
    same meaning across embodiments:

        unified[0:3] = hand_xyz_t + clip(a_t[:3], -1, 1) * action_scale   (hand_xyz_t = state[t, :3])
        unified[3:7] = METAWORLD_EEF_QUAT_WXYZ                              (constant; ignored by ``to_native``)
        unified[28]  = clip(a_t[3], -1, 1)                                  (+1 closes the gripper, -1 opens it)

    ``to_native`` inverts it: delta = (target - hand_xyz) / action_scale, grip = unified[28], clipped to [-1, 1].
    The target is relative to the observed hand position (not the env's internal mocap position, which it also clips
    to the workspace), so the mapping needs only recorded data and is exactly invertible.
    """

    def __init__(self, action_scale: float = METAWORLD_ACTION_SCALE) -> None:
        if not action_scale > 0:
            raise ValueError(f"action_scale must be > 0, got {action_scale}")
        self.action_scale = float(action_scale)
        self.spec = Embodiment(
            name="metaworld-sawyer",
            native_action_dim=4,
            state_dim=4,
            channel_mask=_mask_from(LEFT_EEF, LEFT_GRIPPER),
            action_low=(-1.0, -1.0, -1.0, -1.0),
            action_high=(1.0, 1.0, 1.0, 1.0),
            control_rate_hz=80.0,  # MuJoCo timestep 2.5 ms x frame_skip 5 = 12.5 ms per env step
            camera_keys=METAWORLD_CAMERAS,
        )

    def _to_unified(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        a = self.clip_actions(actions)
        out = np.zeros((len(a), UNIFIED_DIM))
        out[:, 0:3] = state[:, 0:3] + a[:, 0:3] * self.action_scale
        out[:, 3:7] = METAWORLD_EEF_QUAT_WXYZ
        out[:, LEFT_GRIPPER] = a[:, 3]
        return out

    def _to_native(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        delta = (unified[:, 0:3] - state[:, 0:3]) / self.action_scale
        return np.concatenate([delta, unified[:, LEFT_GRIPPER : LEFT_GRIPPER + 1]], axis=1)


# --- registry ----------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, EmbodimentAdapter] = {}


def register_adapter(adapter: EmbodimentAdapter, *, replace: bool = False) -> EmbodimentAdapter:
    """Make ``adapter`` available to ``get_adapter`` under ``adapter.name``; returns it.

    Registering a second adapter under a taken name is a ValueError unless ``replace=True``.
    """
    if not isinstance(adapter, EmbodimentAdapter):
        raise ValueError(f"expected an EmbodimentAdapter, got {type(adapter).__name__}")
    if adapter.name in _REGISTRY and not replace and _REGISTRY[adapter.name] is not adapter:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[adapter.name] = adapter
    return adapter


def get_adapter(name: str) -> EmbodimentAdapter:
    """The registered adapter for embodiment ``name`` (e.g. ``Episode.embodiment``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown embodiment {name!r}; known embodiments: {', '.join(sorted(_REGISTRY)) or 'none'}") from None


def available_embodiments() -> list[str]:
    """Names of the registered embodiments, sorted."""
    return sorted(_REGISTRY)


register_adapter(MetaWorldAdapter())
