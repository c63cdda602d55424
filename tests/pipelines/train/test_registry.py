"""MLflow registry of LingBot-VA: log + register a model directory, aliases, pyfunc predictions, tracking helpers.

One module-scoped fixture logs a tiny model twice into a sqlite tracking store under a temporary data dir (MLflow
setup and model logging dominate the runtime); network access is refused for the whole module.
"""

import os

# before mlflow is imported: its telemetry client is created at import time
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from model import LingBotVA, get_preset
from pipelines.data.embodiments import METAWORLD_CAMERAS
from pipelines.settings import default_tracking_uri
from pipelines.tracking_store import ensure_experiment, resolve_model
from pipelines.train.registry import (
    flatten_params,
    load_registered,
    log_and_register,
    registered_name_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
from model_dirs import write_model_dir  # the evaluation tests' self-contained model directories

NAME = "lingbot-va-test"
REPO = Path(__file__).resolve().parents[3]


def _refuse_network(self, address, *args, **kwargs):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError(f"test tried to reach the network: {address}")
    return _connect(self, address, *args, **kwargs)


_connect = socket.socket.connect


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """A self-contained tiny model directory (VAE, instruction embeddings, stats, like training writes) logged twice
    (once in the active run, once by run id) as versions 1 and 2 of NAME."""
    tmp = tmp_path_factory.mktemp("registry")
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        mp.setattr(socket.socket, "connect", _refuse_network)
        mlflow.telemetry.set_telemetry_client()  # re-reads the variable in case mlflow was imported earlier
        model_dir = write_model_dir(tmp / "m")
        config = LingBotVA.from_pretrained(model_dir).config
        data_dir = tmp / "data"
        mlflow.set_tracking_uri(default_tracking_uri(data_dir))
        try:
            experiment = ensure_experiment("lingbot-test", data_dir)
            with mlflow.start_run(experiment_id=experiment) as run1:
                mlflow.log_params(flatten_params({"model": config.to_dict(), "note": "x" * 10_000}, "cfg."))
                v1 = log_and_register(model_dir, registered_name=NAME, metadata={"data_version": "abc"})
            with mlflow.start_run(experiment_id=experiment) as run2:
                pass
            v2 = log_and_register(model_dir, registered_name=NAME, run_id=run2.info.run_id)
            mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", str(v2))
            yield SimpleNamespace(tmp=tmp, data_dir=data_dir, experiment=experiment, config=config,
                                  versions=(v1, v2), runs=(run1.info.run_id, run2.info.run_id),
                                  model=load_registered(f"models:/{NAME}@challenger"))
        finally:
            mlflow.set_tracking_uri(previous_uri)  # None unsets the global URI and MLFLOW_TRACKING_URI


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


def test_the_logged_model_explains_itself(reg):
    """Signature (what a robot sends, what comes back), input example, descriptions, code and requirements."""
    client = mlflow.MlflowClient()
    meta = reg.model.metadata
    inputs = {spec.name: spec for spec in meta.signature.inputs.inputs}
    assert list(inputs) == ["images", "state", "instruction"]
    assert (inputs["images"].type, inputs["images"].shape) == (np.dtype(np.uint8), (-1, 2, 32, 32, 3))
    assert (inputs["state"].type, inputs["state"].shape) == (np.dtype(np.float32), (-1, 4))
    assert inputs["instruction"].type == np.dtype(str)
    outputs = {spec.name: spec.shape for spec in meta.signature.outputs.inputs}
    steps = reg.config.chunk_size * reg.config.tau
    assert outputs == {"actions": (-1, steps, 4), "unified_actions": (-1, steps, 30)}
    assert [(p.name, p.default) for p in meta.signature.params.params] == [("seed", 0)]
    example = reg.model.input_example
    assert example["images"].shape == (1, 2, 32, 32, 3) and example["images"].dtype == np.uint8
    assert list(example["instruction"]) == ["reach-v3"]
    assert meta.metadata["embodiment"] == "metaworld-sawyer" and meta.metadata["cameras"] == list(METAWORLD_CAMERAS)
    v1 = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert v1.metadata["data_version"] == "abc"
    for text in (client.get_registered_model(NAME).description, client.get_model_version(NAME, "2").description):
        assert "images" in text and "instruction" in text and "metaworld-sawyer" in text
    assert reg.runs[1] in client.get_model_version(NAME, "2").description
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/2", dst_path=str(reg.tmp / "dl")))
    assert sorted(p.name for p in (local / "code").iterdir()) == ["model", "pipelines"]
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "diffusers", "pydantic-settings"}


def test_predict_from_the_input_example(reg):
    example = reg.model.input_example
    out = reg.model.predict(example)
    steps = reg.config.chunk_size * reg.config.tau
    assert out["actions"].shape == (1, steps, 4) and out["unified_actions"].shape == (1, steps, 30)
    assert np.isfinite(out["actions"]).all() and (np.abs(out["actions"]) <= 1.0).all()  # clipped native commands
    again = reg.model.predict(example)
    assert np.array_equal(again["actions"], out["actions"])
    assert not np.array_equal(reg.model.predict(example, params={"seed": 1})["unified_actions"], out["unified_actions"])
    # a batch of two robots: each row is what that robot alone would get
    batch = {"images": np.concatenate([example["images"], example["images"][:, :, ::-1]]),
             "state": np.concatenate([example["state"], example["state"] + 0.1]).astype(np.float32),
             "instruction": np.array(["reach-v3", "reach-v3"])}
    both = reg.model.predict(batch)
    np.testing.assert_allclose(both["actions"][0], out["actions"][0], atol=1e-5)
    # a one-row DataFrame (the scoring server's dataframe_records form) of one robot
    pyfunc = reg.model.unwrap_python_model()
    frame = pd.DataFrame([{"images": example["images"][0], "state": example["state"][0], "instruction": "reach-v3"}])
    np.testing.assert_allclose(pyfunc.predict(None, frame)["actions"], out["actions"], atol=1e-5)


@pytest.mark.parametrize(("change", "match"), [
    ({"latents": np.zeros((1, 16, 4, 4), np.float32)}, r"unknown input fields \['latents'\]"),
    ({"state": None}, r"lacks \['state'\]"),
    ({"images": np.zeros((1, 2, 16, 16, 3), np.uint8)}, r"images must be \(N, 2, 32, 32, 3\)"),
    ({"images": np.zeros((1, 2, 32, 32, 3), np.float32)}, "images must be uint8"),
    ({"state": np.zeros((1, 7), np.float32)}, "state must be 1 finite row"),
    ({"instruction": np.array(["push-v3"])}, "no instruction embedding for task 'push-v3'"),
])
def test_predict_rejects_bad_input(reg, change, match):
    """The pyfunc itself names what is wrong (MLflow's schema check runs first when it is called through
    ``PyFuncModel.predict``; unknown fields are reported there as ignored, and here as an error)."""
    pyfunc = reg.model.unwrap_python_model()
    with pytest.raises(ValueError, match=match):
        pyfunc.predict(None, {**reg.model.input_example, **change})
    with pytest.raises(ValueError, match="seed must be an integer"):
        pyfunc.predict(None, reg.model.input_example, params={"seed": 1.5})


def test_the_champion_loads_and_predicts_without_the_project(reg, tmp_path):
    """``mlflow.pyfunc.load_model`` in a fresh interpreter that cannot import this project (isolated mode, the
    editable install's finder and the repo's source paths removed, cwd elsewhere): the code the model carries is enough."""
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "lingbot" not in getattr(f, "__module__", "")]
        # the project's sources go; the interpreter's own site-packages stay, even when the venv lies inside the repo
        sys.path[:] = [p for p in sys.path if not p.startswith({str(REPO)!r}) or p.startswith(sys.prefix)]
        assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("model") is None
        import mlflow, numpy as np
        mlflow.set_tracking_uri({default_tracking_uri(reg.data_dir)!r})
        m = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        out = m.predict(m.input_example)
        print(json.dumps({{"actions": out["actions"].tolist(), "pipelines": sys.modules["pipelines"].__file__}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["pipelines"].startswith(str(REPO))  # imported from the model's own code/ copy
    expected = reg.model.predict(reg.model.input_example)["actions"]
    np.testing.assert_allclose(np.asarray(result["actions"], np.float32), expected, atol=1e-5)


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
    missing = settings.model_copy(update={"init_from": f"models:/{NAME}@no-such-alias"})
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
