"""The feature store of the platform: per-embodiment and per-task features that training and serving read alike.

The definitions live in ``infra/feast`` (entities ``embodiment`` and ``task``; views ``norm_stats``,
``embodiment_meta`` and ``task_meta``). This module is everything around them:

    FeatureRepo     a ``feast.FeatureStore`` whose registry, sqlite online store and parquet offline files live in
                    the ignored data dir (default ``<repo>/data/feast``), so ``infra/feast`` stays machine-independent
    publish         append rows to the parquet offline sources (the source of truth, with history) and materialise
                    the newest row per entity into the online store
    read_features   THE one read path of training and serving: online features of an embodiment (and a task) as
                    numpy arrays; unknown entities raise ``ValueError``
    snapshot / load_snapshot
                    JSON form of what ``read_features`` returned, for a model directory's config, and back

Feast runs fully offline: the local provider needs no server, and usage telemetry is switched off before Feast is
imported (0.67 no longer ships a telemetry module; the variable guards older or patched versions).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from model.normalization import SNAPSHOT_FORMAT

if TYPE_CHECKING:
    from feast import Entity, FeatureStore, FeatureView, RepoConfig

# Feast is imported lazily (about 3 s on 2 cores), so modules that merely import read_features stay cheap; this runs
# first, before any Feast import of ours.
os.environ.setdefault("FEAST_USAGE", "False")

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPO_PATH = REPO_ROOT / "infra" / "feast"
UNIFIED_ACTION_DIM = 30
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# read_features' result section -> (feature view, entity join key)
SECTIONS = {"norm_stats": ("norm_stats", "embodiment"), "embodiment": ("embodiment_meta", "embodiment"),
            "task": ("task_meta", "task")}


def _load_definitions(repo_path: Path) -> ModuleType:
    """Import ``<repo_path>/features.py`` fresh (``infra`` is no package; a private copy keeps stores independent)."""
    path = repo_path / "features.py"
    spec = importlib.util.spec_from_file_location(f"_lingbot_feast_defs_{id(repo_path):x}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no Feast definitions at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FeatureRepo:
    """The platform's Feast feature store: definitions from ``repo_path``, every generated file under ``data_dir``.

    ``feature_store.yaml`` names the registry, the sqlite database and (in ``features.py``) the parquet sources by
    relative paths; Feast resolves those against ``RepoConfig.repo_path``, which is set to ``data_dir`` here.
    ``data_dir`` defaults to ``DataSettings().feast_dir`` (``<repo>/data/feast``, or ``$LINGBOT_DATA_DIR/feast``).
    """

    def __init__(self, repo_path: Path = DEFAULT_REPO_PATH, data_dir: Path | None = None) -> None:
        if data_dir is None:
            from pipelines.settings import DataSettings

            data_dir = DataSettings().feast_dir
        self.repo_path = Path(repo_path).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        from feast import FeatureStore, RepoConfig

        raw = yaml.safe_load(os.path.expandvars((self.repo_path / "feature_store.yaml").read_text()))
        self.config: RepoConfig = RepoConfig(repo_path=self.data_dir, **raw)
        self.store: FeatureStore = FeatureStore(repo_path=str(self.data_dir), config=self.config)
        defs = _load_definitions(self.repo_path)
        self.entities: dict[str, Entity] = {e.name: e for e in defs.ENTITIES}
        self.feature_views: dict[str, FeatureView] = {v.name: v for v in defs.FEATURE_VIEWS}

    def __repr__(self) -> str:
        return f"FeatureRepo(repo_path={str(self.repo_path)!r}, data_dir={str(self.data_dir)!r})"

    def apply(self) -> None:
        """Register entities and feature views and create the online tables (``feast apply``); idempotent."""
        self.store.apply([*self.entities.values(), *self.feature_views.values()])

    def is_applied(self) -> bool:
        """Whether every feature view of the definitions is registered."""
        registered = {v.name for v in self.store.list_feature_views()}
        return set(self.feature_views) <= registered

    def source_path(self, view: str) -> Path:
        """The parquet offline source of a feature view."""
        from feast import FileSource

        source = self.feature_views[view].batch_source
        assert isinstance(source, FileSource), f"{view} is not backed by a FileSource"
        return Path(FileSource.get_uri_for_file_path(self.data_dir, source.path))

    def offline_table(self, view: str) -> pa.Table | None:
        """Every row ever published to a view (history included), or None before the first publish."""
        path = self.source_path(view)
        return pq.read_table(path) if path.exists() else None

    def publish(
        self,
        embodiment_stats: Mapping[str, Mapping],
        embodiment_meta: Mapping[str, Mapping],
        task_meta: Mapping[str, Mapping],
        timestamp: datetime | None = None,
    ) -> None:
        """Append rows to the offline parquet sources, then materialise them into the online store.

        embodiment_stats: embodiment -> ``action_q01/q99/mean/std`` (30 each; or ``ActionNormalizer.to_dict()``
                          under ``"action"``), ``state_mean``, ``state_std``, ``dataset_version``
        embodiment_meta:  embodiment -> ``action_mask`` (30 bools or 0/1; or ``channel_mask``, as in
                          ``Embodiment.to_dict()``), ``action_low``, ``action_high``
                          (``native_action_dim`` each), ``control_rate_hz``, ``camera_keys``, ``native_action_dim``
        task_meta:        task -> ``instruction``, ``horizon``, ``instruction_embedding`` (any shape; stored
                          flattened with its shape), ``embodiment``
        timestamp:        event time of every row (default now; naive means UTC). The newest event time per entity
                          is what ``read_features`` returns; same event time -> the later publish wins.
        Any mapping may be empty. Keys a view does not define are ignored (e.g. the normaliser's ``clip``).
        """
        ts = _utc(timestamp) if timestamp is not None else datetime.now(UTC)
        rows = {
            "norm_stats": [_norm_stats_row(e, d) for e, d in embodiment_stats.items()],
            "embodiment_meta": [_embodiment_meta_row(e, d) for e, d in embodiment_meta.items()],
            "task_meta": [_task_meta_row(t, d) for t, d in task_meta.items()],
        }
        if not any(rows.values()):
            return
        if not self.is_applied():
            self.apply()
        created = datetime.now(UTC)
        newest = ts
        for view, view_rows in rows.items():
            if view_rows:
                newest = max(newest, self._append(view, view_rows, ts, created))
        # Re-materialise every view from the epoch: at this size it is milliseconds, and unlike
        # materialize_incremental it cannot miss a new entity published with an older event time.
        end = max(newest, datetime.now(UTC)) + timedelta(seconds=1)
        views = [v for v in self.feature_views if self.source_path(v).exists()]
        with contextlib.redirect_stdout(io.StringIO()) as out:  # Feast prints coloured progress lines
            self.store.materialize(EPOCH, end, feature_views=views)
        log.debug("feast materialize: %s", out.getvalue())

    def _append(self, view: str, view_rows: list[dict], ts: datetime, created: datetime) -> datetime:
        """Append rows to a view's parquet file in the schema the view declares (atomic replace); newest event time."""
        from feast.types import from_feast_to_pyarrow_type

        fv = self.feature_views[view]
        join_key = self.entities[fv.entities[0]].join_key
        source = fv.batch_source
        time_type = pa.timestamp("us", tz="UTC")
        fields = [pa.field(join_key, pa.string())]
        fields += [pa.field(f.name, from_feast_to_pyarrow_type(f.dtype)) for f in fv.features]
        fields += [pa.field(source.timestamp_field, time_type), pa.field(source.created_timestamp_column, time_type)]
        schema = pa.schema(fields)
        stamped = [{**r, source.timestamp_field: ts, source.created_timestamp_column: created} for r in view_rows]
        table = pa.Table.from_pylist(stamped, schema=schema)
        path = self.source_path(view)
        if path.exists():
            old = pq.read_table(path)
            try:
                old = old.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(f"{path} does not match the {view} definition ({err}); move it aside and republish") from err
            table = pa.concat_tables([old, table])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return pc.max(table.column(source.timestamp_field)).as_py()


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


# ---------------------------------------------------------------------------------------------------------------
# Row validation: a bad value must fail at publish time, not when a robot reads it.


def _require(kind: str, key: str, d: Mapping, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in d or d[n] is None]
    if missing:
        raise ValueError(f"{kind} {key!r}: missing {missing}")


def _vector(kind: str, key: str, name: str, value: Any, length: int | None = None) -> list[float]:
    a = np.asarray(value, dtype=np.float64)
    if a.ndim != 1 or (length is not None and len(a) != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{kind} {key!r}: {name} must be {want}, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{kind} {key!r}: {name} contains NaN or inf")
    return np.asarray(value, dtype=np.float32).tolist()


def _norm_stats_row(embodiment: str, d: Mapping) -> dict:
    kind = "embodiment stats"
    d = dict(d)
    # accept ActionNormalizer.to_dict() nested under "action" as well as the flat feature names
    for k, v in (d.get("action") or {}).items():
        d.setdefault(f"action_{k}", v)
    names = ("action_q01", "action_q99", "action_mean", "action_std", "state_mean", "state_std", "dataset_version")
    _require(kind, embodiment, d, names)
    row: dict[str, Any] = {"embodiment": _key(kind, embodiment)}
    for n in names[:4]:
        row[n] = _vector(kind, embodiment, n, d[n], UNIFIED_ACTION_DIM)
    row["state_mean"] = _vector(kind, embodiment, "state_mean", d["state_mean"])
    row["state_std"] = _vector(kind, embodiment, "state_std", d["state_std"], len(row["state_mean"]))
    if np.any(np.asarray(row["action_q99"]) < np.asarray(row["action_q01"])):
        raise ValueError(f"{kind} {embodiment!r}: action_q99 < action_q01")
    row["dataset_version"] = str(d["dataset_version"])
    return row


def _embodiment_meta_row(embodiment: str, d: Mapping) -> dict:
    kind = "embodiment meta"
    d = dict(d)
    if "action_mask" not in d and "channel_mask" in d:  # accept pipelines.data.embodiments.Embodiment.to_dict()
        d["action_mask"] = d["channel_mask"]
    names = ("action_mask", "action_low", "action_high", "control_rate_hz", "camera_keys", "native_action_dim")
    _require(kind, embodiment, d, names)
    mask = np.asarray(d["action_mask"])
    if mask.shape != (UNIFIED_ACTION_DIM,) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{kind} {embodiment!r}: action_mask must be {UNIFIED_ACTION_DIM} bools or 0/1, got {mask!r}")
    dim = int(d["native_action_dim"])
    if dim < 1 or dim != d["native_action_dim"]:
        raise ValueError(f"{kind} {embodiment!r}: native_action_dim must be a positive integer, got {d['native_action_dim']!r}")
    rate = float(d["control_rate_hz"])
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"{kind} {embodiment!r}: control_rate_hz must be positive, got {rate}")
    cams = d["camera_keys"]
    if isinstance(cams, str) or not all(isinstance(c, str) for c in cams):
        raise ValueError(f"{kind} {embodiment!r}: camera_keys must be a list of strings, got {cams!r}")
    low = _vector(kind, embodiment, "action_low", d["action_low"], dim)
    high = _vector(kind, embodiment, "action_high", d["action_high"], dim)
    if np.any(np.asarray(high) < np.asarray(low)):
        raise ValueError(f"{kind} {embodiment!r}: action_high < action_low")
    return {"embodiment": _key(kind, embodiment), "action_mask": mask.astype(bool).tolist(), "action_low": low,
            "action_high": high, "control_rate_hz": rate, "camera_keys": list(cams), "native_action_dim": dim}


def _task_meta_row(task: str, d: Mapping) -> dict:
    kind = "task meta"
    _require(kind, task, d, ("instruction", "horizon", "instruction_embedding", "embodiment"))
    emb = d["instruction_embedding"]
    if hasattr(emb, "detach"):  # a torch tensor from the text encoder
        emb = emb.detach().cpu().float().numpy()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.size == 0 or not np.isfinite(emb).all():
        raise ValueError(f"task meta {task!r}: instruction_embedding is empty or contains NaN/inf")
    shape = list(emb.shape)
    if d.get("instruction_embedding_shape") is not None:  # needed only when the embedding comes pre-flattened
        given = [int(x) for x in d["instruction_embedding_shape"]]
        if int(np.prod(given)) != emb.size or (emb.ndim > 1 and given != shape):
            raise ValueError(f"task meta {task!r}: instruction_embedding_shape {given} does not fit an embedding {shape}")
        shape = given
    horizon = int(d["horizon"])
    if horizon < 1 or horizon != d["horizon"]:
        raise ValueError(f"task meta {task!r}: horizon must be a positive integer, got {d['horizon']!r}")
    return {"task": _key(kind, task), "instruction": str(d["instruction"]), "horizon": horizon,
            "instruction_embedding": emb.reshape(-1).tolist(), "instruction_embedding_shape": shape,
            "embodiment": _key(kind, d["embodiment"])}


def _key(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{kind}: entity keys must be non-empty strings, got {key!r}")
    return key


# ---------------------------------------------------------------------------------------------------------------
# The public functions


@lru_cache(maxsize=1)
def default_repo() -> FeatureRepo:
    """The process-wide ``FeatureRepo()`` over the default data dir (opened once: Feast setup is not free)."""
    return FeatureRepo()


def publish(
    embodiment_stats: Mapping[str, Mapping],
    embodiment_meta: Mapping[str, Mapping],
    task_meta: Mapping[str, Mapping],
    timestamp: datetime | None = None,
    *,
    repo: FeatureRepo | None = None,
) -> None:
    """``FeatureRepo.publish`` on ``repo`` (default: ``default_repo()``); registers the definitions if needed."""
    (repo or default_repo()).publish(embodiment_stats, embodiment_meta, task_meta, timestamp)


def publish_features(
    repo: FeatureRepo | None,
    *,
    embodiment_stats: Mapping[str, Mapping],
    embodiment_meta: Mapping[str, Mapping],
    task_meta: Mapping[str, Mapping],
    timestamp: datetime | None = None,
) -> None:
    """``publish`` with the repo first, as the prepare step calls it."""
    publish(embodiment_stats, embodiment_meta, task_meta, timestamp, repo=repo)


def read_features(embodiment: str, task: str | None = None, *, repo: FeatureRepo | None = None) -> dict:
    """Online features of an embodiment (and a task): the one read path of training and serving.

    Returns ``{"entities": {"embodiment": ..., "task": ...}, "norm_stats": {...}, "embodiment": {...},
    "task": {...} or None}``; float arrays are float32 numpy arrays, masks bool, integer arrays int64, string
    arrays lists. ``task["instruction_embedding"]`` comes back in its published shape
    (``task["instruction_embedding_shape"]``). Raises ``ValueError`` naming the entity when it has no row.
    """
    repo = repo or default_repo()
    out: dict[str, Any] = {"entities": {"embodiment": embodiment, "task": task}}
    for section, (view, join_key) in SECTIONS.items():
        key = task if join_key == "task" else embodiment
        if key is None:
            out[section] = None
            continue
        out[section] = _read_view(repo, view, join_key, key)
    if out["task"] is not None:
        shape = tuple(int(x) for x in out["task"]["instruction_embedding_shape"])
        out["task"]["instruction_embedding"] = out["task"]["instruction_embedding"].reshape(shape)
    return out


def _read_view(repo: FeatureRepo, view: str, join_key: str, key: str) -> dict:
    from feast.errors import FeatureViewNotFoundException
    from feast.types import Array, Bool, Float32, Float64, Int32, Int64

    # numpy dtype of each Feast array element type; arrays of strings stay Python lists
    numpy_dtypes = {Float32: np.float32, Float64: np.float64, Int32: np.int32, Int64: np.int64, Bool: np.bool_}
    fv = repo.feature_views[view]
    refs = [f"{view}:{f.name}" for f in fv.features]
    # full names keep task_meta's "embodiment" feature apart from the embodiment join key
    try:
        got = repo.store.get_online_features(features=refs, entity_rows=[{join_key: key}], full_feature_names=True)
    except FeatureViewNotFoundException as err:
        raise ValueError(f"unknown {join_key} {key!r}: the feature store in {repo.data_dir} has no {view} view yet; "
                         "run the prepare step (FeatureRepo.apply + publish) first") from err
    got = got.to_dict()
    values = {f.name: got[f"{view}__{f.name}"][0] for f in fv.features}
    # Feast answers a missing row with None for every feature rather than an error
    if all(v is None for v in values.values()):
        raise ValueError(f"unknown {join_key} {key!r}: no {view} features in the feature store ({repo.data_dir})")
    out: dict[str, Any] = {}
    for f in fv.features:
        v = values[f.name]
        if v is not None and isinstance(f.dtype, Array) and f.dtype.base_type in numpy_dtypes:
            v = np.asarray(v, dtype=numpy_dtypes[f.dtype.base_type])
        elif v is not None and isinstance(f.dtype, Array):
            v = list(v)
        out[f.name] = v
    return out


def snapshot(features: dict) -> dict:
    """JSON-serialisable copy of a ``read_features`` result (arrays -> nested lists, their dtypes recorded)."""
    out: dict[str, Any] = {"format": SNAPSHOT_FORMAT, "entities": dict(features.get("entities") or {}), "dtypes": {}}
    for section in SECTIONS:
        values = features.get(section)
        if values is None:
            out[section] = None
            continue
        out[section], out["dtypes"][section] = {}, {}
        for name, v in values.items():
            if isinstance(v, np.ndarray):
                out["dtypes"][section][name] = v.dtype.name
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            out[section][name] = v
    return out


def load_snapshot(d: Mapping) -> dict:
    """Inverse of ``snapshot``: the same structure ``read_features`` returns, arrays back as numpy."""
    if d.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a feature snapshot (format {d.get('format')!r}, expected {SNAPSHOT_FORMAT!r})")
    missing = [s for s in ("norm_stats", "embodiment") if not isinstance(d.get(s), Mapping)]
    if missing:
        raise ValueError(f"feature snapshot lacks {missing}")
    dtypes = d.get("dtypes") or {}
    out: dict[str, Any] = {"entities": dict(d.get("entities") or {})}
    for section in SECTIONS:
        values = d.get(section)
        if values is None:
            out[section] = None
            continue
        kinds = dtypes.get(section) or {}
        out[section] = {k: (np.asarray(v, dtype=np.dtype(kinds[k])) if k in kinds else v) for k, v in values.items()}
    return out
