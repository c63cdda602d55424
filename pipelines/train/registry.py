"""LingBot-VA in the MLflow model registry: a pyfunc over a model directory, registration, aliases, tracking defaults.

    uri = default_tracking_uri(data_dir)               # sqlite:///<data_dir>/mlflow/mlflow.db
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=ensure_experiment("lingbot-posttrain", data_dir)):
        version = log_and_register(model_dir, registered_name=registered_name_for("posttrain", "reach-v3"))
    policy = load_registered("models:/lingbot-va-reach-v3@challenger")
    out = policy.predict({"latents": z0, "text": emb, "seed": 0})   # {"actions": (K*tau, 30), "video": (K, C, H, W)}

The logged model is an MLflow pyfunc (``LingBotPyfunc``) whose only artifact is the ``save_pretrained`` directory
(weights, config, normalisation stats and action space), so what is served is exactly what training wrote.

MLflow 3.17 behaviours this module relies on or works around:
  * ``log_model(name=...)``: ``artifact_path`` is deprecated in 3.x; the model becomes a LoggedModel (``models:/m-...``)
    linked to the run, and ``registered_model_name`` registers that LoggedModel as a new version.
  * A LoggedModel goes to the *active run's* experiment; with no active run it goes to the current experiment
    (``"0"``/Default unless one is set), not to the run's, so ``log_and_register(run_id=...)`` resumes the run first.
  * ``pip_requirements`` is given explicitly: otherwise MLflow infers them by loading the model in a subprocess
    (slow, and it imports the whole model stack once more).
  * No signature and no input example: the input is a dict of ragged, partly optional arrays that MLflow's column
    schemas cannot describe; ``predict`` validates it itself (``ValueError`` naming the field). Without a signature
    PyFuncModel passes the input through unchanged, and a ``dict`` is a valid pyfunc output (``PyFuncOutput``
    includes ``dict[str, Any]``), which the scoring server serialises as ``{"predictions": {...}}``.
  * With a sqlite tracking URI, experiments created without an ``artifact_location`` store artifacts under
    ``./mlruns`` of whatever directory the process runs in; ``ensure_experiment`` pins them under the data dir.
  * The pickled pyfunc refers to this module by import path: the environment that loads the model needs the
    ``lingbot-va-platform`` package installed (the serving image does), it is not on PyPI so it is not a pip
    requirement of the logged model.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from model.config import ACTION_DIM
from model.lingbot_va import LingBotVA, read_checkpoint_meta
from model.normalization import ActionNormalizer

try:  # MLflow's own limit, so a param never fails to log; the constant is internal, hence the fallback
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
except ImportError:  # pragma: no cover - only if MLflow moves it
    MAX_PARAM_VAL_LENGTH = 6000

MODEL_DIR_ARTIFACT = "model_dir"
"""Key of the model directory in ``context.artifacts`` (MLflow copies it to ``artifacts/<dir name>`` in the model)."""
LOGGED_MODEL_NAME = "model"
"""``name`` of the logged pyfunc within its run."""
REGISTERED_NAMES = {"pretrain": "lingbot-va-base", "posttrain": "lingbot-va-{task}"}

# Registered model names may not contain "/" or ":" (MLflow); keep task names to a plain slug so that
# "models:/lingbot-va-<task>@alias" URIs need no quoting either.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------------------------
# The pyfunc


class LingBotPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc that runs one LingBot-VA inference session step: observe a frame, predict one chunk.

    ``predict`` input: a ``dict`` (or a one-row ``pandas.DataFrame`` whose cells hold the values), as Python
    lists or numpy arrays (the scoring server's ``{"inputs": {...}}`` form gives numpy arrays):
      latents      (F, C, H, W) float, required: the observation history; only the first frame is observed
                   (later frames would need the executed actions that led to them)
      text         (T, text_dim) float instruction embedding (also (text_dim,) or (1, T, text_dim));
                   default: one all-zero token, i.e. the unconditional policy
      action_mask  (30,) bool / 0-1: channels of the embodiment; default: the checkpoint's (feature snapshot
                   ``embodiment.action_mask``, ``action_space["action_mask"]`` or ``["active_channels"]``), else all
      embodiment   str: which embodiment's stats to use when the checkpoint holds several
      seed         int, default 0: the noise of the flow sampler; the same seed gives the same output
    ``predict`` output: ``{"actions": (K*tau, 30) nested list, "video": (K, C, H, W) nested list}``; actions are in
    native units when the checkpoint has normalisation stats (masked channels stay 0), else in normalised units.
    ``params`` is ignored: the model is logged without a params schema, so MLflow drops params before this call.
    """

    # Opt out of MLflow's type-hint wrapping of ``predict``: its validation accepts only list[...] hints (a dict hint
    # fails at log time) and an unannotated predict warns at class creation; inputs are validated here instead.
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.model = None  # set in load_context; the pickled instance stays tiny (weights live in the artifact)
        self.stats: dict[str | None, tuple[ActionNormalizer, np.ndarray | None]] = {}
        self.default_mask: np.ndarray | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the model directory artifact on the CPU and resolve its normalisation stats and action mask."""
        self.load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT])

    def load_model_dir(self, model_dir: str | Path) -> None:
        """Load a ``save_pretrained`` directory directly (what ``load_context`` does; usable without MLflow)."""
        self.model = LingBotVA.from_pretrained(model_dir, map_location="cpu").eval()
        meta = self.model.checkpoint_meta
        self.stats = parse_normalization(meta.get("normalization"))
        self.default_mask = _mask_from_action_space(meta.get("action_space"))

    def predict(self, context: mlflow.pyfunc.PythonModelContext | None, model_input,
                params: dict[str, Any] | None = None) -> dict[str, list]:
        """Predict one chunk from the first latent frame (see the class docstring for input and output)."""
        if self.model is None:
            raise ValueError("the pyfunc has no model loaded; load it with mlflow.pyfunc.load_model")
        request = _as_request(model_input)
        c = self.model.config
        latents = _float_array(request, "latents", required=True)
        if latents.ndim != 4 or latents.shape[1] != c.latent_channels:
            raise ValueError(f"latents must be (F, {c.latent_channels}, H, W) (F frames of {c.latent_channels} latent "
                             f"channels), got shape {latents.shape}")
        if latents.shape[0] < 1:
            raise ValueError("latents must hold at least one frame")
        text = _float_array(request, "text")
        if text is None:
            text = np.zeros((1, c.text_dim), np.float32)
        text = text.reshape(1, -1) if text.ndim == 1 else (text[0] if text.ndim == 3 and text.shape[0] == 1 else text)
        if text.ndim != 2 or text.shape[1] != c.text_dim or text.shape[0] < 1:
            raise ValueError(f"text must be a (T, {c.text_dim}) embedding, got shape {text.shape}")
        normalizer, stats_mask = self._stats_for(request.get("embodiment"))
        mask = _action_mask(request.get("action_mask"), stats_mask, self.default_mask, c.action_channels)
        seed = _seed(request.get("seed"))

        session = self.model.session(torch.from_numpy(text), torch.from_numpy(mask),
                                     generator=torch.Generator().manual_seed(seed))
        session.observe(torch.from_numpy(np.ascontiguousarray(latents[:1])))
        video, actions = session.predict_chunk()
        actions = actions.float().numpy()
        if normalizer is not None:
            # training targets were clipped to [-clip, clip]; beyond that the policy extrapolates
            actions = normalizer.denormalize(np.clip(actions, -normalizer.clip, normalizer.clip))
            actions = np.where(mask[None, :], actions, 0.0).astype(np.float32)  # absent channels stay 0
        return {"actions": actions.tolist(), "video": video.float().numpy().tolist()}

    def _stats_for(self, embodiment: Any) -> tuple[ActionNormalizer | None, np.ndarray | None]:
        """Normaliser and feature-store mask of the requested (or only) embodiment; (None, None) without stats."""
        if embodiment is not None:
            embodiment = _scalar(embodiment, "embodiment")
            if not isinstance(embodiment, str):
                raise ValueError(f"embodiment must be a string, got {embodiment!r}")
        if not self.stats:
            return None, None
        if None in self.stats:  # stats of one unnamed embodiment: nothing to check a given name against
            return self.stats[None]
        if embodiment is None:
            if len(self.stats) > 1:
                raise ValueError(f"this checkpoint has action stats for several embodiments {sorted(self.stats)}; "
                                 "pass 'embodiment'")
            return next(iter(self.stats.values()))
        if embodiment not in self.stats:
            raise ValueError(f"unknown embodiment {embodiment!r}: this checkpoint has stats for {sorted(self.stats)}")
        return self.stats[embodiment]


def parse_normalization(norm: Mapping | None) -> dict[str | None, tuple[ActionNormalizer, np.ndarray | None]]:
    """Action stats of a model directory's ``normalization`` entry, per embodiment (key None when unnamed).

    Accepts a feature snapshot (``pipelines.data.features.snapshot``: ``norm_stats.action_q01/q99``, and the
    embodiment's ``action_mask``), an ``ActionNormalizer.to_dict()`` under ``"action"`` or bare, or
    ``{"embodiments": {name: either of those}}`` for multi-embodiment checkpoints. None/empty -> {}.
    """
    if not norm:
        return {}
    if not isinstance(norm, Mapping):
        raise ValueError(f"checkpoint normalization must be a dict, got {type(norm).__name__}")
    if "embodiments" in norm and not {"norm_stats", "action", "q01"} & set(norm):
        out: dict[str | None, tuple[ActionNormalizer, np.ndarray | None]] = {}
        for name, sub in (norm["embodiments"] or {}).items():
            for stats in parse_normalization(sub).values():  # one entry each; keyed by the outer name
                out[name] = stats
        return out
    if "norm_stats" in norm:
        from pipelines.data.features import load_snapshot  # lazy: pulls pyarrow/yaml, not needed otherwise

        features = load_snapshot(norm)
        stats = features["norm_stats"]
        normalizer = ActionNormalizer(stats["action_q01"], stats["action_q99"], stats.get("action_mean"),
                                      stats.get("action_std"))
        emb = features.get("embodiment") or {}
        mask = np.asarray(emb["action_mask"], bool) if emb.get("action_mask") is not None else None
        return {(features.get("entities") or {}).get("embodiment"): (normalizer, mask)}
    return {None: (ActionNormalizer.from_dict(norm.get("action") or norm), None)}


def _mask_from_action_space(space: Mapping | None) -> np.ndarray | None:
    """Default action mask from ``action_space`` (an explicit 30-mask, or the indices of the active channels)."""
    if not isinstance(space, Mapping):
        return None
    if space.get("action_mask") is not None:
        return np.asarray(space["action_mask"], bool)
    if space.get("active_channels") is not None:
        mask = np.zeros(ACTION_DIM, bool)
        mask[np.asarray(space["active_channels"], int)] = True
        return mask
    return None


def _as_request(model_input: Any) -> dict[str, Any]:
    """A dict request from a dict or a one-row DataFrame (missing cells of a DataFrame count as absent)."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise ValueError(f"model_input DataFrame must have exactly one row (one request), got {len(model_input)}")
        row = model_input.iloc[0].to_dict()
        return {k: v for k, v in row.items() if not (v is None or (isinstance(v, float) and math.isnan(v)))}
    if isinstance(model_input, Mapping):
        return {k: v for k, v in model_input.items() if v is not None}
    raise ValueError(f"model_input must be a dict or a one-row pandas DataFrame, got {type(model_input).__name__}")


def _float_array(request: Mapping, key: str, required: bool = False) -> np.ndarray | None:
    if key not in request:
        if required:
            raise ValueError(f"model_input lacks '{key}'")
        return None
    try:
        a = np.asarray(request[key], dtype=np.float32)
    except (TypeError, ValueError) as err:  # ragged nested lists or non-numbers
        raise ValueError(f"{key} must be a rectangular array of numbers ({err})") from err
    if not np.isfinite(a).all():
        raise ValueError(f"{key} contains NaN or inf")
    return a


def _scalar(value: Any, key: str) -> Any:
    """A scalar from a plain value, a 0-d/1-element array or list (the scoring server wraps scalars)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        a = np.asarray(value)
        if a.size != 1:
            raise ValueError(f"{key} must be a single value, got shape {a.shape}")
        value = a.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _seed(value: Any) -> int:
    if value is None:
        return 0
    value = _scalar(value, "seed")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return int(value)


def _action_mask(given: Any, stats_mask: np.ndarray | None, default: np.ndarray | None, channels: int) -> np.ndarray:
    if given is None:
        mask = stats_mask if stats_mask is not None else default
        return np.ones(channels, bool) if mask is None else np.asarray(mask, bool)
    a = np.asarray(given)
    if a.shape != (channels,) or not np.isin(a, (0, 1)).all():
        raise ValueError(f"action_mask must be {channels} bools or 0/1 values, got shape {a.shape}")
    return a.astype(bool)


# ---------------------------------------------------------------------------------------------------------------
# Logging and registration


def registered_name_for(stage: str, task: str | None = None, objective: str = "world_model",
                        demos: int | None = None) -> str:
    """Registered model name of a training stage: ``lingbot-va-base`` (pretrain), ``lingbot-va-<task>`` (posttrain);
    the reactive baseline's models get ``-reactive`` appended (``lingbot-va-<task>-reactive``) and low-data runs
    ``-demos<N>``, so neither ever takes the ``challenger`` alias of the model the gate deploys."""
    if objective not in ("world_model", "reactive"):
        raise ValueError(f"unknown objective {objective!r}")
    suffix = ("" if objective == "world_model" else "-reactive") + ("" if demos is None else f"-demos{demos}")
    if stage not in REGISTERED_NAMES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(REGISTERED_NAMES)}")
    if stage == "pretrain":
        return REGISTERED_NAMES["pretrain"] + suffix
    if not task:
        raise ValueError("posttrain models are registered per task; task is missing")
    if not _TASK_NAME.match(task):
        raise ValueError(f"task {task!r} cannot name a registered model: use letters, digits, '_', '.' and '-'")
    return REGISTERED_NAMES["posttrain"].format(task=task) + suffix


def _pip_requirements() -> list[str]:
    """What loading the model needs beyond the platform package itself, pinned to this environment's versions."""
    reqs = []
    for pkg in ("mlflow", "torch", "safetensors", "numpy", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")  # drop local labels such as torch's "+cpu"
        except PackageNotFoundError:  # pragma: no cover - all are dependencies of this module
            reqs.append(pkg)
    return reqs


def log_and_register(model_dir: Path, *, registered_name: str, alias: str = "challenger",
                     run_id: str | None = None) -> int:
    """Log ``model_dir`` as a pyfunc named "model" in the active run (or run ``run_id``), register it, alias it.

    Returns the new version number of ``registered_name``; ``alias`` now points to it.
    """
    model_dir = Path(model_dir)
    read_checkpoint_meta(model_dir)  # fail here, with a clear message, rather than after the slow upload
    active = mlflow.active_run()
    if run_id is None and active is None:
        raise ValueError("log_and_register needs an active MLflow run or a run_id")
    if run_id is not None and active is not None and active.info.run_id != run_id:
        raise ValueError(f"run_id {run_id} is not the active run {active.info.run_id}; end that run first")

    def log() -> int:
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=LingBotPyfunc(),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            registered_model_name=registered_name,
            pip_requirements=_pip_requirements(),
        )
        return int(info.registered_model_version)

    if active is not None:
        number = log()
    else:
        # resume the run: a LoggedModel logged outside an active run would land in the current experiment
        with mlflow.start_run(run_id=run_id):
            number = log()
    mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, str(number))
    return number


def load_registered(uri: str) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model(uri)``, e.g. ``models:/lingbot-va-base@challenger``.

    The ``LingBotVA`` itself is ``load_registered(uri).unwrap_python_model().model``.
    """
    return mlflow.pyfunc.load_model(uri)


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def resolve_model(model: str | Path, data_dir: Path) -> tuple[Path, str | None, str | None]:
    """A local model directory, or a registry URI (``models:/<name>@<alias>`` / ``models:/<name>/<version>``)
    downloaded once into ``<data_dir>/mlflow/models/<name>-v<version>``; returns (model dir, name, version).

    Uses the current tracking URI (set it first). Unknown names, aliases or versions raise ValueError.
    """
    from mlflow.exceptions import MlflowException

    text = str(model)
    match = _MODEL_URI.match(text)
    if match is None:
        read_checkpoint_meta(text)  # a directory: validate it
        return Path(text), None, None
    client = mlflow.MlflowClient()
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as err:
        raise ValueError(f"{text}: no such registered model version ({err.message.splitlines()[0]})") from None
    target = Path(data_dir).resolve() / "mlflow" / "models" / f"{name}-v{mv.version}"
    if not (target / "done").is_file():
        # downloaded beside the target and moved in place: processes sharing the data dir (post-training tasks run
        # in parallel on one volume) never see, nor write into, a half-downloaded version
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(staging))
        (staging / "done").write_text(str(mv.version))
        if target.is_dir() and not (target / "done").is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by an interrupted download of an older release
        try:
            staging.rename(target)
        except OSError:  # another process moved its copy in first
            shutil.rmtree(staging, ignore_errors=True)
    dirs = [p.parent for p in target.glob("artifacts/*/config.json")]
    if len(dirs) != 1:
        raise ValueError(f"{text} (version {mv.version}) holds {len(dirs)} model directories, expected one")
    return dirs[0], name, str(mv.version)


# ---------------------------------------------------------------------------------------------------------------
# Tracking defaults


def default_tracking_uri(data_dir: Path) -> str:
    """``sqlite:///<data_dir>/mlflow/mlflow.db`` (absolute; the folder is created).

    Artifacts go to ``<data_dir>/mlflow/artifacts/<experiment>``: a sqlite store has no artifact root of its own
    (it would use ``./mlruns`` of the current directory), so ``ensure_experiment`` sets each experiment's
    ``artifact_location`` when it creates it.
    """
    folder = Path(data_dir).resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_root(data_dir: Path) -> Path:
    """``<data_dir>/mlflow/artifacts``: where ``ensure_experiment`` puts experiments' artifacts."""
    return Path(data_dir).resolve() / "mlflow" / "artifacts"


def ensure_experiment(name: str, data_dir: Path) -> str:
    """Id of experiment ``name`` on the current tracking URI, created if missing: with a local store (sqlite / file)
    its artifacts go under the data dir; with a tracking server the server's artifact store is used (``mlflow-
    artifacts:/``), so pods elsewhere (the gate, the policy server) can download what a training pod logged.

    An existing experiment keeps its artifact location; a deleted one is restored.
    """
    from urllib.parse import urlparse

    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        local = urlparse(mlflow.get_tracking_uri()).scheme in ("", "file", "sqlite")
        location = (artifact_root(data_dir) / name).as_uri() if local else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # another process created it in between (sqlite has a unique name constraint): use theirs
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def flatten_params(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: ``{"a": {"b": 1}}`` -> ``{"<prefix>a.b": "1"}``.

    Lists and tuples become JSON, empty dicts ``"{}"``; values longer than MLflow's limit
    (``MAX_PARAM_VAL_LENGTH``) are truncated with a trailing ``...``.
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
            continue
        if isinstance(value, Mapping):
            text = "{}"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        out[name] = text
    return out


__all__ = [
    "LingBotPyfunc",
    "artifact_root",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten_params",
    "load_registered",
    "log_and_register",
    "parse_normalization",
    "registered_name_for",
]
