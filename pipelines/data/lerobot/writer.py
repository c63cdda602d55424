"""Write ``Episode``s as a new LeRobot v3.0 dataset (``write_lerobot_dataset``): shared parquet and mp4 files, meta/
and LeRobot's per-episode and aggregated stats."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.episode import Episode
from pipelines.data.lerobot.format import (
    ACTION_KEY,
    CAMERA_PREFIX,
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_FILE_SIZE_MB,
    DATA_PATH,
    DONE_KEY,
    EPISODES_PATH,
    INFO_PATH,
    STATE_KEY,
    STATS_PATH,
    SUCCESS_KEY,
    V3_TASKS_PATH,
    VIDEO_FILE_SIZE_MB,
    VIDEO_PATH,
)


def write_lerobot_dataset(
    root: Path,
    episodes: Iterable[Episode],
    *,
    robot_type: str,
    fps: int | None = None,
    video_codec: str = "libx264",
    crf: int | None = 23,
    gop_size: int = 2,
    data_file_size_mb: float = DATA_FILE_SIZE_MB,
    video_file_size_mb: float = VIDEO_FILE_SIZE_MB,
    episodes_per_file: int | None = None,
) -> Path:
    """Write ``episodes`` as a new LeRobot v3.0 dataset at ``root`` and return ``root``.

    Each camera ``cam`` of the episodes becomes the video feature ``observation.images.<cam>`` (the episodes one
    after another in shared mp4 files, encoded with PyAV's ``video_codec`` at ``crf``; ``gop_size`` 2 follows
    LeRobot's default so single frames decode quickly). ``fps`` defaults to the first episode's; every episode must
    match it and share the first episode's cameras, frame sizes, state/action widths and names. A data / video file
    is closed and the next one started at the first episode boundary after it reaches ``data_file_size_mb`` /
    ``video_file_size_mb``, or once it holds ``episodes_per_file`` episodes (None: no such cap; 1 gives LeRobot v2's
    one file per episode inside the v3.0 layout). The dataset is built in a hidden temporary folder beside ``root``
    and renamed into place at the end, so ``root`` either holds a complete dataset or does not exist (an exception
    removes the temporary folder). Appending to an existing dataset is not supported: ``root`` must not exist.
    """
    root = Path(root)
    if root.exists():
        raise ValueError(f"{root} already exists; write_lerobot_dataset creates new datasets only (no appending)")
    if video_codec not in av.codecs_available:
        raise ValueError(f"video codec {video_codec!r} is not available in this PyAV build")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not (data_file_size_mb > 0 and video_file_size_mb > 0):
        raise ValueError("data_file_size_mb and video_file_size_mb must be positive")
    if episodes_per_file is not None and episodes_per_file < 1:
        raise ValueError(f"episodes_per_file must be at least 1, got {episodes_per_file}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(root.parent, f".{root.name}.tmp-")
    try:
        _V3Writer(tmp, robot_type=robot_type, fps=fps, codec=video_codec, crf=crf, gop_size=gop_size,
                  data_mb=data_file_size_mb, video_mb=video_file_size_mb, per_file=episodes_per_file).write(episodes)
        os.rename(tmp, root)  # atomic on one filesystem; fails rather than merging if root appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new hidden folder beside the target (same filesystem, so the final rename is atomic). Unlike mkdtemp it gets
    the umask's permissions, which the renamed dataset keeps."""
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    """LeRobot's update_chunk_file_indices: the next file, in the next chunk folder after ``CHUNKS_SIZE`` files."""
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


class _VideoFile:
    """One camera's current shared mp4: episodes are appended at frame-exact pts continuing the file's timeline."""

    def __init__(self, path: Path, fps: int, size: tuple[int, int], codec: str, crf: int | None, gop_size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps, self.frames, self.closed = path, fps, 0, False
        options = {"g": str(gop_size)}
        if crf is not None:
            options["crf"] = str(crf)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream(codec, rate=fps, options=options)
        self.stream.height, self.stream.width = size
        # libx264rgb codes the RGB planes themselves (lossless at crf 0); every other codec gets LeRobot's yuv420p
        self.stream.pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"

    def append(self, frames: np.ndarray) -> tuple[float, float]:
        """Encode an episode's frames; returns its (from_timestamp, to_timestamp) in seconds within this file."""
        start = self.frames
        # LeRobot shows an episode's frame t at from_timestamp + t / fps (1e-4 s tolerance), hence frame-exact pts
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames, Fraction(1, self.fps)  # shown at frames / fps seconds
            self.frames += 1
            for packet in self.stream.encode(frame):  # PyAV converts rgb24 -> the stream's pix_fmt here
                self.container.mux(packet)
        return start / self.fps, self.frames / self.fps

    def size_mb(self) -> float:
        return self.path.stat().st_size / 2**20 if self.path.exists() else 0.0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for packet in self.stream.encode():  # flush the encoder's delayed frames
                self.container.mux(packet)
        finally:
            self.container.close()


class _V3Writer:
    """Streams episodes into the v3.0 files; ``write`` returns once meta/ is complete."""

    def __init__(self, out: Path, *, robot_type: str, fps: int | None, codec: str, crf: int | None, gop_size: int,
                 data_mb: float, video_mb: float, per_file: int | None) -> None:
        self.out, self.robot_type, self.fps = out, robot_type, fps
        self.codec, self.crf, self.gop_size, self.data_mb, self.video_mb = codec, crf, gop_size, data_mb, video_mb
        self.tasks: dict[str, int] = {}
        self.rows: list[dict] = []
        self.episode_stats: list[dict[str, dict[str, np.ndarray]]] = []
        self.video_info: dict[str, dict] = {}
        self.layout: dict[str, Any] | None = None
        self.data_file = (0, 0)
        self.data_writer: pq.ParquetWriter | None = None
        self.videos: dict[str, tuple[tuple[int, int], _VideoFile]] = {}
        self.total_frames = 0
        self.per_file = per_file
        self.in_data_file = 0  # episodes in the current data file; in_video_file: the same per camera
        self.in_video_file: dict[str, int] = {}

    def _full(self, size_mb: float, limit_mb: float, episodes: int) -> bool:
        return size_mb >= limit_mb or (self.per_file is not None and episodes >= self.per_file)

    def write(self, episodes: Iterable[Episode]) -> None:
        try:
            for ep_index, ep in enumerate(episodes):
                self._add(ep_index, ep)
        finally:
            self._close_files()
        if self.layout is None:
            raise ValueError("no episodes to write: the episode iterable was empty")
        for key in self.videos:  # like LeRobot's update_video_info: probe the first file
            first = self.out / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
            self.video_info[key] = _probe_video(first, self.layout["fps"])
        self._write_meta()

    def _add(self, ep_index: int, ep: Episode) -> None:
        if not isinstance(ep, Episode):
            raise ValueError(f"episode {ep_index}: expected an Episode, got {type(ep).__name__}")
        if self.layout is None:
            self.layout = _layout_of(ep, self.fps)
        layout = self.layout
        _check_matches_layout(ep, ep_index, layout)
        if ep.length == 0:
            raise ValueError(f"episode {ep_index} has no frames")
        try:
            extra = json.dumps(ep.extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"episode {ep_index}: extra is not JSON-serialisable ({err})") from err
        instruction = ep.instruction or ep.task  # LeRobot needs a non-empty task string per episode
        if not instruction:
            raise ValueError(f"episode {ep_index} has neither an instruction nor a task name")
        task_index = self.tasks.setdefault(instruction, len(self.tasks))
        T = ep.length
        arrays = _frame_arrays(ep, ep_index, task_index, self.total_frames, layout["fps"])
        stats = {key: _vector_stats(a) for key, a in arrays.items()}
        row: dict[str, Any] = {"episode_index": ep_index, "tasks": [instruction], "length": T}
        row.update(self._append_data(arrays))
        row.update({"dataset_from_index": self.total_frames, "dataset_to_index": self.total_frames + T})
        for cam in layout["cameras"]:
            key = CAMERA_PREFIX + cam
            (chunk, file), video = self._video(key, layout["sizes"][cam])
            start, end = video.append(ep.frames[cam])
            row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                        f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": end})
            stats[key] = _image_stats(ep.frames[cam])
        # LeRobot selects the columns it knows; these extra ones let an Episode survive the round trip
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0, "task_name": ep.task,
                    "seed": int(ep.seed), "embodiment": ep.embodiment, "extra": extra})
        row.update({f"stats/{key}/{name}": np.asarray(v).tolist() for key, s in stats.items() for name, v in s.items()})
        self.rows.append(row)
        self.episode_stats.append(stats)
        self.total_frames += T

    def _append_data(self, arrays: dict[str, np.ndarray]) -> dict[str, int]:
        table = _to_arrow(arrays)
        path = self.out / DATA_PATH.format(chunk_index=self.data_file[0], file_index=self.data_file[1])
        if self.data_writer is not None and self._full(path.stat().st_size / 2**20, self.data_mb, self.in_data_file):
            self.data_writer.close()
            self.data_writer, self.data_file, self.in_data_file = None, _next_file(*self.data_file), 0
            path = self.out / DATA_PATH.format(chunk_index=self.data_file[0], file_index=self.data_file[1])
        if self.data_writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data_writer = pq.ParquetWriter(str(path), table.schema, compression="snappy")
        self.data_writer.write_table(table)  # one row group per episode, as LeRobot writes them
        self.in_data_file += 1
        return {"data/chunk_index": self.data_file[0], "data/file_index": self.data_file[1]}

    def _video(self, key: str, size: tuple[int, int]) -> tuple[tuple[int, int], _VideoFile]:
        current = self.videos.get(key)
        if current is not None and not self._full(current[1].size_mb(), self.video_mb, self.in_video_file[key]):
            self.in_video_file[key] += 1
            return current
        index = (0, 0)
        if current is not None:
            current[1].close()
            index = _next_file(*current[0])
        path = self.out / VIDEO_PATH.format(video_key=key, chunk_index=index[0], file_index=index[1])
        assert self.layout is not None
        self.videos[key] = (index, _VideoFile(path, self.layout["fps"], size, self.codec, self.crf, self.gop_size))
        self.in_video_file[key] = 1
        return self.videos[key]

    def _close_files(self) -> None:
        if self.data_writer is not None:
            self.data_writer.close()
            self.data_writer = None
        for _, video in self.videos.values():
            video.close()

    def _write_meta(self) -> None:
        assert self.layout is not None
        n = len(self.rows)
        info = {  # LeRobot warns about unknown keys: v2's total_videos / total_chunks are not written
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": n,
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": self.data_mb,
            "video_files_size_in_mb": self.video_mb,
            "fps": self.layout["fps"],
            "splits": {"train": f"0:{n}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.layout["cameras"] else None,
            "features": _features(self.layout, self.video_info),
        }
        write_json(self.out / INFO_PATH, info)
        episodes = self.out / EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), episodes)
        tasks = pd.DataFrame({"task_index": list(self.tasks.values())}, index=pd.Index(list(self.tasks), name="task"))
        tasks.to_parquet(self.out / V3_TASKS_PATH)
        write_json(self.out / STATS_PATH, _serialise(_aggregate_stats(self.episode_stats)))


def _layout_of(ep: Episode, fps: int | None) -> dict[str, Any]:
    cameras = sorted(ep.frames)
    for cam in cameras:
        if "/" in cam or not cam:
            raise ValueError(f"camera key {cam!r} cannot be used in a LeRobot feature name / file path")
        H, W = ep.frames[cam].shape[1:3]
        if H % 2 or W % 2:  # yuv420p subsamples chroma 2x2, so encoders reject odd sizes
            raise ValueError(f"camera {cam!r} frames are {H}x{W}; yuv420p video needs even height and width")
    if fps is None and ep.fps <= 0:
        raise ValueError(f"the first episode has fps {ep.fps}; pass fps= or fix the episodes")
    return {
        "fps": int(fps if fps is not None else ep.fps),
        "cameras": cameras,
        "sizes": {cam: tuple(ep.frames[cam].shape[1:3]) for cam in cameras},
        "state_dim": ep.state.shape[1],
        "action_dim": ep.actions.shape[1],
        "state_names": list(ep.state_names or [f"state_{i}" for i in range(ep.state.shape[1])]),
        "action_names": list(ep.action_names or [f"action_{i}" for i in range(ep.actions.shape[1])]),
    }


def _check_matches_layout(ep: Episode, ep_index: int, layout: dict[str, Any]) -> None:
    if ep.fps != layout["fps"]:
        raise ValueError(f"episode {ep_index} has fps {ep.fps}, the dataset is written at {layout['fps']}")
    if sorted(ep.frames) != layout["cameras"]:
        raise ValueError(f"episode {ep_index} has cameras {sorted(ep.frames)}, expected {layout['cameras']}")
    for cam, size in layout["sizes"].items():
        if tuple(ep.frames[cam].shape[1:3]) != size:
            raise ValueError(f"episode {ep_index} camera {cam!r} is {ep.frames[cam].shape[1:3]}, expected {size}")
    if ep.state.shape[1] != layout["state_dim"] or ep.actions.shape[1] != layout["action_dim"]:
        raise ValueError(
            f"episode {ep_index} has state/action widths {ep.state.shape[1]}/{ep.actions.shape[1]}, "
            f"expected {layout['state_dim']}/{layout['action_dim']}"
        )
    for what in ("state_names", "action_names"):
        names = getattr(ep, what)
        if names is not None and list(names) != layout[what]:
            raise ValueError(f"episode {ep_index} has {what} {list(names)}, the dataset's are {layout[what]}")


def _frame_arrays(ep: Episode, ep_index: int, task_index: int, first_index: int, fps: int) -> dict[str, np.ndarray]:
    """The per-frame columns of one episode (LeRobot's DEFAULT_FEATURES plus ours), as numpy arrays."""
    T = ep.length
    done = np.zeros(T, dtype=bool)
    done[-1] = True  # the episode ends after its last frame
    return {
        STATE_KEY: np.asarray(ep.state, dtype=np.float32),
        ACTION_KEY: np.asarray(ep.actions, dtype=np.float32),
        "timestamp": (np.arange(T) / fps).astype(np.float32),
        "frame_index": np.arange(T, dtype=np.int64),
        "episode_index": np.full(T, ep_index, dtype=np.int64),
        "index": np.arange(first_index, first_index + T, dtype=np.int64),
        "task_index": np.full(T, task_index, dtype=np.int64),
        SUCCESS_KEY: np.asarray(ep.success, dtype=bool),
        DONE_KEY: done,
    }


def _to_arrow(arrays: dict[str, np.ndarray]) -> pa.Table:
    columns = {}
    for key, a in arrays.items():
        if a.ndim == 2:  # fixed_size_list is how HF datasets' Sequence(length=D) -- LeRobot's vectors -- is stored
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)), a.shape[1])
        else:
            columns[key] = pa.array(a)
    return pa.table(columns)


def _features(layout: dict[str, Any], video_info: dict[str, dict]) -> dict[str, dict]:
    def scalar(dtype: str) -> dict:
        return {"dtype": dtype, "shape": [1], "names": None}

    features: dict[str, dict] = {
        STATE_KEY: {"dtype": "float32", "shape": [layout["state_dim"]], "names": layout["state_names"]},
        ACTION_KEY: {"dtype": "float32", "shape": [layout["action_dim"]], "names": layout["action_names"]},
    }
    for cam in layout["cameras"]:
        key = CAMERA_PREFIX + cam
        H, W = layout["sizes"][cam]
        features[key] = {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
                         "info": video_info[key]}
    features.update(timestamp=scalar("float32"), frame_index=scalar("int64"), episode_index=scalar("int64"),
                    index=scalar("int64"), task_index=scalar("int64"))
    features[SUCCESS_KEY] = scalar("bool")
    features[DONE_KEY] = scalar("bool")
    return features


def _probe_video(path: Path, fps: int) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "video.fps": float(fps),
            "video.height": stream.height,
            "video.width": stream.width,
            "video.channels": 3,
            "video.codec": stream.codec_context.codec.canonical_name,
            "video.pix_fmt": stream.pix_fmt,
            "video.is_depth_map": False,
            "has_audio": len(container.streams.audio) > 0,
        }


# -------------------------------------------------------------------------------------------------------------- stats


def _vector_stats(a: np.ndarray) -> dict[str, np.ndarray]:
    """compute_stats.get_feature_stats over time: (D,) for vectors, (1,) for per-frame scalars."""
    keep = a.ndim == 1
    return {
        "min": np.min(a, axis=0, keepdims=keep),
        "max": np.max(a, axis=0, keepdims=keep),
        "mean": np.mean(a, axis=0, keepdims=keep),
        "std": np.std(a, axis=0, keepdims=keep),
        "count": np.array([len(a)]),
    }


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel (3, 1, 1) stats in [0, 1]; over every frame (LeRobot samples frames, we can afford them all)."""
    x = frames.transpose(0, 3, 1, 2).astype(np.float64)  # (T, 3, H, W) as LeRobot's channel-first images
    stats = {
        "min": x.min(axis=(0, 2, 3), keepdims=True),
        "max": x.max(axis=(0, 2, 3), keepdims=True),
        "mean": x.mean(axis=(0, 2, 3), keepdims=True),
        "std": x.std(axis=(0, 2, 3), keepdims=True),
    }
    out = {k: np.squeeze(v / 255.0, axis=0) for k, v in stats.items()}
    out["count"] = np.array([len(frames)])
    return out


def _aggregate_stats(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """compute_stats.aggregate_stats: count-weighted mean, parallel-algorithm variance, min of mins, max of maxes."""
    out = {}
    for key in per_episode[0]:
        items = [s[key] for s in per_episode if key in s]
        means = np.stack([np.asarray(s["mean"], dtype=np.float64) for s in items])
        variances = np.stack([np.asarray(s["std"], dtype=np.float64) ** 2 for s in items])
        counts = np.array([int(np.asarray(s["count"]).reshape(-1)[0]) for s in items], dtype=np.float64)
        weights = counts.reshape(-1, *([1] * (means.ndim - 1)))
        total = counts.sum()
        mean = (means * weights).sum(axis=0) / total
        variance = ((variances + (means - mean) ** 2) * weights).sum(axis=0) / total
        out[key] = {
            "min": np.min(np.stack([np.asarray(s["min"]) for s in items]), axis=0),
            "max": np.max(np.stack([np.asarray(s["max"]) for s in items]), axis=0),
            "mean": mean,
            "std": np.sqrt(variance),
            "count": np.array([int(total)]),
        }
    return out


def _serialise(stats: dict[str, dict[str, np.ndarray]]) -> dict:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False))
