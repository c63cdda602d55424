"""Scripted-expert demonstrations from Meta-World v3 (Sawyer arm), rendered from two cameras.

Each task's env is built through Meta-World's benchmark API (``metaworld.MT1(task, seed=...)``), so episode ``i`` of a
task uses goal/object variant ``i`` of that seeded benchmark (50 variants per task), and is driven by the task's
hand-written expert from ``metaworld.policies``. Only successful episodes are kept.

Recorded per step t (the ``Episode`` convention: frame/state observed first, then action t executed):

    frames[cam][t]  uint8 (H, W, 3) image, row 0 = top, upright (see ``camera_needs_rotation``)
    state[t]        ``sawyer_state(obs)``: hand x, y, z (m, world frame) and gripper opening (0 closed .. 1 open)
    actions[t]      the executed native action [dx, dy, dz, grip], the expert's output clipped to [-1, 1]
                    (the env clips xyz and the gripper actuators to that range anyway, so this is what ran)
    success[t]      ``info["success"]`` returned by the step that executed action t

fps is ``CONTROL_RATE_HZ`` = 80: one env step is frame_skip 5 x MuJoCo timestep 2.5 ms = 12.5 ms (Meta-World's
``metadata["render_fps"]`` is also 80).

Rendering uses one offscreen ``mujoco.Renderer`` per env with shadows, reflections and multisampling off
(the scene's defaults, a 4096 px shadow map and 4x multisampling, make OSMesa ~8x slower at 96 px: ~18 vs ~160 fps).
"""

from __future__ import annotations

import difflib
import os
import shutil
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# Headless by default: MuJoCo picks its GL backend when it is first imported, so this must precede the imports below.
os.environ.setdefault("MUJOCO_GL", "osmesa")

import metaworld
import metaworld.env_dict
import mujoco
import numpy as np
from metaworld.policies import ENV_POLICY_MAP
from metaworld.policies.policy import Policy
from metaworld.sawyer_xyz_env import SawyerXYZEnv

from pipelines.data.embodiments import METAWORLD_CAMERAS, METAWORLD_VIEWS, CameraCrop, get_adapter
from pipelines.data.episode import Episode

EMBODIMENT = "metaworld-sawyer"
CONTROL_RATE_HZ = 80
DEFAULT_CAMERAS: tuple[str, ...] = METAWORLD_CAMERAS
STATE_KEYS = ("hand_x", "hand_y", "hand_z", "gripper_opening")
ACTION_KEYS = ("dx", "dy", "dz", "grip")
VARIANTS_PER_TASK = 50  # Meta-World's benchmark makes 50 goal/object variants per task
LOSSLESS_CODEC = "libx264rgb"
POST_SUCCESS_STEPS = 10  # keep a short settled tail after the first success so the end state is visible

MT10: tuple[str, ...] = tuple(metaworld.env_dict.MT10_V3)
MT50: tuple[str, ...] = tuple(metaworld.env_dict.MT50_V3)

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and dunk it into the hoop",
    "bin-picking-v3": "pick the puck out of one bin and place it into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button down from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button down from the top",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "reach around the wall and press the button from the front",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the nut up off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck, lift it over the wall and place it at the goal",
    "pick-out-of-hole-v3": "pick the peg up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "pick up the peg and insert it into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the hole sideways",
    "soccer-v3": "push the soccer ball into the goal",
    "stick-push-v3": "pick up the stick and push the thermos to the goal with it",
    "stick-pull-v3": "pick up the stick and pull the thermos to the goal with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the red goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from ``"MT10"``, ``"MT50"``, a comma-separated list (``"reach-v3,push-v3"``) or a sequence of names.

    Order is kept and duplicates dropped; unknown names raise a ValueError naming them (with close matches).
    """
    if isinstance(spec, str):
        if spec.strip().upper() in ("MT10", "MT50"):
            return list(MT10 if spec.strip().upper() == "MT10" else MT50)
        names = [s.strip() for s in spec.split(",")]
    else:
        names = [str(s).strip() for s in spec]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ValueError(f"no Meta-World task given in {spec!r}; use 'MT10', 'MT50' or names like 'reach-v3,push-v3'")
    unknown = [n for n in names if n not in MT50]
    if unknown:
        hints = {n: difflib.get_close_matches(n, MT50, n=1) for n in unknown}
        detail = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        raise ValueError(f"unknown Meta-World task(s): {detail}; valid: 'MT10', 'MT50' or any of the {len(MT50)} v3 task names")
    return names


def sawyer_state(obs: np.ndarray) -> np.ndarray:
    """The Sawyer's state (``STATE_KEYS``) in a Meta-World v3 observation, whose first four entries it is: (4,) float32.
    Demonstrations record it and robots report it, so both read it here."""
    return np.asarray(obs[:4], np.float32)


def task_seed(seed: int, task: str) -> int:
    """Per-task seed derived from (seed, task name) only, so results do not depend on worker scheduling."""
    return zlib.crc32(f"{int(seed)}:{task}".encode()) & 0x7FFFFFFF


def _block_seed(seed: int, block: int) -> int:
    """MT1 seed for variants ``50*block .. 50*block+49``: block 0 is ``seed`` itself, later blocks fresh variants."""
    return seed if block == 0 else zlib.crc32(f"{seed}:block{block}".encode()) & 0x7FFFFFFF


def camera_needs_rotation(model: mujoco.MjModel, data: mujoco.MjData, camera: str) -> bool:
    """Whether ``camera``'s image must be rotated 180 degrees to be upright.

    ``mujoco.Renderer`` already returns row 0 = top of the camera's own frame, but Meta-World's fixed "corner"
    cameras are mounted rolled ~180 degrees (their image-up axis points down in the world), so the scene comes out
    upside down. Rotating by 180 degrees (not a vertical flip, which would mirror the scene and reverse left/right and
    rotation directions) is exactly what an upright camera at the same pose would see. Cameras looking straight down
    (e.g. the wrist camera) have no "up" and are left alone.
    """
    cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    image_up_world_z = data.cam_xmat[cam_id].reshape(3, 3)[2, 1]  # z component of the camera's +y (image up) axis
    return bool(image_up_world_z < -0.1)


class CameraRig:
    """Renders several views of one env with a single fast offscreen renderer.

    A view is a scene camera or a derived view of ``views`` (default ``METAWORLD_VIEWS``: zoomed crops of a scene
    camera, rendered through an off-centre frustum at the full size).
    """

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, cameras: Sequence[str], size: int,
                 views: Mapping[str, CameraCrop] = METAWORLD_VIEWS) -> None:
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        self.crops = {c: views[c] for c in cameras if c not in names and c in views}
        base = {c: self.crops[c].camera if c in self.crops else c for c in cameras}
        unknown = [c for c in cameras if base[c] not in names]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; the Sawyer scene has {names} and the derived views "
                             f"{sorted(views)}")
        # Speed: no shadow map pass, no multisample buffer; must be set before the GL context is made.
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        self.renderer = mujoco.Renderer(model, size, size)
        flags = self.renderer.scene.flags  # persist across update_scene calls
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        mujoco.mj_forward(model, data)
        self.cameras = tuple(cameras)
        self.base = base
        self.rotate = {c: camera_needs_rotation(model, data, base[c]) for c in self.cameras}

    def _crop(self, crop: CameraCrop, rotated: bool) -> None:
        """Narrow the frustum mjv_updateScene set from the camera's fovy to the crop's window (square images: the
        horizontal extent follows from the aspect ratio, so frustum_width stays 0)."""
        u, v = (-crop.center[0], -crop.center[1]) if rotated else crop.center  # the raw render is the image rotated
        for glcam in self.renderer.scene.camera:
            half = (glcam.frustum_top - glcam.frustum_bottom) / 2
            mid = (glcam.frustum_top + glcam.frustum_bottom) / 2 + v * half
            glcam.frustum_center = glcam.frustum_center + u * half
            glcam.frustum_bottom = mid - half / crop.zoom
            glcam.frustum_top = mid + half / crop.zoom

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        out = {}
        for cam in self.cameras:
            self.renderer.update_scene(data, camera=self.base[cam])
            if cam in self.crops:
                self._crop(self.crops[cam], self.rotate[cam])
            img = self.renderer.render()
            out[cam] = np.ascontiguousarray(img[::-1, ::-1]) if self.rotate[cam] else img
        return out

    def close(self) -> None:
        self.renderer.close()


def _validate(episodes: int, image_size: int, cameras: Sequence[str], max_steps: int | None, max_attempts_factor: int) -> None:
    if not isinstance(episodes, int) or episodes < 0:
        raise ValueError(f"episodes must be a non-negative int, got {episodes!r}")
    if not isinstance(image_size, int) or not 8 <= image_size <= 2048:
        raise ValueError(f"image_size must be an int in [8, 2048], got {image_size!r}")
    if isinstance(cameras, str) or not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras must be a non-empty sequence of distinct camera names, got {cameras!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if not isinstance(max_attempts_factor, int) or max_attempts_factor < 1:
        raise ValueError(f"max_attempts_factor must be an int >= 1, got {max_attempts_factor!r}")


def collect_task(
    task: str,
    episodes: int,
    *,
    seed: int = 0,
    image_size: int = 96,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    max_steps: int | None = None,
    max_attempts_factor: int = 3,
    post_success_steps: int = POST_SUCCESS_STEPS,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Episode], int]:
    """Roll out the scripted expert of ``task`` until ``episodes`` successful episodes are recorded.

    Attempt j uses variant ``j % 50`` of ``metaworld.MT1(task, seed=...)`` (seed ``seed`` for the first 50, derived
    seeds after), so episode i is variant i unless earlier attempts failed. An episode ends ``post_success_steps``
    steps after the first success, or after ``max_steps`` (default and cap: the env's max path length, 500).
    At most ``episodes * max_attempts_factor`` attempts are made; failed ones are discarded.

    Returns (successful episodes, number discarded). Deterministic for a given seed. ``progress(1)`` is called after
    every kept episode.
    """
    (task,) = resolve_tasks([task])
    _validate(episodes, image_size, cameras, max_steps, max_attempts_factor)
    if not isinstance(seed, int) or not 0 <= seed < 2**32:  # numpy's legacy seeding (used by MT1) needs uint32
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if post_success_steps < 0:
        raise ValueError(f"post_success_steps must be >= 0, got {post_success_steps}")
    adapter = get_adapter(EMBODIMENT)

    kept: list[Episode] = []
    discarded = 0
    if episodes == 0:
        return kept, discarded
    bench = metaworld.MT1(task, seed=seed)
    env = bench.train_classes[task]()
    env.seed(seed)
    if not np.isclose(env.action_scale, adapter.action_scale):
        raise RuntimeError(f"metaworld action_scale {env.action_scale} != adapter's {adapter.action_scale}; update the adapter")
    horizon = min(max_steps or env.max_path_length, env.max_path_length)  # the env refuses to step past its horizon
    policy = ENV_POLICY_MAP[task]()
    rig = CameraRig(env.model, env.data, cameras, image_size)
    block = 0
    try:
        for attempt in range(episodes * max_attempts_factor):
            if len(kept) == episodes:
                break
            if attempt // VARIANTS_PER_TASK != block:
                block = attempt // VARIANTS_PER_TASK
                bench = metaworld.MT1(task, seed=_block_seed(seed, block))
            variant = attempt % VARIANTS_PER_TASK
            env.set_task(bench.train_tasks[variant])
            episode = _rollout(env, policy, rig, horizon, post_success_steps)
            if episode is None:
                discarded += 1
                continue
            frames, actions, state, success, first_success = episode
            kept.append(
                Episode(
                    frames=frames,
                    actions=actions,
                    state=state,
                    success=success,
                    task=task,
                    instruction=INSTRUCTIONS[task],
                    embodiment=EMBODIMENT,
                    fps=CONTROL_RATE_HZ,
                    seed=seed,
                    extra={
                        "benchmark": "MT1",
                        "benchmark_seed": _block_seed(seed, block),
                        "variant": variant,
                        "attempt": attempt,
                        "first_success_step": first_success,
                        "state_keys": list(STATE_KEYS),
                        "action_keys": list(ACTION_KEYS),
                        "rotated_180": [c for c in rig.cameras if rig.rotate[c]],
                        "action_scale": float(env.action_scale),
                    },
                    state_names=STATE_KEYS,
                    action_names=ACTION_KEYS,
                )
            )
            if progress is not None:
                progress(1)
    finally:
        rig.close()
        env.close()
    return kept, discarded


def _rollout(
    env: SawyerXYZEnv, policy: Policy, rig: CameraRig, horizon: int, post_success_steps: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, int] | None:
    """One episode from ``env.reset()``: (frames, actions, state, success, first success step), None on failure."""
    obs, _ = env.reset()
    frames: dict[str, list[np.ndarray]] = {c: [] for c in rig.cameras}
    actions, states, successes = [], [], []
    first_success: int | None = None
    for t in range(horizon):
        for cam, img in rig.render(env.data).items():
            frames[cam].append(img)
        states.append(sawyer_state(obs))
        with warnings.catch_warnings():  # the experts warn whenever their P-gain saturates; harmless and very noisy
            warnings.simplefilter("ignore")
            action = np.clip(policy.get_action(obs), -1.0, 1.0).astype(np.float32)
        obs, _, _, truncated, info = env.step(action)
        actions.append(action)
        successes.append(bool(info["success"]))
        if successes[-1] and first_success is None:
            first_success = t
        if truncated or (first_success is not None and t - first_success >= post_success_steps):
            break
    if first_success is None:
        return None
    return (
        {c: np.stack(f) for c, f in frames.items()},
        np.stack(actions).astype(np.float32),
        np.stack(states).astype(np.float32),
        np.array(successes, dtype=bool),
        first_success,
    )


# --- parallel collection ----------------------------------------------------------------------------------------

_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
    global _PROGRESS_QUEUE
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    _PROGRESS_QUEUE = queue


def dataset_name(task: str) -> str:
    """Folder name of a task's LeRobot dataset under the episodes directory."""
    return f"metaworld-{task}"


def _worker(task: str, episodes: int, seed: int, image_size: int, cameras: tuple[str, ...], out_dir: Path | None,
            progress=None) -> tuple[list[Episode] | int, int]:
    queue = _PROGRESS_QUEUE
    if progress is None and queue is not None:
        progress = lambda n: queue.put((task, n))
    eps, n_bad = collect_task(task, episodes, seed=seed, image_size=image_size, cameras=cameras, progress=progress)
    if out_dir is None:
        return eps, n_bad
    # written inside the worker so a whole suite never sits in memory (MT10 x 50 is ~4 GB of frames)
    if eps:
        from pipelines.data.lerobot.writer import write_lerobot_dataset

        target = Path(out_dir) / dataset_name(task)
        if target.exists():
            shutil.rmtree(target)
        # lossless (RGB h264 at crf 0): training must see the very pixels the simulator renders at evaluation; a
        # lossy codec shifts the latents by more than a goal position does
        write_lerobot_dataset(target, eps, robot_type="sawyer", fps=CONTROL_RATE_HZ, video_codec=LOSSLESS_CODEC, crf=0)
    return len(eps), n_bad


def collect(
    tasks: Sequence[str],
    episodes: int,
    *,
    seed: int = 0,
    image_size: int = 96,
    workers: int = 2,
    progress: bool = True,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    out_dir: Path | None = None,
) -> dict[str, tuple[list[Episode] | int, int]]:
    """``collect_task`` for each task, one task per worker process; returns {task: (episodes, discarded)} in order.

    With ``out_dir`` each task's episodes are written by its worker as the LeRobot dataset
    ``out_dir/metaworld-<task>`` (replacing an older one) and the result holds their count instead of the episodes.

    Task ``name`` is collected with seed ``task_seed(seed, name)``, so results are identical for any ``workers``
    (``workers=1`` runs in this process). Workers are started with the "spawn" context (MuJoCo / OpenGL state does
    not survive ``fork``), so a calling script needs the usual ``if __name__ == "__main__":`` guard.
    A progress bar counts kept episodes per task; its postfix shows how many failed attempts were discarded.
    """
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    tasks = resolve_tasks(tasks)
    _validate(episodes, image_size, cameras, None, 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    cameras = tuple(cameras)
    results: dict[str, tuple[list[Episode], int]] = {}
    bar = tqdm(total=len(tasks) * episodes, unit="ep", desc="metaworld", disable=not progress)
    discarded = 0
    try:
        if workers == 1:  # in-process: same seeds, so the same episodes as the parallel path
            for task in tasks:
                results[task] = _worker(task, episodes, task_seed(seed, task), image_size, cameras, out_dir, bar.update)
                discarded += results[task][1]
                kept = results[task][0]
                bar.update(episodes - (kept if isinstance(kept, int) else len(kept)))  # complete short tasks
                bar.set_postfix(discarded=discarded)
            return results
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(q,)
        ) as pool:
            futures = {t: pool.submit(_worker, t, episodes, task_seed(seed, t), image_size, cameras, out_dir) for t in tasks}
            pending = set(futures.values())
            try:
                while pending:
                    try:
                        _, n = q.get(timeout=0.2)
                        bar.update(n)
                    except queue_mod.Empty:
                        pass
                    for task, fut in futures.items():
                        if fut in pending and fut.done():
                            pending.discard(fut)
                            eps, n_bad = fut.result()  # re-raises a worker's exception here
                            results[task] = (eps, n_bad)
                            discarded += n_bad
                            bar.set_postfix(discarded=discarded)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # do not run the queued tasks after a failure
                raise
            while True:  # drain late progress messages so the bar ends complete
                try:
                    bar.update(q.get_nowait()[1])
                except queue_mod.Empty:
                    break
        bar.update(bar.total - bar.n)
        return {t: results[t] for t in tasks}
    finally:
        bar.close()
