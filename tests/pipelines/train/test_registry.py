"""MLflow registry of LingBot-VA: log + register a model directory, aliases, pyfunc predictions, tracking helpers.

One module-scoped fixture logs a tiny model twice into a sqlite tracking store under a temporary data dir (MLflow
setup and model logging dominate the runtime); network access is refused for the whole module.
"""

import os

# before mlflow is imported: its telemetry client is created at import time
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import math
import socket
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from model import LingBotVA, get_preset
from model.normalization import ActionNormalizer
from pipelines.data.features import snapshot
from pipelines.train.registry import (
    LingBotPyfunc,
    default_tracking_uri,
    ensure_experiment,
    flatten_params,
    load_registered,
    log_and_register,
    parse_normalization,
    registered_name_for,
    resolve_model,
)

NAME = "lingbot-va-test"
H = W = 4


def _stats() -> tuple[np.ndarray, np.ndarray]:
    # far from the normalised range [-1.5, 1.5], so de-normalised actions cannot be mistaken for raw ones
    q01 = 10.0 + np.arange(30, dtype=np.float32)
    return q01, q01 + 5.0


def _refuse_network(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError(f"test tried to reach the network: {address}")
    return _connect(self, address, *args, **kwargs)


_connect = socket.socket.connect


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """Tiny model logged twice (once in the active run, once by run id) as versions 1 and 2 of NAME."""
    tmp = tmp_path_factory.mktemp("registry")
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        mp.setattr(socket.socket, "connect", _refuse_network)
        mlflow.telemetry.set_telemetry_client()  # re-reads the variable in case mlflow was imported earlier
        q01, q99 = _stats()
        config = get_preset("tiny")
        model_dir = LingBotVA(config).save_pretrained(
            tmp / "m", normalization={"action": ActionNormalizer(q01, q99).to_dict()},
            action_space={"embodiment": "synthetic"})
        data_dir = tmp / "data"
        mlflow.set_tracking_uri(default_tracking_uri(data_dir))
        try:
            experiment = ensure_experiment("lingbot-test", data_dir)
            with mlflow.start_run(experiment_id=experiment) as run1:
                mlflow.log_params(flatten_params({"model": config.to_dict(), "note": "x" * 10_000}, "cfg."))
                v1 = log_and_register(model_dir, registered_name=NAME)
            with mlflow.start_run(experiment_id=experiment) as run2:
                pass
            v2 = log_and_register(model_dir, registered_name=NAME, run_id=run2.info.run_id)
            yield SimpleNamespace(tmp=tmp, data_dir=data_dir, experiment=experiment, config=config, q01=q01, q99=q99,
                                  versions=(v1, v2), runs=(run1.info.run_id, run2.info.run_id),
                                  model=load_registered(f"models:/{NAME}@challenger"))
        finally:
            mlflow.set_tracking_uri(previous_uri)  # None unsets the global URI and MLFLOW_TRACKING_URI


def _request(config, seed=0, **extra) -> dict:
    latents = np.random.default_rng(0).standard_normal((2, config.latent_channels, H, W)).astype(np.float32)
    return {"latents": latents.tolist(), "seed": seed, **extra}


def test_versions_alias_runs_and_artifact_location(reg):
    assert reg.versions == (1, 2)
    client = mlflow.MlflowClient()
    # ModelVersion.version is an int from the sqlite store (a str from REST stores): compare as int
    assert int(client.get_model_version_by_alias(NAME, "challenger").version) == 2
    v1, v2 = (client.get_model_version(NAME, str(v)) for v in reg.versions)
    assert (v1.run_id, v2.run_id) == reg.runs  # the second went into the run named by run_id
    assert mlflow.active_run() is None
    assert client.get_run(reg.runs[0]).data.params["cfg.model.latent_channels"] == "16"
    experiment = client.get_experiment(reg.experiment)
    assert experiment.artifact_location == (reg.data_dir.resolve() / "mlflow" / "artifacts" / "lingbot-test").as_uri()
    assert ensure_experiment("lingbot-test", reg.data_dir) == reg.experiment  # idempotent
    assert (reg.data_dir / "mlflow" / "mlflow.db").is_file()


def test_predict_chunk_shape_denormalised_deterministic(reg):
    c = reg.config
    out = reg.model.predict(_request(c))
    actions, video = np.asarray(out["actions"]), np.asarray(out["video"])
    assert actions.shape == (c.chunk_size * c.tau, c.action_channels)
    assert video.shape == (c.chunk_size, c.latent_channels, H, W)
    assert np.isfinite(actions).all() and np.isfinite(video).all()
    # normalised actions are clipped to [-1.5, 1.5] -> native range widened by a quarter span on each side
    span = reg.q99 - reg.q01
    assert (actions >= reg.q01 - 0.25 * span - 1e-3).all() and (actions <= reg.q99 + 0.25 * span + 1e-3).all()

    again = reg.model.predict(_request(c))
    assert again["actions"] == out["actions"] and again["video"] == out["video"]
    assert reg.model.predict(_request(c, seed=1))["actions"] != out["actions"]
    # a one-row DataFrame (the scoring server's dataframe_records form) gives the same answer
    frame = pd.DataFrame([{k: np.asarray(v) for k, v in _request(c).items()}])
    assert reg.model.predict(frame)["actions"] == out["actions"]


def test_predict_text_and_mask(reg):
    c = reg.config
    mask = np.ones(30, bool)
    mask[[3, 28]] = False
    text = np.random.default_rng(1).standard_normal((5, c.text_dim)).tolist()
    actions = np.asarray(reg.model.predict(_request(c, text=text, action_mask=mask.astype(int).tolist()))["actions"])
    assert (actions[:, ~mask] == 0).all()
    assert (actions[:, mask] > 1.5).all()  # de-normalised: every q01 here is >= 10


@pytest.mark.parametrize(("change", "match"), [
    ({"latents": np.zeros((1, 8, H, W)).tolist()}, r"latents must be \(F, 16, H, W\).*\(1, 8, 4, 4\)"),
    ({"latents": np.zeros((16, H, W)).tolist()}, "latents must be"),
    ({"latents": None}, "lacks 'latents'"),
    ({"latents": [[[[0.0, math.nan]]]]}, "latents contains NaN"),
    ({"text": np.zeros((3, 7)).tolist()}, r"text must be a \(T, 32\)"),
    ({"action_mask": [1] * 29}, "action_mask must be 30"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_predict_rejects_bad_input(reg, change, match):
    with pytest.raises(ValueError, match=match):
        reg.model.predict({**_request(reg.config), **change})


def test_predict_rejects_several_rows(reg):
    frame = pd.DataFrame([_request(reg.config), _request(reg.config)])
    with pytest.raises(ValueError, match="exactly one row"):
        reg.model.predict(frame)


def test_snapshot_and_multi_embodiment_stats(tmp_path):
    q01, q99 = _stats()
    mask = np.zeros(30, bool)
    mask[:7] = True
    features = {"entities": {"embodiment": "franka", "task": None}, "task": None,
                "norm_stats": {"action_q01": q01, "action_q99": q99, "action_mean": (q01 + q99) / 2,
                               "action_std": np.ones(30, np.float32)},
                "embodiment": {"action_mask": mask}}
    stats = parse_normalization(snapshot(features))
    assert list(stats) == ["franka"]
    np.testing.assert_allclose(stats["franka"][0].q99, q99)
    assert (stats["franka"][1] == mask).all()
    multi = {"embodiments": {"franka": snapshot(features), "aloha": {"action": ActionNormalizer(-q99, -q01).to_dict()}}}
    assert sorted(parse_normalization(multi)) == ["aloha", "franka"]

    # without MLflow: the pyfunc over a multi-embodiment directory picks stats and mask by name
    config = get_preset("tiny")
    LingBotVA(config).save_pretrained(tmp_path / "m", normalization=multi)
    pyfunc = LingBotPyfunc()
    pyfunc.load_model_dir(tmp_path / "m")
    actions = np.asarray(pyfunc.predict(None, _request(config, embodiment="franka"))["actions"])
    assert (actions[:, 7:] == 0).all() and (actions[:, :7] >= 10 - 1.25).all()
    assert (np.asarray(pyfunc.predict(None, _request(config, embodiment="aloha"))["actions"]) < 0).all()
    with pytest.raises(ValueError, match="several embodiments"):
        pyfunc.predict(None, _request(config))
    with pytest.raises(ValueError, match="unknown embodiment 'ur5'"):
        pyfunc.predict(None, _request(config, embodiment="ur5"))


@pytest.mark.parametrize(("stage", "task", "name"), [
    ("pretrain", None, "lingbot-va-base"),
    ("pretrain", "reach-v3", "lingbot-va-base"),
    ("posttrain", "reach-v3", "lingbot-va-reach-v3"),
    ("posttrain", None, ValueError("task is missing")),
    ("posttrain", "", ValueError("task is missing")),
    ("posttrain", "mt/reach", ValueError("cannot name a registered model")),
    ("finetune", "reach-v3", ValueError("unknown stage 'finetune'")),
])
def test_registered_name_for(stage, task, name):
    if isinstance(name, ValueError):
        with pytest.raises(ValueError, match=str(name)):
            registered_name_for(stage, task)
    else:
        assert registered_name_for(stage, task) == name


def test_baseline_and_low_data_models_never_share_the_deployed_name():
    names = {registered_name_for("posttrain", "reach-v3", objective, demos)
             for objective in ("world_model", "reactive") for demos in (None, 10)}
    assert names == {"lingbot-va-reach-v3", "lingbot-va-reach-v3-reactive", "lingbot-va-reach-v3-demos10",
                     "lingbot-va-reach-v3-reactive-demos10"}


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": (3,), "g": {}, "h": "x" * 7000,
                           "i": True}, "p.")
    assert flat["p.a.b"] == "1" and flat["p.a.c.d"] == "None"
    assert flat["p.e"] == "[1, 2]" and flat["p.f"] == "[3]" and flat["p.g"] == "{}" and flat["p.i"] == "True"
    assert len(flat["p.h"]) == MAX_PARAM_VAL_LENGTH and flat["p.h"].endswith("...")
    assert all(isinstance(v, str) for v in flat.values())


def test_default_tracking_uri(tmp_path):
    uri = default_tracking_uri(tmp_path / "d")
    assert uri == f"sqlite:///{tmp_path.resolve()}/d/mlflow/mlflow.db"
    assert (tmp_path / "d" / "mlflow").is_dir()


def test_log_and_register_needs_a_run(tmp_path):
    LingBotVA(get_preset("tiny")).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="active MLflow run or a run_id"):
        log_and_register(tmp_path / "m", registered_name=NAME)
    with pytest.raises(ValueError, match="not a LingBot-VA model directory"):
        log_and_register(tmp_path / "missing", registered_name=NAME)


@pytest.mark.parametrize("uri", [f"models:/{NAME}@challenger", f"models:/{NAME}/1"], ids=["alias", "version"])
def test_post_training_starts_from_a_registered_model(reg, uri):
    """``--init-from models:/...`` (the cluster's post-training starts from the registered pretrained model): the
    version is downloaded under the data dir and read from there; a directory is used as it is."""
    from pipelines.train.settings import TrainSettings
    from pipelines.train.trainer import init_model_dir

    settings = TrainSettings(_env_file=None, stage="posttrain", task="reach-v3", init_from=uri,
                             data_dir=reg.data_dir, tracking_uri=default_tracking_uri(reg.data_dir))
    model_dir = init_model_dir(settings)
    version = 2 if uri.endswith("@challenger") else 1
    assert model_dir.parent == reg.data_dir.resolve() / "mlflow" / "models" / f"{NAME}-v{version}" / "artifacts"
    assert LingBotVA.from_pretrained(model_dir).config == reg.config
    local = TrainSettings(_env_file=None, stage="posttrain", task="reach-v3", init_from=str(reg.tmp / "m"))
    assert init_model_dir(local) == reg.tmp / "m"
    missing = settings.model_copy(update={"init_from": f"models:/{NAME}@champion"})
    with pytest.raises(ValueError, match="no such registered model version"):
        init_model_dir(missing)


def test_a_registered_version_is_moved_into_place_whole(reg):
    """resolve_model downloads beside the target and renames: no half-written version is ever visible (tasks
    post-trained in parallel share one data dir), and a folder an interrupted download left is replaced."""
    data_dir = reg.tmp / "resolve"
    target = data_dir / "mlflow" / "models" / f"{NAME}-v1"
    (target / "artifacts").mkdir(parents=True)  # interrupted: no `done`
    model_dir, name, version = resolve_model(f"models:/{NAME}/1", data_dir)
    assert (name, version) == (NAME, "1") and (target / "done").read_text() == "1"
    assert model_dir.parent == target.resolve() / "artifacts" and (model_dir / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [f"{NAME}-v1"]  # no staging folder left
    assert resolve_model(f"models:/{NAME}/1", data_dir)[0] == model_dir  # found, not downloaded again
