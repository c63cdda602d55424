"""Closed-loop Meta-World v3 rollouts of a chunk policy, sync (Alg. 1) or async (Alg. 2), across worker processes.

Episode ``i`` of a task runs goal/object variant ``i`` of ``metaworld.MT1(task, seed=eval_seed)`` with sampler seed
``episode_seed(eval_seed, i)``: with the default ``eval_seed`` 1 these are 50 goal positions the demonstrations
(collected with seed 0) never showed. Everything in an episode is seeded, so the same seed gives the same episode.

An episode is driven the way a robot is: a ``MetaWorldRobot`` under the edge runtime (``RobotRuntime``) talks to the
policy server's engine in process (``InProcessClient``: the wire contract without a network). The runtime re-maps
each step's unified target to the Sawyer's native [dx, dy, dz, grip] against the live hand position, clipped to the
limits; in async mode the server imagines the executing chunk (FDM) and plans the next one while the robot steps. The
simulator runs in lockstep with the policy (``Timing.lockstep``): every chunk is awaited, nothing is held, so the
actions are the model's whatever the machine's load, and a fleet robot on the same variant against an endpoint
serving the same model executes the same ones. Unpaced by default; with ``control_rate_hz`` the robot steps in real
time, so episode wall times compare sync and async at the robot's rate. A chunk with NaN/inf actions ends the episode
as a failure (``nan``) instead of reaching the simulator.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")

import numpy as np
import torch

from model.policy import ChunkPolicy
from pipelines.data.embodiments import get_adapter
from services.policy_server.inprocess import InProcessClient
from services.robot_client.metaworld import MetaWorldRobot, episode_seed
from services.robot_client.robot import Observation, StepOutcome
from services.robot_client.runtime import RobotRuntime
from services.robot_client.schedule import Timing
from services.robot_client.settings import RobotSettings

MODES = ("sync", "async")


@dataclass
class EpisodeResult:
    task: str
    index: int
    success: bool
    steps: int
    steps_to_success: int | None
    progress: float
    wall_s: float
    chunks: int
    nan: bool = False
    error: str | None = None
    video: str | None = None
    plan_s: list[float] = field(default_factory=list)  # the policy's time per chunk request (in-process round trips)
    actions_digest: str = ""  # sha1 of the native actions executed (determinism checks)


class _GateRobot(MetaWorldRobot):
    """The Meta-World robot, keeping what the gate reports beyond the runtime's stats: the task's best progress and,
    when filming, every frame it saw (the first one and one per step)."""

    def __init__(self, *args, film: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress = 0.0
        self.frames: list[np.ndarray] | None = [] if film else None

    def _observe(self) -> Observation:
        obs = super()._observe()
        if self.frames is not None:
            self.frames.append(obs.frames)
        return obs

    def _step(self, action: np.ndarray) -> StepOutcome:
        outcome = super()._step(action)
        self.progress = max(self.progress, outcome.info["progress"])
        return outcome


def run_episode(policy, task: str, index: int, *, mode: str = "sync", eval_seed: int = 1, max_steps: int | None = None,
                control_rate_hz: float | None = None, video_path: Path | None = None,
                video_only_failure: bool = False) -> EpisodeResult:
    """One closed-loop episode of ``policy`` (a ``ChunkPolicy``) on variant ``index`` of ``task``.

    ``video_path``: write the real frames next to the imagined ones there (with ``video_only_failure``: only if the
    episode fails)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    film = video_path is not None
    robot = _GateRobot(task, index, eval_seed, cameras=policy.cameras, image_size=policy.image_size or 96, film=film)
    # every field that shapes the episode is given: a robot's LINGBOT_ROBOT_* environment must not change the gate
    settings = RobotSettings(robot_id="gate", endpoint=InProcessClient.endpoint, transport="grpc", mode=mode,
                             max_resets=0, max_steps=max_steps, hold_action=None, episode_timeout_s=math.inf,
                             canary_endpoint=None, canary_percent=0)
    try:
        with contextlib.closing(InProcessClient.serving(policy, record=film)) as client, \
                RobotRuntime(robot, settings, client=client, timing=Timing.lockstep(control_rate_hz)) as runtime:
            stats = runtime.run_episode(task, episode_id=f"{task}-{index}", seed=episode_seed(eval_seed, index))
    finally:
        robot.close()
    nan = stats.nan_chunks > 0
    result = EpisodeResult(task, index, stats.success, stats.steps, stats.steps_to_success,
                           1.0 if stats.success else robot.progress, stats.wall_s, stats.chunks, nan=nan,
                           error=None if nan else stats.error, plan_s=[ms / 1000 for ms in stats.latency_ms],
                           actions_digest=stats.actions_digest)
    if film and robot.frames and result.error is None and not (video_only_failure and result.success):
        # lockstep: chunk c ran steps c*N .. c*N+N-1 (the last one possibly cut short); later plans never ran
        n = policy.steps_per_chunk
        imagined = [(plan.latents, min(n, result.steps - c * n)) for c, plan in enumerate(client.plans[:result.chunks])]
        try:
            result.video = str(_write_video(video_path, robot.frames, imagined, client.episode, len(policy.cameras)))
        except Exception as exc:  # a video is a nice-to-have; never fail the episode for it
            warnings.warn(f"rollout video {video_path} not written: {exc}", stacklevel=1)
    return result


def _write_video(path: Path, real: list[np.ndarray], imagined: list, ep, views: int, fps: int = 20) -> Path:
    """Real camera views (top row) next to the model's imagined frames for the same steps (bottom row)."""
    import av

    real_rows = [np.concatenate(list(f), axis=1) for f in real]  # (H, V*W, 3) per step
    h, w = real_rows[0].shape[:2]
    imag_rows = [np.zeros_like(real_rows[0])]  # nothing imagined for the first frame
    for latents, steps in imagined:
        decoded = ep.decode(latents)  # (T', H, V*W, 3)
        idx = np.linspace(0, len(decoded) - 1, steps).round().astype(int)
        imag_rows.extend(decoded[i][:h, :w] for i in idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, 2 * h, "yuv420p"
        for top, bottom in zip(real_rows, imag_rows, strict=False):
            frame = np.concatenate([top, bottom], axis=0)
            if w % 2:
                frame = np.pad(frame, ((0, 0), (0, 1), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- many episodes ----------------------------------------------------------------------------------------------

_POLICY = None


def _init_worker(model_dir: str | Callable, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    global _POLICY
    _POLICY = model_dir() if callable(model_dir) else ChunkPolicy.load(model_dir, get_adapter, device=device)


def _job(args: tuple) -> dict:
    task, index, kwargs = args
    video = kwargs.pop("video_path", None)
    return asdict(run_episode(_POLICY, task, index, video_path=Path(video) if video else None, **kwargs))


def evaluate(model_dir: str | Path | Callable, tasks: list[str], *, episodes: int = 50, mode: str = "sync", eval_seed: int = 1,
             workers: int = 2, max_steps: int | None = None, control_rate_hz: float | None = None,
             videos_per_task: int = 1, failure_videos_per_task: int = 0, video_dir: Path | None = None,
             device: str = "cpu", progress: Callable[[dict], None] | None = None) -> dict:
    """Roll out ``episodes`` episodes per task in ``workers`` processes; returns the report the gate reads.

    With ``video_dir``, the first ``videos_per_task`` episodes of a task are filmed, and so are the first
    ``failure_videos_per_task`` failed episodes after them (what a reviewer needs to see why the policy fails).

    ``model_dir`` is a model directory, or a picklable factory of another policy with ``ChunkPolicy``'s rollout
    interface (e.g. ``functools.partial(ReplayPolicy, episodes_dir)``, the blind-replay baseline).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # fail fast (bad directory, unknown task) before forking
    known = model_dir().tasks if callable(model_dir) else ChunkPolicy.load(model_dir, get_adapter).tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"the model has no instruction for tasks {unknown}; it was trained on {known}")
    jobs = []
    for task in tasks:
        for i in range(episodes):
            kw = {"mode": mode, "eval_seed": eval_seed, "max_steps": max_steps, "control_rate_hz": control_rate_hz}
            if video_dir is not None and (i < videos_per_task or failure_videos_per_task > 0):
                kw["video_path"] = str(Path(video_dir) / f"{task}-{i:02d}-{mode}.mp4")
                kw["video_only_failure"] = i >= videos_per_task
            jobs.append((task, i, kw))
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    source = model_dir if callable(model_dir) else str(model_dir)  # what each worker builds its policy from
    results = []
    t0 = time.perf_counter()
    if workers <= 1:
        _init_worker(source, device, threads)
        for job in jobs:
            results.append(_job(job))
            if progress:
                progress(results[-1])
    else:
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked GL or torch thread state
        with ctx.Pool(workers, initializer=_init_worker, initargs=(source, device, threads)) as pool:
            for r in pool.imap(_job, jobs):
                results.append(r)
                if progress:
                    progress(r)
    _keep_first_failure_videos(results, videos_per_task, failure_videos_per_task)
    return summarize(results, mode=mode, eval_seed=eval_seed, wall_s=time.perf_counter() - t0)


def _keep_first_failure_videos(results: list[dict], videos_per_task: int, failures: int) -> None:
    """Workers film every failed episode (which ones fail is known only at the end); keep the first ``failures``
    of each task after its first ``videos_per_task`` episodes, by episode index, and delete the rest."""
    kept: dict[str, int] = {}
    for r in sorted(results, key=lambda r: (r["task"], r["index"])):
        if r["index"] < videos_per_task or not r["video"]:
            continue
        if kept.get(r["task"], 0) < failures:
            kept[r["task"]] = kept.get(r["task"], 0) + 1
        else:
            Path(r["video"]).unlink(missing_ok=True)
            r["video"] = None


def summarize(results: list[dict], *, mode: str, eval_seed: int, wall_s: float | None = None) -> dict:
    """Per-task and overall numbers of a list of ``EpisodeResult`` dicts."""
    tasks: dict[str, dict] = {}
    for task in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == task]
        wins = [r["steps_to_success"] for r in rs if r["success"]]
        plans = [s for r in rs for s in r["plan_s"]]
        tasks[task] = {
            "episodes": len(rs), "successes": sum(r["success"] for r in rs),
            "success_rate": sum(r["success"] for r in rs) / len(rs),
            "progress": float(np.mean([r["progress"] for r in rs])),
            "steps_to_success": float(np.mean(wins)) if wins else None,
            "episode_wall_s": float(np.mean([r["wall_s"] for r in rs])),
            "plan_ms_p50": float(np.median(plans) * 1000) if plans else None,
            "nan_episodes": sum(r["nan"] for r in rs), "errors": sum(r["error"] is not None for r in rs),
            "error_examples": sorted({r["error"] for r in rs if r["error"]})[:3],
            "videos": [r["video"] for r in rs if r["video"]],
        }
    rates = [t["success_rate"] for t in tasks.values()]
    return {
        "mode": mode, "eval_seed": eval_seed, "tasks": tasks,
        "avg_success": float(np.mean(rates)) if rates else math.nan,
        "episodes": len(results), "nan_episodes": sum(t["nan_episodes"] for t in tasks.values()),
        "errors": sum(t["errors"] for t in tasks.values()),
        "episode_wall_s": float(np.mean([r["wall_s"] for r in results])) if results else math.nan,
        "wall_s": wall_s,
    }


def plot_csv(report: dict) -> tuple[str, str]:
    """The evaluate stages' ``dvc plots`` data, one row per task: (success: task, success_rate, progress,
    episodes; latency: task, plan_ms_p50 (one chunk's planning), episode_wall_s)."""
    def rows(columns: tuple[str, ...]) -> str:
        lines = [",".join(("task", *columns))]
        for name, t in report["tasks"].items():
            lines.append(",".join([name, *("" if t.get(c) is None else str(t.get(c)) for c in columns)]))
        return "\n".join(lines) + "\n"

    return rows(("success_rate", "progress", "episodes")), rows(("plan_ms_p50", "episode_wall_s"))


def table(report: dict) -> str:
    """The per-task table as aligned text."""
    head = f"{'task':<26}{'success':>9}{'progress':>10}{'steps':>8}{'wall s':>8}{'nan':>5}{'err':>5}"
    lines = [head, "-" * len(head)]
    for task, t in report["tasks"].items():
        steps = f"{t['steps_to_success']:.0f}" if t["steps_to_success"] is not None else "-"
        lines.append(f"{task:<26}{t['success_rate']:>9.2f}{t['progress']:>10.2f}{steps:>8}{t['episode_wall_s']:>8.1f}"
                     f"{t['nan_episodes']:>5}{t['errors']:>5}")
    lines.append(f"{'average (' + report['mode'] + ')':<26}{report['avg_success']:>9.2f}")
    return "\n".join(lines)
