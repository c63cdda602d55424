"""LeRobot dataset files <-> ``Episode``: a writer, a validating reader and a quarantining importer.

Written format: LeRobotDataset **codebase_version "v3.0"**, the format lerobot 0.4+ (0.6.1 included) loads; older
versions are refused by its ``LeRobotDataset`` (``BackwardCompatibilityError``). Facts taken from lerobot 0.6.1's
``src/lerobot/datasets`` (``utils.py``, ``io_utils.py``, ``dataset_metadata.py``, ``dataset_writer.py``,
``video_utils.py``, ``feature_utils.py``) and ``docs/source/lerobot-dataset-v3.mdx``:

* many episodes per file: frames in ``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet`` (one row group
  per episode), each camera in ``videos/<video_key>/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4`` with the
  episodes one after another; a new file starts once one passes ``data_files_size_in_mb`` (100) /
  ``video_files_size_in_mb`` (200), ``chunks_size`` (1000) files per chunk folder;
* ``meta/episodes/chunk-XXX/file-XXX.parquet``: one row per episode with ``episode_index``, ``tasks`` (list of
  strings), ``length``, ``data/chunk_index``, ``data/file_index``, ``dataset_from_index``, ``dataset_to_index``,
  per video ``videos/<key>/chunk_index``, ``file_index``, ``from_timestamp``, ``to_timestamp`` (seconds into the
  shared mp4), ``meta/episodes/chunk_index`` / ``file_index`` and the flattened episode stats ``stats/<key>/<stat>``;
  LeRobot reads ``self.episodes[ep_idx]`` positionally, so row i is episode i;
* ``meta/tasks.parquet``: the task strings as the index (named ``task``) and a ``task_index`` column;
* ``meta/info.json``: ``codebase_version``, ``robot_type``, ``total_episodes``, ``total_frames``, ``total_tasks``,
  ``chunks_size``, ``data_files_size_in_mb``, ``video_files_size_in_mb``, ``fps``, ``splits``, ``data_path``,
  ``video_path``, ``features`` (``DatasetInfo``; unknown keys are warned about, so v2's ``total_videos`` /
  ``total_chunks`` are not written); ``meta/stats.json``: the aggregated stats;
* a frame at ``timestamp`` t of an episode is the video frame shown at ``from_timestamp + t`` (LeRobot decodes by
  timestamp with a 1e-4 s tolerance), so each episode continues the shared mp4's timeline at frame-exact pts;
* stats (``compute_stats.py``): per feature ``min/max/mean/std/count``; vectors reduced over time (``(D,)``),
  scalars ``(1,)``, images per channel ``(3, 1, 1)`` in [0, 1]; ``aggregate_stats`` merges with count-weighted
  means and the parallel-variance formula.

Extra per-episode columns are allowed in the episodes parquet (LeRobot selects the columns it knows); we add
``task_name`` (e.g. the Meta-World task), ``seed``, ``embodiment`` and ``extra`` (JSON text) so an ``Episode``
survives the round trip. The LeRobot "task" string is the natural-language instruction. State and action column
names are the features' ``names`` (``Episode.state_names`` / ``action_names``).

The reader also accepts v2.0 / v2.1 (one parquet and one mp4 per episode, ``meta/episodes.jsonl``,
``meta/tasks.jsonl``; v2.1 adds ``meta/episodes_stats.jsonl``). Any other codebase_version is rejected with a
ValueError naming it. All video encoding and decoding goes through PyAV.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.episode import Episode

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's DEFAULT_CHUNK_SIZE)
DATA_FILE_SIZE_MB = 100  # LeRobot's DEFAULT_DATA_FILE_SIZE_IN_MB
VIDEO_FILE_SIZE_MB = 200  # LeRobot's DEFAULT_VIDEO_FILE_SIZE_IN_MB

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_TASKS_PATH = "meta/tasks.parquet"
V3_EPISODES_DIR = "meta/episodes"
# v2.0 / v2.1 (read only)
V2_EPISODES_PATH = "meta/episodes.jsonl"
V2_TASKS_PATH = "meta/tasks.jsonl"

STATE_KEY = "observation.state"
ACTION_KEY = "action"
SUCCESS_KEY = "next.success"
DONE_KEY = "next.done"
CAMERA_PREFIX = "observation.images."

_SUPPORTED_READ_VERSIONS = ("v2.0", "v2.1", "v3.0")
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError, EOFError)


# ----------------------------------------------------------------------------------------------------------- writing


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
    tmp = _fresh_dir(root.parent, f".{root.name}.tmp-")
    try:
        _V3Writer(tmp, robot_type=robot_type, fps=fps, codec=video_codec, crf=crf, gop_size=gop_size,
                  data_mb=data_file_size_mb, video_mb=video_file_size_mb, per_file=episodes_per_file).write(episodes)
        os.rename(tmp, root)  # atomic on one filesystem; fails rather than merging if root appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _fresh_dir(parent: Path, prefix: str) -> Path:
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
        info = {
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
        _write_json(self.out / INFO_PATH, info)
        episodes = self.out / EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), episodes)
        tasks = pd.DataFrame({"task_index": list(self.tasks.values())}, index=pd.Index(list(self.tasks), name="task"))
        tasks.to_parquet(self.out / V3_TASKS_PATH)
        _write_json(self.out / STATS_PATH, _serialise(_aggregate_stats(self.episode_stats)))


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


def _deserialise(stats: dict) -> dict[str, dict[str, np.ndarray]]:
    return {k: {s: np.asarray(v) for s, v in d.items()} for k, d in stats.items()}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------------------- reading


def camera_name(video_key: str) -> str:
    """``observation.images.top`` -> ``top``; keys without that prefix are kept whole."""
    return video_key.removeprefix(CAMERA_PREFIX)


class LeRobotDataset:
    """Read-only view of a local LeRobot dataset (v2.0 / v2.1 per-episode files, or v3.0 shared files).

    The constructor validates ``meta/info.json`` and loads the episode and task metadata (ValueError naming the
    missing file, field or unsupported codebase_version). Episode data is read lazily: ``episode(i)`` decodes one
    episode into an ``Episode`` and raises ValueError listing what is wrong with its files; ``problems(i)`` returns
    those problems instead. Episodes are addressed by their LeRobot ``episode_index``.

    ``embodiment`` is used for episodes whose metadata does not name one (datasets not written by this module).
    """

    def __init__(self, root: Path | str, *, embodiment: str = "unknown") -> None:
        self.root = Path(root)
        self.default_embodiment = embodiment
        self.info = _load_info(self.root)
        self.version: str = self.info["codebase_version"]
        self.fps = round(float(self.info["fps"]))
        self.features: dict[str, dict] = self.info["features"]
        self.video_keys = [k for k, ft in self.features.items() if ft.get("dtype") == "video"]
        self.image_keys = [k for k, ft in self.features.items() if ft.get("dtype") == "image"]
        if self.version.startswith("v2."):
            self._check_files(V2_EPISODES_PATH, V2_TASKS_PATH)
            try:
                self.tasks = {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(self.root / V2_TASKS_PATH)}
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{self.root / V2_TASKS_PATH}: every line needs task_index and task ({err!r})") from err
            rows = _read_jsonl(self.root / V2_EPISODES_PATH)
        else:
            self._check_files(V3_TASKS_PATH)
            self.tasks = _load_v3_tasks(self.root / V3_TASKS_PATH)
            rows = _load_v3_episodes(self.root / V3_EPISODES_DIR)
        try:
            self._meta = {int(r["episode_index"]): r for r in rows}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.root}: an episode metadata row has no valid episode_index ({err!r})") from err
        self.episode_indices = sorted(self._meta)
        self.state_names = _feature_names(self.features[STATE_KEY])
        self.action_names = _feature_names(self.features[ACTION_KEY])
        self._table_cache: tuple[Path, pa.Table] | None = None  # the last shared v3.0 data file read
        if not self._v2:  # v3.0 finds an episode's rows and frames only through these columns
            needed = ["data/chunk_index", "data/file_index"] + [
                f"videos/{k}/{c}" for k in self.video_keys for c in ("chunk_index", "file_index", "from_timestamp")
            ]
            missing = sorted({c for r in rows for c in needed if c not in r})
            if missing:
                raise ValueError(f"{self.root}: {V3_EPISODES_DIR} parquet files lack columns {missing}")
        declared = self.info.get("total_episodes")
        if declared is not None and int(declared) != len(self._meta):
            raise ValueError(
                f"{self.root}: info.json says total_episodes={declared} but the episode metadata lists {len(self._meta)}"
            )

    def _check_files(self, *relative: str) -> None:
        missing = [r for r in relative if not (self.root / r).is_file()]
        if missing:
            raise ValueError(f"{self.root} is not a LeRobot {self.version} dataset: missing {', '.join(missing)}")

    def __len__(self) -> int:
        return len(self.episode_indices)

    def __iter__(self) -> Iterator[Episode]:
        for idx in self.episode_indices:
            yield self.episode(idx)

    def __repr__(self) -> str:
        return f"LeRobotDataset({str(self.root)!r}, {self.version}, {len(self)} episodes, fps={self.fps})"

    # ---- paths and metadata

    def episode_meta(self, episode_index: int) -> dict:
        """Metadata of one episode without reading its files: episode_index, length, task, instruction,
        embodiment, seed, extra (task falls back to the instruction, embodiment to the constructor's)."""
        meta = self._row(episode_index)
        tasks = list(meta.get("tasks") or [])
        instruction = str(tasks[0]) if tasks else ""
        return {
            "episode_index": episode_index,
            "length": int(meta.get("length", 0)),
            "instruction": instruction,
            "task": str(meta.get("task_name") or instruction),
            "embodiment": str(meta.get("embodiment") or self.default_embodiment),
            "seed": int(meta["seed"]) if meta.get("seed") is not None else -1,
            "extra": _extra(meta.get("extra")),
        }

    def data_file(self, episode_index: int) -> Path:
        """The parquet file holding this episode's frames (shared with other episodes in v3.0)."""
        meta = self._row(episode_index)
        if self._v2:
            chunk = episode_index // int(self.info["chunks_size"])
            return self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=episode_index)
        return self.root / self.info["data_path"].format(
            chunk_index=int(meta["data/chunk_index"]), file_index=int(meta["data/file_index"])
        )

    def video_file(self, episode_index: int, video_key: str) -> Path:
        """The mp4 holding this episode's ``video_key`` frames (shared with other episodes in v3.0)."""
        meta = self._row(episode_index)
        if self._v2:
            chunk = episode_index // int(self.info["chunks_size"])
            return self.root / self.info["video_path"].format(
                episode_chunk=chunk, video_key=video_key, episode_index=episode_index
            )
        return self.root / self.info["video_path"].format(
            video_key=video_key,
            chunk_index=int(meta[f"videos/{video_key}/chunk_index"]),
            file_index=int(meta[f"videos/{video_key}/file_index"]),
        )

    def episode_files(self, episode_index: int) -> list[Path]:
        """Existing data and video files of an episode (for copying it aside)."""
        paths = [self.data_file(episode_index)] + [self.video_file(episode_index, k) for k in self.video_keys]
        return [p for p in paths if p.is_file()]

    @property
    def _v2(self) -> bool:
        return self.version.startswith("v2.")

    def _row(self, episode_index: int) -> dict:
        try:
            return self._meta[int(episode_index)]
        except KeyError:
            raise IndexError(f"episode {episode_index} is not in {self.root} (episodes {self._span()})") from None

    def _span(self) -> str:
        return f"{self.episode_indices[0]}..{self.episode_indices[-1]}" if self.episode_indices else "none"

    # ---- episode data

    def episode(self, episode_index: int) -> Episode:
        """Decode one episode; ValueError naming every problem found in its files, IndexError for an unknown index."""
        self._row(episode_index)
        ep, problems = self.load_checked(episode_index)
        if problems:
            raise ValueError(f"{self.root} episode {episode_index}: " + "; ".join(problems))
        assert ep is not None
        return ep

    def problems(self, episode_index: int, *, min_length: int = 1) -> list[str]:
        """Human-readable problems of one episode's files (empty when it is usable)."""
        return self.load_checked(episode_index, min_length=min_length)[1]

    def load_checked(self, episode_index: int, *, min_length: int = 1) -> tuple[Episode | None, list[str]]:
        """Read and validate one episode in a single pass: ``(episode, [])`` or ``(None, problems)``.

        Checks: metadata entry, parquet present/readable with the required columns, finite state/actions whose
        widths match info.json, at least ``min_length`` frames, a length agreeing with the metadata, and every video
        present, decodable, of the declared size and with exactly one frame per parquet row.
        """
        if min_length < 1:
            raise ValueError(f"min_length must be at least 1, got {min_length}")
        if int(episode_index) not in self._meta:
            return None, [f"episode {episode_index} is not listed in the episode metadata (episodes {self._span()})"]
        meta = self.episode_meta(episode_index)
        problems: list[str] = []
        table = self._read_rows(episode_index, problems)
        n_rows = table.num_rows if table is not None else meta["length"]
        state = actions = success = None
        task_index = None
        if table is not None:
            if n_rows == 0:
                problems.append("episode has no frames")
            elif n_rows < min_length:
                problems.append(f"episode has {n_rows} frames, shorter than min_length={min_length}")
            if meta["length"] and n_rows != meta["length"]:
                problems.append(f"episode metadata says length {meta['length']} but the parquet has {n_rows} rows")
            state = self._vectors(table, STATE_KEY, problems)
            actions = self._vectors(table, ACTION_KEY, problems)
            success = self._flags(table, SUCCESS_KEY, problems)
            if "task_index" in table.column_names and n_rows:
                task_index = table.column("task_index")[0].as_py()
        frames = {}
        for key in self.video_keys:
            video = self._read_video(episode_index, key, n_rows, problems)
            if video is not None:
                frames[camera_name(key)] = video
        if table is not None:
            for key in self.image_keys:
                images = self._read_images(table, key, problems)
                if images is not None:
                    frames[camera_name(key)] = images
        if problems:
            return None, problems

        instruction = self.tasks.get(task_index, meta["instruction"]) if task_index is not None else meta["instruction"]
        if not instruction:
            return None, [f"episode {episode_index} has no task string (task_index {task_index} not in the tasks)"]
        assert state is not None and actions is not None
        try:
            episode = Episode(
                frames=frames,
                actions=actions,
                state=state,
                success=success if success is not None else np.zeros(n_rows, dtype=bool),
                task=str(self._row(episode_index).get("task_name") or instruction),
                instruction=instruction,
                embodiment=meta["embodiment"],
                fps=self.fps,
                seed=meta["seed"],
                extra=meta["extra"],
                state_names=self.state_names if self.state_names and len(self.state_names) == state.shape[1] else None,
                action_names=(self.action_names if self.action_names and len(self.action_names) == actions.shape[1]
                              else None),
            )
        except ValueError as err:  # inconsistent shapes across columns/videos
            return None, [str(err)]
        return episode, []

    def frame_table(self, episode_index: int) -> pa.Table:
        """This episode's rows of its parquet file (every non-video column), in frame order; ValueError when the
        file is missing, unreadable or lacks the state / action columns."""
        problems: list[str] = []
        table = self._read_rows(episode_index, problems)
        if table is None:
            raise ValueError(f"{self.root} episode {episode_index}: " + "; ".join(problems))
        return table

    def _read_rows(self, episode_index: int, problems: list[str]) -> pa.Table | None:
        path = self.data_file(episode_index)
        rel = path.relative_to(self.root)
        if not path.is_file():
            problems.append(f"missing parquet {rel}")
            return None
        try:
            if self._table_cache is not None and self._table_cache[0] == path:
                table = self._table_cache[1]
            else:
                table = pq.read_table(path)
                if not self._v2:  # shared by the next episodes, which are usually read next
                    self._table_cache = (path, table)
        except (pa.ArrowException, OSError) as err:
            problems.append(f"unreadable parquet {rel}: {err}")
            return None
        required = [STATE_KEY, ACTION_KEY] + ([] if self._v2 else ["episode_index"])
        missing = [c for c in required if c not in table.column_names]
        if missing:
            problems.append(f"parquet {rel} is missing required columns {missing}")
            return None
        if not self._v2:  # shared file: keep this episode's rows
            table = table.filter(pc.equal(table.column("episode_index"), episode_index))
        if "frame_index" in table.column_names and table.num_rows:
            table = table.sort_by("frame_index")
        return table

    def _vectors(self, table: pa.Table, key: str, problems: list[str]) -> np.ndarray | None:
        try:
            a = np.asarray(table.column(key).to_pylist(), dtype=np.float32)
        except (TypeError, ValueError) as err:  # nulls or ragged rows
            problems.append(f"{key} has null or ragged rows ({err})")
            return None
        a = a.reshape(len(a), -1)
        declared = self.features.get(key, {}).get("shape")
        if declared and len(a) and a.shape[1] != int(np.prod(declared)):
            problems.append(f"{key} has width {a.shape[1]} but info.json declares shape {list(declared)}")
        bad = int((~np.isfinite(a)).sum())
        if bad:
            problems.append(f"{key} has {bad} non-finite values (NaN/inf)")
        return a

    def _flags(self, table: pa.Table, key: str, problems: list[str]) -> np.ndarray | None:
        if key not in table.column_names:
            return None
        column = table.column(key)
        if column.null_count:
            problems.append(f"{key} has {column.null_count} null values")
            return None
        return np.asarray(column.to_pylist(), dtype=bool).reshape(-1)

    def _read_video(self, episode_index: int, key: str, T: int, problems: list[str]) -> np.ndarray | None:
        path = self.video_file(episode_index, key)
        rel = path.relative_to(self.root)
        if not path.is_file():
            problems.append(f"missing video {rel}")
            return None
        start = 0.0 if self._v2 else float(self._row(episode_index)[f"videos/{key}/from_timestamp"])
        try:
            frames = _decode_video(path, start=start, count=T if not self._v2 else None, fps=self.fps)
        except _DECODE_ERRORS as err:
            problems.append(f"undecodable video {rel}: {err}")
            return None
        if len(frames) != T:
            problems.append(f"video {rel} has {len(frames)} frames for this episode, the parquet has {T} rows")
            return None
        expected = _feature_hw(self.features[key])
        if expected and frames.shape[1:3] != expected:
            problems.append(f"video {rel} frames are {frames.shape[1]}x{frames.shape[2]}, info.json says "
                            f"{expected[0]}x{expected[1]}")
            return None
        return frames

    def _read_images(self, table: pa.Table, key: str, problems: list[str]) -> np.ndarray | None:
        # "image" features store an encoded image (PNG) per row as {"bytes", "path"}; PyAV decodes those too
        if key not in table.column_names:
            problems.append(f"parquet is missing image column {key}")
            return None
        try:
            images = []
            for cell in table.column(key).to_pylist():
                source = cell["bytes"] if cell.get("bytes") else str(self.root / cell["path"])
                images.append(_decode_image(source))
            return np.stack(images) if images else None
        except (*_DECODE_ERRORS, KeyError, TypeError) as err:
            problems.append(f"undecodable images in {key}: {err}")
            return None


def _load_info(root: Path) -> dict:
    path = root / INFO_PATH
    if not path.is_file():
        raise ValueError(f"{root} is not a LeRobot dataset: missing {INFO_PATH}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object")
    required = ["codebase_version", "fps", "features", "data_path"]
    missing = [k for k in required if k not in info]
    if missing:
        raise ValueError(f"{path} is missing required fields {missing}")
    version = str(info["codebase_version"])
    if version not in _SUPPORTED_READ_VERSIONS:
        raise ValueError(f"{path}: unsupported LeRobot codebase_version {version!r} (supported: "
                         f"{', '.join(_SUPPORTED_READ_VERSIONS)})")
    if version.startswith("v2.") and "chunks_size" not in info:
        raise ValueError(f"{path} is missing required field 'chunks_size' (needed by the {version} path templates)")
    features = info["features"]
    if not isinstance(features, dict):
        raise ValueError(f"{path}: 'features' must be an object")
    missing = [k for k in (STATE_KEY, ACTION_KEY) if k not in features]
    if missing:
        raise ValueError(f"{path}: features {missing} are required to build episodes")
    for key, ft in features.items():
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise ValueError(f"{path}: feature {key!r} needs 'dtype' and 'shape'")
    if any(ft["dtype"] == "video" for ft in features.values()) and not info.get("video_path"):
        raise ValueError(f"{path} has video features but no 'video_path'")
    return info


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n} is not valid JSON: {err}") from err
    return rows


def _load_v3_tasks(path: Path) -> dict[int, str]:
    df = pd.read_parquet(path)
    if "task_index" not in df.columns:
        raise ValueError(f"{path} has no 'task_index' column")
    strings = df["task"] if "task" in df.columns else df.index  # LeRobot v3 keeps the task string as the index
    return {int(i): str(t) for i, t in zip(df["task_index"], strings, strict=True)}


def _load_v3_episodes(directory: Path) -> list[dict]:
    files = sorted(directory.glob("*/*.parquet"))
    if not files:
        raise ValueError(f"{directory.parent.parent} is not a LeRobot v3.0 dataset: no parquet files under "
                         f"{V3_EPISODES_DIR}/")
    rows = []
    for f in files:
        df = pd.read_parquet(f)
        df = df[[c for c in df.columns if not c.startswith("stats/")]]  # stats are not needed to read episodes
        for record in df.to_dict("records"):
            rows.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()})
    return rows


def _feature_names(ft: dict) -> tuple[str, ...] | None:
    """A vector feature's column names: LeRobot stores a list, or (older datasets) a dict with one list such as
    ``{"motors": [...]}``; None when absent or not a flat list of strings."""
    names = ft.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n for n in names):
        return tuple(names)
    return None


def _extra(value: Any) -> dict:
    """The ``extra`` of an episode row: a dict (v2.x jsonl) or JSON text (our v3.0 column)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return dict(value) if isinstance(value, dict) else {}


def _feature_hw(ft: dict) -> tuple[int, int] | None:
    shape, names = list(ft.get("shape") or []), list(ft.get("names") or [])
    if len(shape) != 3:
        return None
    if "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if shape[0] == 3 and shape[-1] != 3:  # channel-first without names
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def _decode_video(path: Path, *, start: float = 0.0, count: int | None = None, fps: int = 1) -> np.ndarray:
    """Decode a video to uint8 (T, H, W, 3); with ``count``, only the ``count`` frames from ``start`` seconds."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if start > 0 and stream.time_base:
            # shared v3.0 file: jump to the keyframe at or before the episode (a tick early, as LeRobot does)
            container.seek(max(0, round(start / stream.time_base) - 1), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if count is not None:
                # frame slot relative to the episode start; rounding absorbs the container's time-base jitter
                k = round(((frame.time or 0.0) - start) * fps)
                if k < 0:
                    continue
                if k >= count:
                    break
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.stack(frames)


def _decode_image(source: bytes | str) -> np.ndarray:
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")


def validate_episode_files(root: Path, episode_index: int, *, min_length: int = 1) -> list[str]:
    """Problems with one episode's files (missing or unreadable parquet, missing columns, NaN state/actions,
    missing / truncated / undecodable video, video frame count != parquet rows, fewer than ``min_length`` frames).
    An empty list means the episode is usable. Dataset-level metadata problems raise ValueError instead."""
    return LeRobotDataset(root).problems(episode_index, min_length=min_length)


# --------------------------------------------------------------------------------------------------------- importing


def import_lerobot(src: Path, dst: Path, *, embodiment: str, min_length: int = 1) -> dict:
    """Import a local LeRobot dataset (v2.0 / v2.1 / v3.0) into a fresh v3.0 dataset at ``dst``, quarantining bad
    episodes.

    Every episode is validated (see ``LeRobotDataset.load_checked``); good ones are re-written through
    ``write_lerobot_dataset`` with ``embodiment`` (the adapter key for this robot, which overrides any per-episode
    value) and renumbered 0..n-1 in source order. Bad ones have their files and the source ``meta/`` copied into
    ``<dst>_quarantine/`` with ``report.json`` listing each ``episode_index`` and its reasons; ``src`` is never
    modified. Returns ``{"imported", "quarantined", "report_path"}`` (counts, and the report's path as a string so
    the summary is JSON-ready; None when nothing was quarantined). Raises ValueError when ``dst`` or the quarantine
    folder already exists, when the source metadata is unusable, or when no episode survives validation (the
    quarantine is still written then).
    """
    src, dst = Path(src), Path(dst)
    if not embodiment:
        raise ValueError("embodiment must name the embodiment adapter of the imported robot")
    if min_length < 1:
        raise ValueError(f"min_length must be at least 1, got {min_length}")
    quarantine = dst.parent / f"{dst.name}_quarantine"
    for path in (dst, quarantine):
        if path.exists():
            raise ValueError(f"{path} already exists; import into a new destination")
    ds = LeRobotDataset(src, embodiment=embodiment)
    report: list[dict] = []
    staging: list[Path] = []  # the quarantine is built in a temporary folder too, renamed once the import is decided

    def set_aside(idx: int, reasons: list[str]) -> None:
        if not staging:
            dst.parent.mkdir(parents=True, exist_ok=True)
            staging.append(_fresh_dir(dst.parent, f".{quarantine.name}.tmp-"))
            shutil.copytree(src / "meta", staging[0] / "meta")
        copied = []
        for f in ds.episode_files(idx):
            rel = f.relative_to(src)
            target = staging[0] / rel
            if not target.exists():  # v3.0 files are shared by several episodes
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
            copied.append(str(rel))
        report.append({"episode_index": idx, "reasons": reasons, "files": copied})

    def good_episodes() -> Iterator[Episode]:
        for idx in ds.episode_indices:
            ep, problems = ds.load_checked(idx, min_length=min_length)
            if problems:
                set_aside(idx, problems)
                continue
            assert ep is not None
            yield dataclasses.replace(ep, embodiment=embodiment)

    def publish_quarantine(imported: int) -> str | None:
        if not staging:
            return None
        report_file = staging[0] / "report.json"
        _write_json(report_file, {"source": str(src), "destination": str(dst), "min_length": min_length,
                                  "imported": imported, "quarantined": report})
        os.rename(staging[0], quarantine)
        staging.clear()
        return str(quarantine / "report.json")

    try:
        stream = good_episodes()
        first = next(stream, None)
        if first is None:
            report_path = publish_quarantine(0)
            raise ValueError(f"no usable episodes in {src}: all {len(report)} were quarantined; see {report_path}")
        counted = _Counter(itertools.chain([first], stream))
        write_lerobot_dataset(dst, counted, robot_type=str(ds.info.get("robot_type") or embodiment), fps=ds.fps)
        report_path = publish_quarantine(counted.n)
    except BaseException:
        for tmp in staging:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"imported": counted.n, "quarantined": len(report), "report_path": report_path}


class _Counter:
    """Iterable wrapper counting what the writer consumed."""

    def __init__(self, items: Iterable[Episode]) -> None:
        self._items, self.n = items, 0

    def __iter__(self) -> Iterator[Episode]:
        for item in self._items:
            self.n += 1
            yield item
