"""Our LeRobot files against the real lerobot 0.6.1 package, both ways.

lerobot 0.6.1 needs Python >= 3.12 (its metadata's Requires-Python) while the platform runs on 3.11, so it lives in
its own venv, ``.cache/lerobot-venv``, which ``make install`` creates (``make lerobot-venv``) with
``pip install 'lerobot[dataset]==0.6.1'``. ``lerobot_probe.py`` runs there: it loads a dataset with lerobot's
``LeRobotDataset`` and saves every frame it returns, or records one with lerobot's own writer. The tests skip, with
that reason, only where the venv is absent (no Python >= 3.12 on the machine); ``LINGBOT_LEROBOT_PYTHON`` points them
at another interpreter that has lerobot 0.6.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.lerobot.importer import import_lerobot
from pipelines.data.lerobot.reader import LeRobotDataset

REPO = Path(__file__).resolve().parents[3]
PROBE = Path(__file__).with_name("lerobot_probe.py")
LEROBOT_PYTHON = Path(os.environ.get("LINGBOT_LEROBOT_PYTHON") or REPO / ".cache" / "lerobot-venv" / "bin" / "python")

pytestmark = pytest.mark.skipif(
    not LEROBOT_PYTHON.is_file(),
    reason=f"no lerobot 0.6.1 interpreter at {LEROBOT_PYTHON}: lerobot needs Python >= 3.12; `make install` creates "
           ".cache/lerobot-venv when python3.12+ is available (or set LINGBOT_LEROBOT_PYTHON)",
)


def run_probe(*args: str, tmp_path: Path) -> str:
    # offline, and lerobot's caches inside the test's folder: the probe must never reach the Hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # nothing of this repo on lerobot's path: it sees only the files
    done = subprocess.run([str(LEROBOT_PYTHON), str(PROBE), *args], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def torchcodec_loads(tmp_path: Path) -> bool:
    """lerobot's default decoder on Linux x86_64; it needs FFmpeg's shared libraries (Debian's ffmpeg)."""
    code = "import torchcodec.decoders"
    return subprocess.run([str(LEROBOT_PYTHON), "-c", code], capture_output=True, timeout=120).returncode == 0


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    """`lingbot data collect`: 2 reach-v3 demos, 32 px, in the format the platform writes (lossless RGB h264)."""
    out = tmp_path_factory.mktemp("collect")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "osmesa")}
    subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "collect", "--tasks", "reach-v3", "--episodes", "2",
                    "--image-size", "32", "--workers", "1", "--out", str(out / "episodes"),
                    "--summary", str(out / "collect.json")], check=True, cwd=REPO, env=env, capture_output=True,
                   timeout=300)
    return out / "episodes" / "metaworld-reach-v3"


@pytest.mark.slow  # a Meta-World collection (~40 s on 2 cores) and lerobot's imports
@pytest.mark.parametrize("backend", ["pyav", "torchcodec"])
def test_collected_dataset_loads_in_lerobot(collected, tmp_path, backend):
    if backend == "torchcodec" and not torchcodec_loads(tmp_path):
        pytest.skip("torchcodec cannot load FFmpeg's shared libraries here (Debian package ffmpeg, `make install`)")
    meta = json.loads(run_probe("load", str(collected), str(tmp_path / "seen.npz"), backend, tmp_path=tmp_path)
                      .strip().splitlines()[-1])
    ours = LeRobotDataset(collected)
    assert meta["version"] == "v3.0" and meta["episodes"] == len(ours) == 2 and meta["fps"] == ours.fps
    assert meta["names"]["observation.state"] == ["hand_x", "hand_y", "hand_z", "gripper_opening"]
    assert meta["names"]["action"] == ["dx", "dy", "dz", "grip"]

    seen = np.load(tmp_path / "seen.npz")
    episodes = [ours.episode(i) for i in ours.episode_indices]
    assert meta["frames"] == sum(ep.length for ep in episodes) == len(seen["action"])
    np.testing.assert_array_equal(seen["episode_index"], np.concatenate([[i] * ep.length
                                                                          for i, ep in enumerate(episodes)]))
    # lerobot hands back exactly what was recorded: numbers bit for bit, frames pixel for pixel (lossless video)
    np.testing.assert_array_equal(seen["action"], np.concatenate([ep.actions for ep in episodes]))
    np.testing.assert_array_equal(seen["observation.state"], np.concatenate([ep.state for ep in episodes]))
    np.testing.assert_array_equal(seen["next.success"], np.concatenate([ep.success for ep in episodes]))
    for cam in meta["video_keys"]:
        frames = np.concatenate([ep.frames[cam.removeprefix("observation.images.")] for ep in episodes])
        assert seen[cam].shape == frames.shape
        np.testing.assert_array_equal(seen[cam], frames)
    assert set(seen["task"]) == {ep.instruction for ep in episodes}


def test_imports_a_dataset_recorded_by_lerobot(tmp_path):
    src = tmp_path / "recorded"
    run_probe("write", str(src), str(tmp_path / "written.npz"), tmp_path=tmp_path)
    written = np.load(tmp_path / "written.npz")

    summary = import_lerobot(src, tmp_path / "episodes" / "recorded", embodiment="metaworld-sawyer")
    assert summary == {"imported": 3, "quarantined": 0, "report_path": None}
    ds = LeRobotDataset(tmp_path / "episodes" / "recorded")
    assert ds.version == "v3.0" and len(ds) == 3
    assert ds.state_names == ("x", "y", "z", "grip") and ds.action_names == ("dx", "dy", "dz", "dgrip")
    for i in ds.episode_indices:
        ep, rows = ds.episode(i), written["episode_index"] == i
        np.testing.assert_array_equal(ep.actions, written["action"][rows])
        np.testing.assert_array_equal(ep.state, written["observation.state"][rows])
        assert ep.instruction == written["task"][rows][0] and ep.embodiment == "metaworld-sawyer"
        # lerobot's default codec (AV1, crf 30) and our re-encode are lossy: close on these smooth frames
        error = np.abs(ep.frames["front"].astype(np.int16) - written["front"][rows].astype(np.int16)).mean()
        assert error < 6.0, error
