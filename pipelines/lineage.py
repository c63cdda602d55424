"""Data lineage in MLflow: the DVC hashes of the data a run used as MLflow dataset inputs, the git commit, and one
parent run grouping a pipeline's runs.

    versions = data_versions(data_dir, ("episodes", "prepared", "latents"))   # {name: DataVersion}
    with mlflow.start_run(tags=run_tags(versions)):                           # parent run, git commit, dvc.<name>
        log_data_inputs(versions, context="training")                         # mlflow.log_input per folder

A folder's hash is the one DVC records for it: the ``md5`` of its ``outs`` entry in the ``dvc.lock`` of the DVC
project around it (found by walking up from the folder; what ``dvc repro`` wrote when the stage that produced it
finished). A folder no lock entry names (a data dir outside a DVC project, e.g. a cluster volume) is hashed the way
DVC hashes a directory (``dvc_data``'s ``build``, the ``<md5>.dir`` that ``dvc add`` would record), and the input says
so (tag ``dvc.source``: ``dvc.lock`` or ``computed``; above ``LINGBOT_LINEAGE_HASH_LIMIT_GB`` a listing digest,
``listing``). The hash is the MLflow dataset's digest (MLflow's limit is 36
characters: exactly a DVC directory hash).

Parent run: the runs of one pipeline (pre-training, post-training per task, the gates) share the parent run named by
``LINGBOT_PIPELINE_RUN_ID`` when it is set (an orchestrator that created one), else the run ``pipeline-<hash>`` in
experiment ``lingbot-pipeline`` for the latents they use, created by the first of them: one DVC repro of the DAG on
one data version is one group.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.settings import REPO_ROOT

PIPELINE_EXPERIMENT = "lingbot-pipeline"
HASH_LIMIT_ENV = "LINGBOT_LINEAGE_HASH_LIMIT_GB"
DEFAULT_HASH_LIMIT_GB = 20.0
"""Folders no dvc.lock names are hashed as DVC would up to this size; larger ones get a listing digest (relative
paths and sizes, suffix ``.lst``, tag ``dvc.source=listing``) rather than a read of every byte."""
PARENT_ENV = "LINGBOT_PIPELINE_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
DATA_FOLDERS = ("episodes", "prepared", "latents")
"""The data a training run depends on, produced by the DVC stages collect, prepare and encode."""


@dataclass(frozen=True)
class DataVersion:
    """The DVC identity of one data folder."""

    name: str
    path: Path
    md5: str  # DVC's hash: "<md5>.dir" for a folder
    source: str  # "dvc.lock" (what DVC recorded), "computed" (hashed here as DVC would) or "listing" (paths + sizes)
    stage: str | None = None  # the DVC stage that produced it (from dvc.lock)
    size: int | None = None
    nfiles: int | None = None

    def tags(self) -> dict[str, str]:
        """Dataset-input tags: the hash, where it came from, the producing stage, size and file count."""
        tags = {"dvc.md5": self.md5, "dvc.source": self.source, "dvc.path": str(self.path)}
        for key, value in (("dvc.stage", self.stage), ("dvc.size", self.size), ("dvc.nfiles", self.nfiles)):
            if value is not None:
                tags[key] = str(value)
        return tags


def _lock_entries(folder: Path) -> tuple[Path, dict] | None:
    """(project root, dvc.lock) of the nearest DVC project above ``folder``."""
    for parent in folder.parents:
        lock = parent / "dvc.lock"
        if lock.is_file():
            return parent, yaml.safe_load(lock.read_text()) or {}
        if (parent / ".dvc").is_dir():  # a project without a lock yet
            return None
    return None


def data_version(folder: Path, name: str | None = None) -> DataVersion:
    """The DVC hash of ``folder`` (see the module docstring); ValueError when it does not exist."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: nothing to version")
    name = name or folder.name
    found = _lock_entries(folder)
    if found is not None:
        root, lock = found
        for stage, entry in (lock.get("stages") or {}).items():
            for out in entry.get("outs") or []:
                if (root / out.get("path", "")).resolve() == folder and out.get("md5"):
                    return DataVersion(name, folder, out["md5"], "dvc.lock", stage, out.get("size"), out.get("nfiles"))
    files = [f for f in folder.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    if size > float(os.environ.get(HASH_LIMIT_ENV, DEFAULT_HASH_LIMIT_GB)) * 2**30:
        # reading terabytes at every run start is not an option: name the folder by its listing instead, and say so
        listing = sorted((str(f.relative_to(folder)), f.stat().st_size) for f in files)
        digest = hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".lst"
        return DataVersion(name, folder, digest, "listing", None, size, len(files))
    md5, size, nfiles = _dvc_dir_hash(folder)
    return DataVersion(name, folder, md5, "computed", None, size, nfiles)


def _dvc_dir_hash(folder: Path) -> tuple[str, int | None, int | None]:
    """``<md5>.dir`` as ``dvc add`` computes it (dvc_data builds the directory's tree object)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="lingbot-dvc-hash-") as tmp:
        _, meta, obj = build(HashFileDB(fs, tmp), str(folder), fs, "md5")
    return obj.hash_info.value, meta.size, meta.nfiles


def data_versions(data_dir: Path, names: Sequence[str] = DATA_FOLDERS) -> dict[str, DataVersion]:
    """``data_version`` of each existing ``<data_dir>/<name>``."""
    return {n: data_version(Path(data_dir) / n, n) for n in names if (Path(data_dir) / n).is_dir()}


def log_data_inputs(versions: Mapping[str, DataVersion], context: str) -> None:
    """``mlflow.log_input`` of each folder in the active run: a ``MetaDataset`` whose digest is the DVC hash and
    whose source is the folder, tagged with ``DataVersion.tags``."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for version in versions.values():
        with warnings.catch_warnings():  # a local path matches the file scheme twice; MLflow picks the local source
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(version.path))
        dataset = MetaDataset(source, name=version.name, digest=version.md5)
        mlflow.log_input(dataset, context=context, tags=version.tags())


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the code's git checkout (None outside one, or without git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def pipeline_parent(versions: Mapping[str, DataVersion], data_dir: Path) -> str | None:
    """The parent run of this pipeline's runs: ``LINGBOT_PIPELINE_RUN_ID``, else the ``lingbot-pipeline`` run of
    the latents' hash (created on first use); None without latents to key it on."""
    import mlflow

    from pipelines.tracking_store import ensure_experiment

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = versions.get("latents")
    if key is None:
        return None
    client = mlflow.MlflowClient()
    experiment = ensure_experiment(PIPELINE_EXPERIMENT, data_dir)
    found = client.search_runs([experiment], f"tags.`pipeline.data_version` = '{key.md5}'", max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"pipeline-{key.md5[:8]}",
                            tags={"pipeline.data_version": key.md5, **{f"dvc.{n}": v.md5 for n, v in versions.items()}})
    with_commit = git_commit()
    if with_commit:
        client.set_tag(run.info.run_id, "git_commit", with_commit)
    client.set_terminated(run.info.run_id)  # a grouping record, not something that runs
    return run.info.run_id


def run_tags(versions: Mapping[str, DataVersion], data_dir: Path) -> dict[str, str]:
    """Tags every run of the pipeline gets: ``dvc.<name>`` hashes, ``git_commit``, and the parent run."""
    tags = {f"dvc.{name}": v.md5 for name, v in versions.items()}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    parent = pipeline_parent(versions, data_dir)
    if parent:
        tags[PARENT_TAG] = parent
    return tags
