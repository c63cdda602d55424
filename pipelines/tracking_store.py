"""The MLflow tracking store as the lifecycle steps and the policy server use it: experiments whose artifacts stay
under the data dir, and registry models fetched into it.

    mlflow.set_tracking_uri(settings.mlflow_uri)       # PlatformSettings: tracking_uri, else sqlite in the data dir
    with mlflow.start_run(experiment_id=ensure_experiment("lingbot-posttrain", settings.data_dir)):
        ...
    model_dir, name, version = resolve_model("models:/lingbot-va-reach-v3@champion", settings.data_dir)

Where the store lives (``default_tracking_uri``, ``artifact_root``) and the ``models:/`` grammar
(``parse_model_uri``) belong to the settings root, ``pipelines.settings``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException

from model.lingbot_va import read_checkpoint_meta
from pipelines.settings import artifact_root, parse_model_uri


def ensure_experiment(name: str, data_dir: Path) -> str:
    """Id of experiment ``name`` on the current tracking URI, created if missing: with a local store (sqlite / file)
    its artifacts go under the data dir; with a tracking server the server's artifact store is used (``mlflow-
    artifacts:/``), so pods elsewhere (the gate, the policy server) can download what a training pod logged.

    An existing experiment keeps its artifact location; a deleted one is restored.
    """
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


def resolve_model(model: str | Path, data_dir: Path) -> tuple[Path, str | None, str | None]:
    """A local model directory, or a registry URI (``models:/<name>@<alias>`` / ``models:/<name>/<version>``)
    downloaded once into ``<data_dir>/mlflow/models/<name>-v<version>``; returns (model dir, name, version).

    Uses the current tracking URI (set it first). Unknown names, aliases or versions raise ValueError.
    """
    text = str(model)
    uri = parse_model_uri(text)
    if uri is None:
        read_checkpoint_meta(text)  # a directory: validate it
        return Path(text), None, None
    client = mlflow.MlflowClient()
    try:
        mv = (client.get_model_version_by_alias(uri.name, uri.alias) if uri.alias
              else client.get_model_version(uri.name, uri.version))
    except MlflowException as err:
        raise ValueError(f"{text}: no such registered model version ({err.message.splitlines()[0]})") from None
    target = Path(data_dir).resolve() / "mlflow" / "models" / f"{uri.name}-v{mv.version}"
    if not (target / "done").is_file():
        # downloaded beside the target and moved in place: processes sharing the data dir (post-training tasks run
        # in parallel on one volume) never see, nor write into, a half-downloaded version
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{uri.name}/{mv.version}", dst_path=str(staging))
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
    return dirs[0], uri.name, str(mv.version)


__all__ = ["ensure_experiment", "resolve_model"]
