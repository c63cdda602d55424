"""Read local LeRobot datasets (v2.0 / v2.1 / v3.0) as validated ``Episode``s (``LeRobotDataset``)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.episode import Episode
from pipelines.data.lerobot.format import (
    ACTION_KEY,
    INFO_PATH,
    STATE_KEY,
    SUCCESS_KEY,
    V2_EPISODES_PATH,
    V2_TASKS_PATH,
    V3_EPISODES_DIR,
    V3_TASKS_PATH,
    camera_name,
)

_SUPPORTED_READ_VERSIONS = ("v2.0", "v2.1", "v3.0")
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError, EOFError)


class LeRobotDataset:
    """Read-only view of a local LeRobot dataset (v2.0 / v2.1 per-episode files, or v3.0 shared files).

    The constructor validates ``meta/info.json`` and loads the episode and task metadata (ValueError naming the
    missing file, field or unsupported codebase_version). Episode data is read lazily: ``episode(i)`` decodes one
    episode into an ``Episode`` and raises ValueError listing what is wrong with its files; ``problems(i)`` returns
    those problems instead. Episodes are addressed by their LeRobot ``episode_index``.

    ``embodiment`` is used for episodes whose metadata does not name one (datasets not written by ``write_lerobot_dataset``).
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
