"""LeRobot files <-> Episode: reading hand-made v2.1 / v3.0 datasets, writer round trip, atomicity, quarantine on import.

The reference datasets here are written by hand with pandas / pyarrow / PyAV, following LeRobot's documented layout,
so the reader is checked against the format rather than against our own writer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.data.episode import Episode
from pipelines.data.lerobot.importer import import_lerobot
from pipelines.data.lerobot.reader import LeRobotDataset, validate_episode_files
from pipelines.data.lerobot.writer import write_lerobot_dataset

FPS = 10
SIZE = 32
CAMERAS = ("top", "wrist")
LENGTHS = (14, 6, 12)  # episode 1 is the short one
TASKS = ("push the red block to the goal", "open the top drawer")
EPISODE_TASK = (0, 1, 0)
MAX_MEAN_ABS_ERROR = 8.0  # uint8 levels lost to yuv420p + h264 on smooth 32x32 images


# ------------------------------------------------------------------------------------------------ reference content


def smooth_frames(episode: int, camera: str, length: int) -> np.ndarray:
    """Smooth, moving gradients (video codecs keep them nearly intact), distinct per episode and camera."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    shift = 0 if camera == "top" else 40
    frames = [
        np.stack([40 + 3 * xx + 2 * t, 50 + 3 * yy + shift, np.full_like(xx, 80 + 30 * episode)], axis=-1)
        for t in range(length)
    ]
    return np.stack(frames).astype(np.uint8)


def reference_episodes() -> list[dict]:
    rng = np.random.default_rng(1234)
    out = []
    for i, T in enumerate(LENGTHS):
        out.append(
            {
                "state": rng.normal(size=(T, 4)).astype(np.float32),
                "action": rng.uniform(-1, 1, size=(T, 4)).astype(np.float32),
                "frames": {cam: smooth_frames(i, cam, T) for cam in CAMERAS},
                "task_index": EPISODE_TASK[i],
            }
        )
    return out


def encode_mp4(path: Path, frames: np.ndarray) -> None:
    """h264 / yuv420p mp4 through PyAV, frame i at i / FPS seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"crf": "18", "g": "2"})
        stream.height, stream.width, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def feature_stats(a: np.ndarray) -> dict:
    keep = a.ndim == 1
    return {"min": np.min(a, 0, keepdims=keep).tolist(), "max": np.max(a, 0, keepdims=keep).tolist(),
            "mean": np.mean(a, 0, keepdims=keep).tolist(), "std": np.std(a, 0, keepdims=keep).tolist(),
            "count": [len(a)]}


def image_stats(frames: np.ndarray) -> dict:
    x = frames.transpose(0, 3, 1, 2) / 255.0
    per = {k: getattr(np, k)(x, axis=(0, 2, 3)).reshape(3, 1, 1).tolist() for k in ("min", "max", "mean", "std")}
    return {**per, "count": [len(frames)]}


def features_json() -> dict:
    video_info = {"video.fps": float(FPS), "video.height": SIZE, "video.width": SIZE, "video.channels": 3,
                  "video.codec": "h264", "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "has_audio": False}
    features = {
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "grip"]},
    }
    for cam in CAMERAS:
        features[f"observation.images.{cam}"] = {"dtype": "video", "shape": [SIZE, SIZE, 3],
                                                  "names": ["height", "width", "channels"], "info": video_info}
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in ("frame_index", "episode_index", "index", "task_index"):
        features[key] = {"dtype": "int64", "shape": [1], "names": None}
    features["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
    return features


def frame_table(ep_index: int, ep: dict, first_index: int) -> pd.DataFrame:
    T = len(ep["action"])
    return pd.DataFrame({
        "observation.state": list(ep["state"]),
        "action": list(ep["action"]),
        "timestamp": (np.arange(T) / FPS).astype(np.float32),
        "frame_index": np.arange(T, dtype=np.int64),
        "episode_index": np.full(T, ep_index, dtype=np.int64),
        "index": np.arange(first_index, first_index + T, dtype=np.int64),
        "task_index": np.full(T, ep["task_index"], dtype=np.int64),
        "next.done": np.arange(T) == T - 1,
    })


def episode_stats(ep_index: int, ep: dict, table: pd.DataFrame) -> dict:
    stats = {k: feature_stats(np.stack(table[k].to_numpy())) for k in ("observation.state", "action")}
    for k in ("timestamp", "frame_index", "episode_index", "index", "task_index", "next.done"):
        stats[k] = feature_stats(table[k].to_numpy())
    for cam in CAMERAS:
        stats[f"observation.images.{cam}"] = image_stats(ep["frames"][cam])
    return stats


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4))


def write_v21_by_hand(root: Path, episodes: list[dict]) -> None:
    """meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl, meta/episodes_stats.jsonl, meta/stats.json,
    data/chunk-000/episode_XXXXXX.parquet and videos/chunk-000/<video_key>/episode_XXXXXX.mp4 (LeRobot v2.1)."""
    episode_lines, stats_lines, first = [], [], 0
    for i, ep in enumerate(episodes):
        table = frame_table(i, ep, first)
        path = root / f"data/chunk-000/episode_{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(path, index=False)
        for cam in CAMERAS:
            encode_mp4(root / f"videos/chunk-000/observation.images.{cam}/episode_{i:06d}.mp4", ep["frames"][cam])
        episode_lines.append({"episode_index": i, "tasks": [TASKS[ep["task_index"]]], "length": len(table)})
        stats_lines.append({"episode_index": i, "stats": episode_stats(i, ep, table)})
        first += len(table)
    write_json(root / "meta/info.json", {
        "codebase_version": "v2.1", "robot_type": "so100", "total_episodes": len(episodes), "total_frames": first,
        "total_tasks": len(TASKS), "total_videos": len(episodes) * len(CAMERAS), "total_chunks": 1,
        "chunks_size": 1000, "fps": FPS, "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features_json(),
    })
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in episode_lines))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(TASKS)))
    (root / "meta/episodes_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats_lines))
    # global stats only need to be well-formed for reading; take episode 0's
    write_json(root / "meta/stats.json", stats_lines[0]["stats"])


def write_v30_by_hand(root: Path, episodes: list[dict]) -> None:
    """LeRobot v3.0: every episode in data/chunk-000/file-000.parquet and videos/<key>/chunk-000/file-000.mp4,
    episode offsets in meta/episodes/chunk-000/file-000.parquet, tasks in meta/tasks.parquet."""
    tables, rows, first = [], [], 0
    for i, ep in enumerate(episodes):
        table = frame_table(i, ep, first)
        tables.append(table)
        T = len(table)
        row = {"episode_index": i, "tasks": [TASKS[ep["task_index"]]], "length": T, "data/chunk_index": 0,
               "data/file_index": 0, "dataset_from_index": first, "dataset_to_index": first + T,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        for cam in CAMERAS:
            key = f"videos/observation.images.{cam}"
            row.update({f"{key}/chunk_index": 0, f"{key}/file_index": 0, f"{key}/from_timestamp": first / FPS,
                        f"{key}/to_timestamp": (first + T) / FPS})
        row["stats/action/mean"] = ep["action"].mean(0).tolist()
        rows.append(row)
        first += T
    (root / "data/chunk-000").mkdir(parents=True)
    pd.concat(tables, ignore_index=True).to_parquet(root / "data/chunk-000/file-000.parquet", index=False)
    for cam in CAMERAS:
        frames = np.concatenate([ep["frames"][cam] for ep in episodes])
        encode_mp4(root / f"videos/observation.images.{cam}/chunk-000/file-000.mp4", frames)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "meta/episodes/chunk-000/file-000.parquet", index=False)
    pd.DataFrame({"task_index": range(len(TASKS))}, index=list(TASKS)).to_parquet(root / "meta/tasks.parquet")
    write_json(root / "meta/info.json", {
        "codebase_version": "v3.0", "robot_type": "so100", "total_episodes": len(episodes), "total_frames": first,
        "total_tasks": len(TASKS), "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "fps": FPS, "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features_json(),
    })
    write_json(root / "meta/stats.json", {"action": feature_stats(np.concatenate([e["action"] for e in episodes]))})


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return reference_episodes()


@pytest.fixture(scope="module")
def v21_master(tmp_path_factory, reference) -> Path:
    root = tmp_path_factory.mktemp("v21") / "hand_made"
    write_v21_by_hand(root, reference)
    return root


@pytest.fixture
def v21(tmp_path, v21_master) -> Path:
    """A private copy of the hand-made v2.1 dataset that a test may corrupt."""
    return Path(shutil.copytree(v21_master, tmp_path / "src"))


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_matches_reference(ep: Episode, ref: dict) -> None:
    T = len(ref["action"])
    np.testing.assert_array_equal(ep.actions, ref["action"])
    np.testing.assert_array_equal(ep.state, ref["state"])
    assert ep.actions.dtype == np.float32 and ep.state.dtype == np.float32
    assert ep.instruction == TASKS[ref["task_index"]]
    assert ep.fps == FPS and ep.length == T
    assert sorted(ep.frames) == sorted(CAMERAS)
    for cam in CAMERAS:
        assert ep.frames[cam].shape == (T, SIZE, SIZE, 3) and ep.frames[cam].dtype == np.uint8
        assert mean_abs_error(ep.frames[cam], ref["frames"][cam]) < MAX_MEAN_ABS_ERROR


# ------------------------------------------------------------------------------------------------------------ reader


def test_reads_hand_made_v21_dataset(v21_master, reference):
    ds = LeRobotDataset(v21_master)
    assert len(ds) == 3 and ds.version == "v2.1" and ds.fps == FPS
    episodes = list(ds)
    for ep, ref in zip(episodes, reference, strict=True):
        assert_matches_reference(ep, ref)
        assert not ep.success.any()  # no next.success column -> all False
        assert ep.embodiment == "unknown" and ep.seed == -1
        assert ep.task == ep.instruction  # no task_name in plain LeRobot metadata
    assert LeRobotDataset(v21_master, embodiment="so100_arm").episode(2).embodiment == "so100_arm"
    assert all(validate_episode_files(v21_master, i) == [] for i in range(3))


def test_reads_hand_made_v30_dataset(tmp_path, reference):
    root = tmp_path / "v3"
    write_v30_by_hand(root, reference)
    ds = LeRobotDataset(root)
    assert len(ds) == 3 and ds.version == "v3.0"
    for i, ref in enumerate(reference):
        assert_matches_reference(ds.episode(i), ref)
    assert ds.problems(1, min_length=10) == ["episode has 6 frames, shorter than min_length=10"]


def test_unknown_episode_index_is_an_index_error(v21_master):
    with pytest.raises(IndexError, match="episode 7"):
        LeRobotDataset(v21_master).episode(7)


def _drop_info(root: Path) -> None:
    (root / "meta/info.json").unlink()


def _edit_info(**changes):
    def edit(root: Path) -> None:
        info = json.loads((root / "meta/info.json").read_text())
        for key, value in changes.items():
            if value is None:
                info.pop(key)
            else:
                info[key] = value
        (root / "meta/info.json").write_text(json.dumps(info))

    return edit


def _drop_tasks(root: Path) -> None:
    (root / "meta/tasks.jsonl").unlink()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        pytest.param(_drop_info, "missing meta/info.json", id="no-info-json"),
        pytest.param(_edit_info(data_path=None, fps=None), r"missing required fields \['fps', 'data_path'\]",
                     id="info-missing-fields"),
        pytest.param(_edit_info(codebase_version="v1.6"), "unsupported LeRobot codebase_version 'v1.6'",
                     id="unsupported-version"),
        pytest.param(_drop_tasks, "missing meta/tasks.jsonl", id="no-tasks"),
        pytest.param(_edit_info(total_episodes=5), "total_episodes=5", id="episode-count-mismatch"),
    ],
)
def test_bad_metadata_is_a_value_error(v21, corrupt, message):
    corrupt(v21)
    with pytest.raises(ValueError, match=message):
        LeRobotDataset(v21)


# ------------------------------------------------------------------------------------------------------------ writer


def make_episode(i: int, T: int, *, fps: int = FPS, size: int = SIZE) -> Episode:
    rng = np.random.default_rng(i)
    frames = {cam: smooth_frames(i, cam, T)[:, :size, :size] for cam in CAMERAS}
    return Episode(
        frames=frames,
        actions=rng.uniform(-1, 1, size=(T, 4)).astype(np.float32),
        state=rng.normal(size=(T, 39)).astype(np.float32),
        success=np.arange(T) >= T - 2 if i % 2 == 0 else np.zeros(T, dtype=bool),
        task=("reach-v3", "push-v3")[i % 2],
        instruction=("reach the red goal", "push the puck to the goal")[i % 2],
        embodiment="metaworld_sawyer",
        fps=fps,
        seed=100 + i,
        extra={"camera_names": list(CAMERAS), "attempt": i},
        action_names=("dx", "dy", "dz", "grip"),
    )


def test_writer_round_trip(tmp_path):
    episodes = [make_episode(i, T) for i, T in enumerate((8, 11, 5))]
    root = write_lerobot_dataset(tmp_path / "ds", episodes, robot_type="sawyer")
    assert root == tmp_path / "ds"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left behind

    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == "sawyer" and info["fps"] == FPS
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 24, 2)
    assert (info["chunks_size"], info["data_files_size_in_mb"], info["video_files_size_in_mb"]) == (1000, 100, 200)
    assert "total_videos" not in info and "total_chunks" not in info  # v2 keys LeRobot 0.6 warns about
    assert info["splits"] == {"train": "0:3"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    features = info["features"]
    assert set(features) == {"observation.state", "action", "observation.images.top", "observation.images.wrist",
                             "timestamp", "frame_index", "episode_index", "index", "task_index", "next.success",
                             "next.done"}
    assert features["observation.state"]["shape"] == [39] and features["action"]["shape"] == [4]
    assert features["action"]["names"] == ["dx", "dy", "dz", "grip"]  # the episodes' names, not action_0..3
    assert features["observation.state"]["names"] == [f"state_{i}" for i in range(39)]  # unnamed: numbered
    top = features["observation.images.top"]
    assert top["dtype"] == "video" and top["shape"] == [SIZE, SIZE, 3]
    assert top["info"]["video.codec"] == "h264" and top["info"]["video.pix_fmt"] == "yuv420p"

    # every episode in one shared parquet (a row group each) and one mp4 per camera
    data_file = pq.ParquetFile(root / "data/chunk-000/file-000.parquet")
    assert data_file.metadata.num_row_groups == 3
    table = data_file.read()
    assert set(table.column_names) == set(features) - {"observation.images.top", "observation.images.wrist"}
    assert table.column("index").to_pylist() == list(range(24))
    assert table.column("episode_index").to_pylist() == [0] * 8 + [1] * 11 + [2] * 5
    np.testing.assert_allclose(table.column("timestamp").to_numpy()[8:19], np.arange(11) / FPS, atol=1e-6)
    assert table.column("next.done").to_pylist()[8:19] == [False] * 10 + [True]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4")) == [
        f"videos/observation.images.{cam}/chunk-000/file-000.mp4" for cam in CAMERAS]

    rows = pd.read_parquet(root / "meta/episodes/chunk-000/file-000.parquet")
    assert rows["episode_index"].tolist() == [0, 1, 2] and rows["length"].tolist() == [8, 11, 5]
    assert [list(t) for t in rows["tasks"]] == [["reach the red goal"], ["push the puck to the goal"],
                                                ["reach the red goal"]]
    assert rows["dataset_from_index"].tolist() == [0, 8, 19] and rows["dataset_to_index"].tolist() == [8, 19, 24]
    np.testing.assert_allclose(rows["videos/observation.images.top/from_timestamp"], [0.0, 0.8, 1.9])
    np.testing.assert_allclose(rows["videos/observation.images.top/to_timestamp"], [0.8, 1.9, 2.4])
    assert [list(c) for c in rows["stats/action/count"]] == [[8], [11], [5]]
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    assert list(tasks.index) == ["reach the red goal", "push the puck to the goal"]
    assert tasks["task_index"].tolist() == [0, 1] and tasks.index.name == "task"
    stats = json.loads((root / "meta/stats.json").read_text())
    all_actions = np.concatenate([e.actions for e in episodes])
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["action"]["std"], all_actions.std(0), rtol=1e-5)
    assert stats["action"]["count"] == [24]
    image = np.asarray(stats["observation.images.top"]["mean"])
    assert image.shape == (3, 1, 1)
    all_top = np.concatenate([e.frames["top"] for e in episodes])
    np.testing.assert_allclose(image.reshape(3), all_top.reshape(-1, 3).mean(0) / 255, rtol=1e-6)

    ds = LeRobotDataset(root)
    assert len(ds) == 3
    for original, read in zip(episodes, ds, strict=True):
        np.testing.assert_array_equal(read.actions, original.actions)
        np.testing.assert_array_equal(read.state, original.state)
        np.testing.assert_array_equal(read.success, original.success)
        assert (read.task, read.instruction, read.embodiment, read.fps, read.seed, read.extra) == (
            original.task, original.instruction, original.embodiment, original.fps, original.seed, original.extra)
        assert read.action_names == ("dx", "dy", "dz", "grip")
        assert read.state_names == tuple(f"state_{i}" for i in range(39))
        for cam in CAMERAS:
            assert read.frames[cam].shape == original.frames[cam].shape
            assert mean_abs_error(read.frames[cam], original.frames[cam]) < MAX_MEAN_ABS_ERROR
    assert ds.episode_meta(1) == {"episode_index": 1, "length": 11, "instruction": "push the puck to the goal",
                                  "task": "push-v3", "embodiment": "metaworld_sawyer", "seed": 101,
                                  "extra": {"camera_names": list(CAMERAS), "attempt": 1}}


def test_writer_starts_new_files_and_the_reader_follows(tmp_path):
    """Episodes split over several data / video files (here 2 per file) are read back from the right file and
    offset; a (deliberately) tiny size limit puts every further episode in a new file as well."""
    episodes = [make_episode(i, T) for i, T in enumerate((8, 11, 5, 7, 6))]
    root = write_lerobot_dataset(tmp_path / "ds", episodes, robot_type="sawyer", episodes_per_file=2)
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("data/*/*.parquet")) == [
        f"data/chunk-000/file-{i:03d}.parquet" for i in range(3)]
    rows = pd.read_parquet(root / "meta/episodes/chunk-000/file-000.parquet")
    assert rows["data/file_index"].tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_allclose(rows["videos/observation.images.wrist/from_timestamp"], [0.0, 0.8, 0.0, 0.5, 0.0])
    ds = LeRobotDataset(root)
    for i in (4, 1, 3):  # out of order: no reader state carries over between files
        np.testing.assert_array_equal(ds.episode(i).actions, episodes[i].actions)
        assert mean_abs_error(ds.episode(i).frames["top"], episodes[i].frames["top"]) < MAX_MEAN_ABS_ERROR
    tiny = write_lerobot_dataset(tmp_path / "tiny", episodes[:3], robot_type="sawyer", data_file_size_mb=1e-9)
    assert len(list(tiny.glob("data/*/*.parquet"))) == 3


def test_crash_mid_write_leaves_nothing(tmp_path):
    def collector():
        yield make_episode(0, 6)
        yield make_episode(1, 6)
        raise RuntimeError("simulator crashed")

    with pytest.raises(RuntimeError, match="simulator crashed"):
        write_lerobot_dataset(tmp_path / "ds", collector(), robot_type="sawyer")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("episodes", "kwargs", "message"),
    [
        pytest.param([], {}, "no episodes to write", id="empty"),
        pytest.param([make_episode(0, 4), make_episode(1, 4, fps=20)], {}, "episode 1 has fps 20", id="fps-mismatch"),
        pytest.param([make_episode(0, 4)], {"fps": 30}, "episode 0 has fps 10", id="fps-argument-mismatch"),
        pytest.param([make_episode(0, 4, size=31)], {}, "even height and width", id="odd-frame-size"),
        pytest.param([make_episode(0, 4)], {"video_codec": "no-such-codec"}, "not available", id="unknown-codec"),
        pytest.param([make_episode(0, 4), dataclasses.replace(make_episode(1, 4), action_names=("a", "b", "c", "d"))],
                     {}, "episode 1 has action_names", id="names-mismatch"),
    ],
)
def test_writer_rejects_bad_input_and_cleans_up(tmp_path, episodes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_lerobot_dataset(tmp_path / "ds", episodes, robot_type="sawyer", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_root(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        write_lerobot_dataset(tmp_path / "ds", [make_episode(0, 4)], robot_type="sawyer")


# ------------------------------------------------------------------------------------------------ import / quarantine


def _truncate_video(root: Path) -> None:
    path = root / "videos/chunk-000/observation.images.wrist/episode_000001.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_action_column(root: Path) -> None:
    path = root / "data/chunk-000/episode_000001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["action"]), path)


def _nan_actions(root: Path, episodes: tuple[int, ...] = (1,)) -> None:
    for i in episodes:
        path = root / f"data/chunk-000/episode_{i:06d}.parquet"
        df = pd.read_parquet(path)
        actions = np.stack(df["action"].to_numpy())
        actions[2, 1] = np.nan
        df["action"] = list(actions)
        df.to_parquet(path, index=False)


def _leave_alone(root: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("corrupt", "min_length", "reason"),
    [
        pytest.param(_truncate_video, 1, "undecodable video videos/chunk-000/observation.images.wrist/episode_000001.mp4",
                     id="truncated-mp4"),
        pytest.param(_drop_action_column, 1, "missing required columns ['action']", id="parquet-missing-column"),
        pytest.param(_nan_actions, 1, "action has 1 non-finite values (NaN/inf)", id="nan-actions"),
        pytest.param(_leave_alone, 10, "episode has 6 frames, shorter than min_length=10", id="too-short"),
    ],
)
def test_import_quarantines_exactly_the_bad_episode(tmp_path, v21, reference, corrupt, min_length, reason):
    corrupt(v21)
    problems = validate_episode_files(v21, 1, min_length=min_length)
    assert any(reason in p for p in problems), problems
    if min_length == 1:  # a plain read of the bad episode names the problem too
        with pytest.raises(ValueError, match="episode 1: "):
            LeRobotDataset(v21).episode(1)

    dst = tmp_path / "imported"
    summary = import_lerobot(v21, dst, embodiment="so100_arm", min_length=min_length)

    quarantine = tmp_path / "imported_quarantine"
    assert summary == {"imported": 2, "quarantined": 1, "report_path": str(quarantine / "report.json")}
    report = json.loads(Path(summary["report_path"]).read_text())
    assert [entry["episode_index"] for entry in report["quarantined"]] == [1]
    assert any(reason in r for r in report["quarantined"][0]["reasons"])
    assert report["imported"] == 2
    for rel in report["quarantined"][0]["files"]:
        assert (quarantine / rel).is_file()
    assert (quarantine / "meta/info.json").is_file()

    out = LeRobotDataset(dst)
    assert len(out) == 2 and out.version == "v3.0"
    # the source's feature names survive the import (they used to become state_0.. / action_0..)
    assert (out.state_names, out.action_names) == (("x", "y", "z", "gripper"), ("dx", "dy", "dz", "grip"))
    for ep, ref in zip(out, (reference[0], reference[2]), strict=True):
        assert_matches_reference(ep, ref)
        assert ep.embodiment == "so100_arm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "imported_quarantine", "src"]


def test_import_from_v30_quarantines_from_shared_files(tmp_path, reference):
    src = tmp_path / "v3"
    write_v30_by_hand(src, reference)
    shared = src / "data/chunk-000/file-000.parquet"
    df = pd.read_parquet(shared)
    actions = np.stack(df["action"].to_numpy())
    actions[df.index[df["episode_index"] == 2][0], 0] = np.nan
    df["action"] = list(actions)
    df.to_parquet(shared, index=False)

    summary = import_lerobot(src, tmp_path / "imported", embodiment="so100_arm")
    assert (summary["imported"], summary["quarantined"]) == (2, 1)
    report = json.loads(Path(summary["report_path"]).read_text())
    assert report["quarantined"][0]["episode_index"] == 2
    assert "data/chunk-000/file-000.parquet" in report["quarantined"][0]["files"]
    out = LeRobotDataset(tmp_path / "imported")
    assert out.version == "v3.0"
    for ep, ref in zip(out, reference[:2], strict=True):
        assert_matches_reference(ep, ref)


def test_import_without_problems_writes_no_quarantine(tmp_path, v21_master):
    summary = import_lerobot(v21_master, tmp_path / "imported", embodiment="so100_arm")
    assert summary == {"imported": 3, "quarantined": 0, "report_path": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]


def test_import_with_nothing_usable_is_a_value_error(tmp_path, v21):
    _nan_actions(v21, episodes=(0, 1, 2))
    with pytest.raises(ValueError, match="no usable episodes"):
        import_lerobot(v21, tmp_path / "imported", embodiment="so100_arm")
    assert not (tmp_path / "imported").exists()
    report = json.loads((tmp_path / "imported_quarantine/report.json").read_text())
    assert [entry["episode_index"] for entry in report["quarantined"]] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported_quarantine", "src"]
