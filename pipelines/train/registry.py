"""LingBot-VA in the MLflow model registry: a pyfunc over a model directory, registration, aliases.

    mlflow.set_tracking_uri(settings.mlflow_uri)       # sqlite:///<data_dir>/mlflow/mlflow.db unless set
    with mlflow.start_run(experiment_id=ensure_experiment("lingbot-posttrain", data_dir)):
        version = log_and_register(model_dir, registered_name=registered_name_for("posttrain", "reach-v3"))
    policy = mlflow.pyfunc.load_model("models:/lingbot-va-reach-v3@champion")
    example = policy.input_example                      # what a robot sends: camera frames, state, instruction
    out = policy.predict(example, params={"seed": 0})  # {"actions": (N, K*tau, A) native, "unified_actions": ...}

The logged model is an MLflow pyfunc (``LingBotPyfunc``) whose only artifact is the policy bundle training wrote
(``model.bundle.PolicyBundle``: weights, config, normalisation stats, action space, the VAE and the instruction
embeddings), so what is served is exactly what training wrote; it is a thin wrapper over the same
``model.policy.ChunkPolicy`` as the gate and the policy server (camera frames -> VAE latents -> one chunk -> the
embodiment's native actions).

MLflow 3.17 behaviours this module relies on or works around:
  * ``log_model(name=...)``: ``artifact_path`` is deprecated in 3.x; the model becomes a LoggedModel (``models:/m-...``)
    linked to the run, and ``registered_model_name`` registers that LoggedModel as a new version.
  * A LoggedModel goes to the *active run's* experiment; with no active run it goes to the current experiment
    (``"0"``/Default unless one is set), not to the run's, so ``log_and_register(run_id=...)`` resumes the run first.
  * Signature: a tensor-based schema (``TensorSpec``; a ``str`` tensor carries the instruction) with the batch as
    the first dimension, and a ``ParamSchema`` for ``seed``. MLflow enforces it on ``PyFuncModel.predict`` (dtypes,
    shapes; the scoring server converts JSON to these dtypes) and the input example is saved with the model
    (``input_example.json`` + ``serving_input_example.json``) and checked against the model at log time.
  * ``code_paths``: the ``model`` and ``pipelines`` packages are copied into the logged model (``code/``) and put on
    ``sys.path`` when it loads, so ``mlflow.pyfunc.load_model`` works where this project is not installed; the pip
    requirements name the third-party packages those modules import, pinned to this environment's versions (given
    explicitly: inferring them loads the model once more in a subprocess).
  * With a sqlite tracking URI, experiments created without an ``artifact_location`` store artifacts under
    ``./mlruns`` of whatever directory the process runs in; ``pipelines.tracking_store.ensure_experiment`` pins them
    under the data dir.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from model.config import ACTION_DIM
from model.lingbot_va import read_checkpoint_meta
from model.policy import ChunkPolicy
from pipelines.data.embodiments import get_adapter

try:  # MLflow's own limit, so a param never fails to log; the constant is internal, hence the fallback
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
except ImportError:  # pragma: no cover - only if MLflow moves it
    MAX_PARAM_VAL_LENGTH = 6000

logger = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
"""Key of the model directory in ``context.artifacts`` (MLflow copies it to ``artifacts/<dir name>`` in the model)."""
LOGGED_MODEL_NAME = "model"
"""``name`` of the logged pyfunc within its run."""
REGISTERED_NAMES = {"pretrain": "lingbot-va-base", "posttrain": "lingbot-va-{task}"}
INPUTS = ("images", "state", "instruction")
"""The pyfunc's input fields (its signature's names); anything else in a request is an error."""
REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("model", "pipelines")
"""The project's packages the pyfunc imports, copied into every logged model (``code_paths``)."""
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "diffusers", "transformers", "pydantic",
                "pydantic-settings", "pyarrow", "pyyaml")
"""Third-party distributions the pyfunc's load and predict path imports (``model``, ``pipelines.data.embodiments`` /
``features``, ``pipelines.train.tracking`` / ``settings``)."""

# Registered model names may not contain "/" or ":" (MLflow); keep task names to a plain slug so that
# "models:/lingbot-va-<task>@alias" URIs need no quoting either.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------------------------
# The pyfunc


class LingBotPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: the first action chunk of an episode from what a robot sends at its start.

    ``predict`` input (a batch of N robots; a dict of arrays, or a one-row ``pandas.DataFrame`` of one robot):
      images       uint8 (N, V, H, W, 3): one RGB frame per camera, in the model's camera order (the signature's
                   shape fixes V, H and W); (V, H, W, 3) is taken as N = 1
      state        float32 (N, S): the robot's proprioceptive state with those frames (S: the embodiment's)
      instruction  str (N,): the task to perform, one the model was trained on (``policy.tasks``)
    ``params``: ``seed`` (int, default 0), the noise of the flow sampler: the same seed gives the same chunk.
    ``predict`` output: ``{"actions": float32 (N, K*tau, A), "unified_actions": float32 (N, K*tau, 30)}``: the
    chunk in the robot's native action space (clipped to its limits, what it executes) and in the unified space.
    Unknown input fields, wrong shapes and unknown instructions raise ``ValueError`` naming them. Later chunks need
    the executed actions and new frames of a running episode: that is the policy server's session protocol.
    """

    # Opt out of MLflow's type-hint wrapping of ``predict``: the signature logged with the model describes the
    # input, and MLflow enforces it before this is called.
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.policy = None  # set in load_context; the pickled instance stays tiny (weights live in the artifact)

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the model directory artifact on the CPU (weights, VAE, instruction embeddings, stats)."""
        self.load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT])

    def load_model_dir(self, model_dir: str | Path) -> None:
        """Load a policy bundle directly (what ``load_context`` does; usable without MLflow)."""
        self.policy = ChunkPolicy.load(model_dir, get_adapter, device="cpu")

    @property
    def model(self):
        """The ``LingBotVA`` network."""
        return None if self.policy is None else self.policy.model

    def predict(self, context: mlflow.pyfunc.PythonModelContext | None, model_input,
                params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """One chunk per robot of the batch (see the class docstring for input, params and output)."""
        if self.policy is None:
            raise ValueError("the pyfunc has no model loaded; load it with mlflow.pyfunc.load_model")
        p = self.policy
        request = _as_request(model_input)
        unknown = sorted(set(request) - set(INPUTS))
        if unknown:
            raise ValueError(f"unknown input fields {unknown}: this model takes {list(INPUTS)}")
        missing = [k for k in INPUTS if k not in request]
        if missing:
            raise ValueError(f"model_input lacks {missing}: a request holds camera images, the robot state and the "
                             "instruction")
        images = np.asarray(request["images"])
        if images.ndim == 4:
            images = images[None]
        views, size = len(p.cameras), p.image_size
        if (images.ndim != 5 or images.shape[1] != views or images.shape[-1] != 3
                or (size is not None and images.shape[2:4] != (size, size))):
            raise ValueError(f"images must be (N, {views}, {size or 'H'}, {size or 'W'}, 3) uint8 frames of cameras "
                             f"{list(p.cameras)}, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB, got {images.dtype}")
        n = len(images)
        state = np.asarray(request["state"], dtype=np.float32).reshape(n, -1) if np.size(request["state"]) else None
        width = p.adapter.spec.state_dim
        if state is None or state.shape != (n, width) or not np.isfinite(state).all():
            raise ValueError(f"state must be {n} finite row(s) of {width} ({p.adapter.name}'s state), got "
                             f"{np.shape(request['state'])}")
        instructions = [str(x) for x in np.asarray(request["instruction"], dtype=object).reshape(-1)]
        if len(instructions) != n:
            raise ValueError(f"instruction must hold one task per robot ({n}), got {len(instructions)}")
        # ValueError for an unknown task or non-finite actions
        unified, native = p.first_chunks(images, state, instructions, seed=_seed((params or {}).get("seed")))
        return {"actions": native, "unified_actions": unified}


def policy_signature(policy) -> ModelSignature:
    """The pyfunc's signature for a loaded ``ChunkPolicy``: tensor inputs with the batch first, a ``seed`` param."""
    views, size, width = len(policy.cameras), policy.image_size or -1, policy.adapter.spec.state_dim
    steps, native = policy.steps_per_chunk, policy.adapter.spec.native_action_dim
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, views, size, size, 3), "images"),
                     TensorSpec(np.dtype(np.float32), (-1, width), "state"),
                     TensorSpec(np.dtype(str), (-1,), "instruction")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, steps, native), "actions"),
                      TensorSpec(np.dtype(np.float32), (-1, steps, ACTION_DIM), "unified_actions")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("seed", "long", 0)]))


def synthetic_example(policy) -> dict[str, np.ndarray]:
    """A well-formed one-robot request for ``policy`` (mid-grey frames, zero state, its first task), used as the
    input example when no recorded observation is at hand."""
    size = policy.image_size or 64
    return {"images": np.full((1, len(policy.cameras), size, size, 3), 128, np.uint8),
            "state": np.zeros((1, policy.adapter.spec.state_dim), np.float32),
            "instruction": np.array([policy.tasks[0]])}


def describe(policy, registered_name: str) -> str:
    """A model description for the registry: what the model is, what it takes and what it returns."""
    tasks = ", ".join(policy.tasks)
    return (f"LingBot-VA video-action world model `{registered_name}` for embodiment {policy.adapter.name} "
            f"(tasks: {tasks}). Input, per robot: `images` uint8 (N, {len(policy.cameras)}, H, W, 3), one RGB frame "
            f"per camera in the order {list(policy.cameras)}; `state` float32 (N, {policy.adapter.spec.state_dim}); "
            f"`instruction` str (N,), one of the tasks. Param `seed` (int, default 0). Output: `actions` float32 "
            f"(N, {policy.steps_per_chunk}, {policy.adapter.spec.native_action_dim}), the first chunk in the "
            f"robot's native action space at {policy.adapter.spec.control_rate_hz:g} Hz, and `unified_actions` "
            f"(N, {policy.steps_per_chunk}, 30). Later chunks of an episode need its executed actions and frames: "
            "serve it with `lingbot serve` (KServe V2 sessions). Load: `mlflow.pyfunc.load_model(uri)`; "
            "`model.input_example` is a request.")


def _as_request(model_input: Any) -> dict[str, Any]:
    """A dict request from a dict or a one-row DataFrame (one robot)."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise ValueError(f"model_input DataFrame must have exactly one row (one robot), got {len(model_input)}; "
                             "send a batch as a dict of arrays")
        row = model_input.iloc[0].to_dict()
        return {k: [v] if k == "instruction" else np.asarray(v)[None] for k, v in row.items() if v is not None}
    if isinstance(model_input, Mapping):
        return {k: v for k, v in model_input.items() if v is not None}
    raise ValueError(f"model_input must be a dict of arrays or a one-row pandas DataFrame, got "
                     f"{type(model_input).__name__}")


def _seed(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, (list, tuple, np.ndarray)):
        a = np.asarray(value)
        if a.size != 1:
            raise ValueError(f"seed must be a single integer, got shape {a.shape}")
        value = a.reshape(-1)[0]
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return int(value)


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
    """``REQUIREMENTS`` pinned to this environment's versions (the project itself travels as ``code_paths``)."""
    reqs = []
    for pkg in REQUIREMENTS:
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")  # drop local labels such as torch's "+cpu"
        except PackageNotFoundError:  # pragma: no cover - all are dependencies of the platform
            reqs.append(pkg)
    return reqs


def code_paths() -> list[str]:
    """The project's packages as ``log_model(code_paths=...)`` takes them."""
    return [str(REPO_ROOT / name) for name in CODE_PACKAGES]


def log_and_register(model_dir: Path, *, registered_name: str, alias: str = "challenger",
                     run_id: str | None = None, input_example: Mapping[str, np.ndarray] | None = None,
                     metadata: Mapping[str, Any] | None = None) -> int:
    """Log ``model_dir`` as a pyfunc named "model" in the active run (or run ``run_id``), register it, alias it.

    The logged model carries its signature (``policy_signature``), ``input_example`` (a recorded observation; by
    default ``synthetic_example``), the project's code and pinned requirements, and ``metadata`` (e.g. the data
    version); the registered model and the new version get a description (``describe``). Returns the new version
    number of ``registered_name``; ``alias`` now points to it. A directory that cannot be served as a policy
    (no VAE or instruction embeddings, several embodiments) is a ValueError before anything is logged.
    """
    model_dir = Path(model_dir)
    read_checkpoint_meta(model_dir)  # fail here, with a clear message, rather than after the slow upload
    active = mlflow.active_run()
    if run_id is None and active is None:
        raise ValueError("log_and_register needs an active MLflow run or a run_id")
    if run_id is not None and active is not None and active.info.run_id != run_id:
        raise ValueError(f"run_id {run_id} is not the active run {active.info.run_id}; end that run first")
    policy = ChunkPolicy.load(model_dir, get_adapter)
    example = synthetic_example(policy)
    if input_example is not None:
        check = LingBotPyfunc()
        check.policy = policy
        try:  # a recorded observation the model cannot take would be a misleading example
            check.predict(None, dict(input_example))
            example = dict(input_example)
        except ValueError as err:
            logger.warning("input example rejected (%s); logging a synthetic one", err)
    description = describe(policy, registered_name)

    def log() -> tuple[int, str]:
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=LingBotPyfunc(),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            registered_model_name=registered_name,
            pip_requirements=_pip_requirements(),
            code_paths=code_paths(),
            signature=policy_signature(policy),
            input_example=example,
            metadata={"tasks": policy.tasks, "embodiment": policy.adapter.name, "cameras": list(policy.cameras),
                      **(metadata or {})},
        )
        return int(info.registered_model_version), mlflow.active_run().info.run_id

    if active is not None:
        number, run = log()
    else:
        # resume the run: a LoggedModel logged outside an active run would land in the current experiment
        with mlflow.start_run(run_id=run_id):
            number, run = log()
    client = mlflow.MlflowClient()
    if not client.get_registered_model(registered_name).description:
        client.update_registered_model(registered_name, description=description)
    client.update_model_version(registered_name, str(number), description=f"{description} Trained by run {run}.")
    client.set_registered_model_alias(registered_name, alias, str(number))
    return number


def load_registered(uri: str) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model(uri)``, e.g. ``models:/lingbot-va-base@challenger``.

    The ``LingBotVA`` itself is ``load_registered(uri).unwrap_python_model().model``; the ``ChunkPolicy`` is
    ``.unwrap_python_model().policy``.
    """
    return mlflow.pyfunc.load_model(uri)


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
    "flatten_params",
    "load_registered",
    "log_and_register",
    "policy_signature",
    "registered_name_for",
]
