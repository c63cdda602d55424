"""How much of the third-person view the MT10 workspace uses, and what a zoomed crop (a derived view) gains.

For each task the scripted expert runs on the training variants (benchmark seed 0) and on the held-out ones the gate
evaluates (seed 1); every few steps the hand, the objects and the goal are projected into each view's upright image
(normalised coordinates, u right, v up, the frame is |u|, |v| <= 1). Reported per view: the share of points inside the
frame and inside its central 90%, the largest |u| / |v|, and the scale at the goal (pixels per cm at --size, which is
what makes a 2 cm reach goal visible or not). Also reported: the smallest crop of the base camera that holds every
point with --margin to spare. A PNG shows the first frame of a few tasks in each view at --size.

Usage: .venv/bin/python bench/camera_zoom.py [--variants 10] [--size 64]
Writes bench/results/camera_zoom.json and bench/results/camera_zoom.png. Not a test: no thresholds here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "osmesa")

import metaworld
import mujoco
import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from pipelines.data.embodiments import METAWORLD_VIEWS, CameraCrop
from pipelines.data.metaworld_collect import MT10, CameraRig, camera_needs_rotation

REPO = Path(__file__).resolve().parent.parent


def project(model: mujoco.MjModel, data: mujoco.MjData, camera: str, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) -> (upright normalised image coordinates (N, 2), depth (N,)) in scene camera ``camera``."""
    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    rot = data.cam_xmat[cam].reshape(3, 3)  # columns: camera x (right), y (up), z (backwards) in the world
    local = (points - data.cam_xpos[cam]) @ rot
    depth = -local[:, 2]
    scale = np.tan(np.radians(model.cam_fovy[cam]) / 2)
    uv = local[:, :2] / depth[:, None] / scale
    if camera_needs_rotation(model, data, camera):
        uv = -uv
    return uv, depth


def in_view(uv: np.ndarray, crop: CameraCrop | None) -> np.ndarray:
    return uv if crop is None else (uv - np.asarray(crop.center)) * crop.zoom


def expert_points(task: str, seed: int, variant: int, every: int = 5):
    """Hand, object(s) and goal positions along one expert episode, and the env (kept for projecting)."""
    bench = metaworld.MT1(task, seed=seed)
    env = bench.train_classes[task]()
    env.seed(seed + variant)
    env.set_task(bench.train_tasks[variant])
    obs, _ = env.reset()
    policy = ENV_POLICY_MAP[task]()
    points, goal = [], np.array(env._target_pos, dtype=float)
    for t in range(env.max_path_length):
        if t % every == 0:
            points += [obs[0:3], goal] + [p for p in (obs[4:7], obs[11:14]) if np.abs(p).sum() > 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            action = np.clip(policy.get_action(obs), -1, 1)
        obs, _, _, truncated, info = env.step(action)
        if truncated or info["success"]:
            points += [obs[0:3]]
            break
    return env, np.array(points, dtype=float), goal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=10, help="variants per task and seed")
    ap.add_argument("--size", type=int, default=64, help="image size the pixel figures refer to")
    ap.add_argument("--margin", type=float, default=0.1, help="share of the half-width kept free around the points")
    ap.add_argument("--tasks", default=",".join(MT10))
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/camera_zoom.json")
    args = ap.parse_args()

    base = "corner4"
    views: dict[str, CameraCrop | None] = {base: None}
    views.update({name: crop for name, crop in METAWORLD_VIEWS.items() if crop.camera == base})
    t0 = time.perf_counter()
    per_task, all_uv = {}, []
    for task in args.tasks.split(","):
        uvs, goal_px = [], {v: [] for v in views}
        for seed in (0, 1):
            for variant in range(args.variants):
                env, pts, goal = expert_points(task, seed, variant)
                uv, _ = project(env.model, env.data, base, pts)
                _, gdepth = project(env.model, env.data, base, goal[None])
                cam = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, base)
                px_per_cm = 0.01 / gdepth[0] / np.tan(np.radians(env.model.cam_fovy[cam]) / 2) * args.size / 2
                for v, crop in views.items():
                    goal_px[v].append(px_per_cm * (1.0 if crop is None else crop.zoom))
                uvs.append(uv)
                env.close()
        uv = np.concatenate(uvs)
        all_uv.append(uv)
        per_task[task] = {}
        for v, crop in views.items():
            w = np.abs(in_view(uv, crop))
            per_task[task][v] = {"in_frame": round(float((w.max(1) <= 1).mean()), 4),
                                 "in_central_90pct": round(float((w.max(1) <= 0.9).mean()), 4),
                                 "max_abs_uv": [round(float(x), 3) for x in w.max(0)],
                                 "goal_px_per_cm": round(float(np.mean(goal_px[v])), 2)}
        print(task, per_task[task], flush=True)

    uv = np.concatenate(all_uv)
    lo, hi = uv.min(0), uv.max(0)
    centre = (lo + hi) / 2
    zoom = 1.0 / (float(((hi - lo) / 2).max()) * (1 + args.margin))
    result = {
        "what": "MT10 expert hands, objects and goals projected into the third-person views (bench/camera_zoom.py)",
        "size": args.size, "variants_per_seed": args.variants, "seeds": [0, 1], "base_camera": base,
        "views": {v: (None if c is None else {"camera": c.camera, "zoom": c.zoom, "center": list(c.center)})
                  for v, c in views.items()},
        "extent_uv": {"min": [round(float(x), 3) for x in lo], "max": [round(float(x), 3) for x in hi]},
        "smallest_crop": {"center": [round(float(x), 3) for x in centre], "zoom": round(zoom, 3),
                          "margin": args.margin},
        "all_tasks": {v: {"in_frame": round(float((np.abs(in_view(uv, c)).max(1) <= 1).mean()), 4),
                          "goal_px_per_cm_mean": round(float(np.mean([t[v]["goal_px_per_cm"] for t in per_task.values()])), 2)}
                      for v, c in views.items()},
        "per_task": per_task,
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    strip(list(views), args.tasks.split(",")[:5], args.size, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("extent_uv", "smallest_crop", "all_tasks")}), "->", args.out)


def strip(views: list[str], tasks: list[str], size: int, path: Path) -> None:
    """First frame of each task (columns) in each view (rows), 3x nearest-neighbour upscaled."""
    from PIL import Image

    rows = []
    for view in views:
        row = []
        for task in tasks:
            bench = metaworld.MT1(task, seed=1)
            env = bench.train_classes[task]()
            env.set_task(bench.train_tasks[0])
            env.reset()
            rig = CameraRig(env.model, env.data, [view], size)
            row.append(rig.render(env.data)[view])
            rig.close()
            env.close()
        rows.append(np.concatenate(row, 1))
    image = np.concatenate(rows, 0).repeat(3, 0).repeat(3, 1)
    Image.fromarray(image).save(path)


if __name__ == "__main__":
    main()
