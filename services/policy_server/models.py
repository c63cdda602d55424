"""The served model versions: loading one (registry URI or directory) and following a registry alias as it moves.

A ``ModelHandle`` is one loaded ``ChunkPolicy`` and the version string every response carries. Sessions hold the
handle they began on, so an old version stays in memory exactly as long as sessions use it; a handle marked
``retired`` tells its sessions to reset instead.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.policy import ChunkPolicy
from pipelines.data.embodiments import get_adapter
from pipelines.settings import parse_model_uri
from pipelines.tracking_store import resolve_model

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelHandle:
    """One loaded model version."""

    policy: ChunkPolicy
    version: str  # "<registered name>/<version>" or "dir-<content hash>"
    model_dir: Path
    registered_name: str | None = None
    registered_version: str | None = None
    retired: bool = False  # sessions begun on it must reset

    @property
    def embodiment(self) -> str:
        return self.policy.adapter.name


def load_model(model: str | Path, data_dir: Path, device: str = "cpu") -> ModelHandle:
    """A registry URI (``models:/<name>@<alias>`` / ``models:/<name>/<version>``, downloaded under ``data_dir``) or a
    model directory, loaded as a ``ChunkPolicy``. Uses the current MLflow tracking URI; bad input raises ValueError."""
    model_dir, name, number = resolve_model(model, data_dir)
    policy = ChunkPolicy.load(model_dir, get_adapter, device=device)
    version = f"{name}/{number}" if name else f"dir-{content_hash(model_dir)}"
    return ModelHandle(policy, version, Path(model_dir), name, number)


def content_hash(model_dir: str | Path, length: int = 12) -> str:
    """Hash of every file's relative path and bytes: a local directory's version (changes whenever a file does)."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:length]


def alias_of(model: str) -> tuple[str, str] | None:
    """(registered name, alias) of a ``models:/<name>@<alias>`` URI; None for versions and directories."""
    uri = parse_model_uri(model)
    return (uri.name, uri.alias) if uri and uri.alias else None


class AliasWatcher:
    """Polls ``models:/<name>@<alias>`` every ``interval_s``; when it points at a new version, loads that version in
    this background thread and hands it to ``on_new`` (the switch itself is the caller's, and atomic there).

    A failed poll or load is logged and retried at the next poll: serving continues on the current version.
    """

    def __init__(self, name: str, alias: str, current_version: str | None, interval_s: float,
                 load: Callable[[str], ModelHandle], on_new: Callable[[ModelHandle], None]):
        self.name, self.alias, self.interval_s = name, alias, interval_s
        self.current_version = current_version
        self._load, self._on_new = load, on_new
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"alias-watcher-{name}", daemon=True)

    def start(self) -> AliasWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def poll(self) -> bool:
        """Check the alias once; True when a new version was loaded and handed over."""
        import mlflow

        mv = mlflow.MlflowClient().get_model_version_by_alias(self.name, self.alias)
        if str(mv.version) == self.current_version:
            return False
        log.info("models:/%s@%s moved to version %s; loading it", self.name, self.alias, mv.version)
        handle = self._load(f"models:/{self.name}/{mv.version}")
        self.current_version = str(mv.version)
        self._on_new(handle)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as err:  # a registry hiccup must never take the server down
                log.warning("polling models:/%s@%s failed (serving continues): %s", self.name, self.alias, err)
