"""Import a local LeRobot dataset into a fresh v3.0 dataset, quarantining the episodes that fail validation."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.data.episode import Episode
from pipelines.data.lerobot.reader import LeRobotDataset
from pipelines.data.lerobot.writer import fresh_dir, write_json, write_lerobot_dataset


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
            staging.append(fresh_dir(dst.parent, f".{quarantine.name}.tmp-"))
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
        write_json(report_file, {"source": str(src), "destination": str(dst), "min_length": min_length,
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
