"""Closed-loop Meta-World v3 rollouts of a chunk policy, sync (Alg. 1) or async (Alg. 2), across worker processes.

Episode ``i`` of a task runs goal/object variant ``i`` of ``metaworld.MT1(task, seed=eval_seed)``: with the default
``eval_seed`` 1 these are 50 goal positions the demonstrations (collected with seed 0) never showed. Everything in an
episode is seeded (env, flow sampler), so the same seed gives the same episode.

Per step the env is driven by the chunk's unified action converted back to the Sawyer's native [dx, dy, dz, grip]
against the hand position observed at that step, clipped to the embodiment's limits. A chunk with NaN/inf actions
ends the episode as a failure (``nan``) instead of reaching the simulator. In async mode the model imagines the
outcome of the chunk being executed (FDM) and plans the next one in a background thread while the env steps; with
``control_rate_hz`` the env is paced in real time, so episode wall times compare sync and async at the robot's rate.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
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
    plan_s: list[float] = field(default_factory=list)
    actions_digest: str = ""  # sha1 of the native actions executed (determinism checks)


def make_env(task: str, variant: int, eval_seed: int):
    import metaworld

    bench = metaworld.MT1(task, seed=eval_seed)
    env = bench.train_classes[task]()
    env.seed(eval_seed + variant)
    env.set_task(bench.train_tasks[variant % len(bench.train_tasks)])
    return env


def run_episode(policy, task: str, index: int, *, mode: str = "sync", eval_seed: int = 1, max_steps: int | None = None,
                control_rate_hz: float | None = None, video_path: Path | None = None,
                video_only_failure: bool = False) -> EpisodeResult:
    """One closed-loop episode of ``policy`` (a ``ChunkPolicy``) on variant ``index`` of ``task``.

    ``video_path``: write the real frames next to the imagined ones there (with ``video_only_failure``: only if the
    episode fails)."""
    from pipelines.data.metaworld_collect import CameraRig

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    env = make_env(task, index, eval_seed)
    size = policy.image_size or 96
    rig = CameraRig(env.model, env.data, policy.cameras, size)
    horizon = min(max_steps or env.max_path_length, env.max_path_length)
    result = EpisodeResult(task, index, False, 0, None, 0.0, 0.0, 0)
    real_video, imagined_video = [], []
    pool = concurrent.futures.ThreadPoolExecutor(1) if mode == "async" else None
    digest = hashlib.sha1()
    t_start = time.perf_counter()
    try:
        obs, _ = env.reset()
        views = lambda: np.stack([img for img in rig.render(env.data).values()])
        frames0 = views()
        ep = policy.episode(task, seed=1000 * eval_seed + index)
        ep.start(frames0)
        if video_path:
            real_video.append(frames0)
        plan = _timed(ep.plan, result)
        period = 1.0 / control_rate_hz if control_rate_hz else 0.0
        next_tick = time.perf_counter()
        while result.steps < horizon and not result.success:
            if not np.isfinite(plan.actions).all():
                result.nan = True
                break
            future = pool.submit(_imagine_and_plan, ep, plan, result) if pool else None
            frames, executed = [], []
            for unified in plan.actions:
                state = np.asarray(obs[:4], np.float64)
                native = policy.adapter.to_native(unified[None], state[None])[0]
                native = policy.adapter.clip_actions(native[None])[0].astype(np.float32)
                if period:
                    next_tick = max(next_tick + period, time.perf_counter() - period)
                    time.sleep(max(0.0, next_tick - time.perf_counter()))
                digest.update(native.tobytes())
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obs, _, _, truncated, info = env.step(native)
                result.steps += 1
                result.progress = max(result.progress, float(info.get("in_place_reward", 0.0)))
                frames.append(views())
                executed.append(policy.adapter.to_unified(native[None], state[None])[0])
                if info["success"]:
                    result.success, result.steps_to_success, result.progress = True, result.steps, 1.0
                if truncated or result.success or result.steps >= horizon:
                    break
            result.chunks += 1
            if video_path:
                real_video.extend(frames)
                imagined_video.append((plan.latents, len(frames)))
            if future is not None:
                next_plan = future.result()
            if result.success or len(frames) < len(plan.actions) or result.steps >= horizon:
                break
            ep.observe(np.stack(frames), np.stack(executed))
            plan = next_plan if future is not None else _timed(ep.plan, result)
            if not period:
                next_tick = time.perf_counter()
    except Exception as exc:  # an episode that breaks is a failed episode with a reason, never a crashed evaluator
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.wall_s = time.perf_counter() - t_start
        result.actions_digest = digest.hexdigest()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        rig.close()
        env.close()
    if video_path and real_video and result.error is None and not (video_only_failure and result.success):
        try:
            result.video = str(_write_video(video_path, real_video, imagined_video, ep, len(policy.cameras)))
        except Exception as exc:  # a video is a nice-to-have; never fail the episode for it
            result.error = None
            warnings.warn(f"rollout video {video_path} not written: {exc}", stacklevel=1)
    return result


def _timed(fn: Callable, result: EpisodeResult):
    t0 = time.perf_counter()
    out = fn()
    result.plan_s.append(time.perf_counter() - t0)
    return out


def _imagine_and_plan(ep, plan, result):
    t0 = time.perf_counter()
    ep.imagine(plan)
    out = ep.plan()
    result.plan_s.append(time.perf_counter() - t0)
    return out


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
    import torch

    from model.policy import ChunkPolicy
    from pipelines.data.embodiments import get_adapter

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
    from model.policy import ChunkPolicy
    from pipelines.data.embodiments import get_adapter

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
