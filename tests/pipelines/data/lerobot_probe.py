"""Runs under the lerobot venv (Python >= 3.12, lerobot 0.6.1; `make install` makes it), not under pytest.

    python lerobot_probe.py load  ROOT OUT.npz BACKEND   # read every frame with lerobot's LeRobotDataset
    python lerobot_probe.py write ROOT OUT.npz           # record a dataset with lerobot's own writer

Both write what they saw / wrote to OUT.npz for test_lerobot_interop.py to compare with our reader and importer;
`load` also prints a JSON line with lerobot's view of the metadata.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def load(root: str, out: str, backend: str) -> None:
    from lerobot.datasets import LeRobotDataset

    ds = LeRobotDataset("local/probe", root=root, video_backend=backend)
    cams = ds.meta.video_keys
    columns: dict[str, list] = {"action": [], "observation.state": [], "episode_index": [], "frame_index": [],
                                "next.success": [], **{c: [] for c in cams}}
    tasks = []
    for i in range(len(ds)):
        item = ds[i]
        for key in ("action", "observation.state", "episode_index", "frame_index", "next.success"):
            columns[key].append(item[key].numpy())
        for cam in cams:  # float (3, H, W) in [0, 1] -> uint8 (H, W, 3)
            columns[cam].append((item[cam].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        tasks.append(item["task"])
    np.savez(out, **{k: np.stack(v) for k, v in columns.items()}, task=np.array(tasks))
    print(json.dumps({"version": ds.meta.info.codebase_version, "episodes": ds.num_episodes, "frames": len(ds),
                      "fps": ds.fps, "video_keys": cams, "backend": backend, "names": ds.meta.names,
                      "robot_type": ds.meta.robot_type}))


def write(root: str, out: str) -> None:
    from lerobot.datasets import LeRobotDataset

    size, fps, lengths = 64, 10, (9, 6, 11)
    features = {
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "grip"]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "dgrip"]},
        "observation.images.front": {"dtype": "video", "shape": (size, size, 3),
                                     "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("local/recorded", fps=fps, features=features, root=root, robot_type="probe_arm")
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:size, 0:size]
    saved: dict[str, list] = {"action": [], "observation.state": [], "front": [], "episode_index": [], "task": []}
    for ep, T in enumerate(lengths):
        task = ("pick up the cube", "open the drawer")[ep % 2]
        for t in range(T):  # smooth gradients that move: a lossy codec keeps them close
            image = np.stack([40 + 2 * xx + 3 * t, 60 + 2 * yy, np.full_like(xx, 70 + 40 * ep)], -1).astype(np.uint8)
            frame = {"observation.state": rng.normal(size=4).astype(np.float32),
                     "action": rng.uniform(-1, 1, size=4).astype(np.float32),
                     "observation.images.front": image, "task": task}
            ds.add_frame(frame)
            for key in ("action", "observation.state"):
                saved[key].append(frame[key])
            saved["front"].append(image)
            saved["episode_index"].append(ep)
            saved["task"].append(task)
        ds.save_episode()
    ds.finalize()
    np.savez(out, **{k: np.stack(v) for k, v in saved.items()})


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"load": load, "write": write}[command](*args)
